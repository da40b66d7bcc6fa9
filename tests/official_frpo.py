"""FRPO's loss as the official trainer computes it (Helloworld10011/FRPO, training/frpo_trainer.py,
_compute_loss), re-derived in float64 from that code's formulas for one process, with explicit group
indices in place of its prompt hash and no entropy mask (where this package differs by design: README).

Advantages are TRL's: reward minus the group mean, divided by (group std + 1e-4) when scaled.
"""
import torch


def trl_advantages(rewards, group_size, scale_rewards=False):
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale_rewards:
        adv = adv / (grouped.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def official_frpo_loss(logp, mask, advantages, group_index, *, lam=1.0, baseline=True, jackknife=True,
                       beta=0.0, ref_logps=None, old_logps=None, epsilon=0.2, delta=None, level="token"):
    weight = torch.exp(-advantages / lam).unsqueeze(1)  # w_i replaces the advantage
    log_ratio = logp - (logp.detach() if old_logps is None else old_logps)
    lengths = mask.sum(-1).clamp(min=1.0)
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / lengths).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    capped = ratio if delta is None else ratio.clamp(max=delta)
    row_value = (torch.minimum(capped * weight, clipped * weight) * mask).sum(-1) / lengths  # s_i
    unweighted = (torch.minimum(capped, clipped) * mask).sum(-1) / lengths  # o_i, the baseline's

    groups = group_index.unique()
    terms, offsets = [], []
    for g in groups:
        members = row_value[group_index == g]
        n = members.numel()
        log_mean = torch.log(members.mean().clamp_min(1e-12))
        if jackknife:
            leave_one_out = (members.sum() - members) / (n - 1)
            log_mean = n * log_mean - (n - 1) * torch.log(leave_one_out.clamp_min(1e-12)).mean()
        terms.append(log_mean)
        if baseline:
            offsets.append(unweighted[group_index == g].mean())
    value = torch.stack(terms).mean()
    if baseline:
        value = value - torch.stack(offsets).mean()
    loss = max(lam, 1.0) * value
    if beta:
        diff = ref_logps - logp
        loss = loss + beta * ((torch.exp(diff) - diff - 1) * mask).sum(-1).div(lengths).mean()
    return loss
