"""An independent float64 spec of TRL 1.16's GRPOTrainer._compute_loss (every loss type and loss option),
and of FRPO with the same masks and ratios, in plain torch.

It shares no code with frpo_kernels: a second reading of TRL's formulas, written in TRL's order (mask,
then ratio, then KL, then the normaliser, then the entropy bonus), and of the issue's FRPO formula
s_i = w_i * sum_t m_t q_t min(c1, c2) / T_i with q_t = off-policy mask * entropy mask * IS ratio.
Masks are 0/1 here (TRL's); entropies and quantiles are float64 throughout.
"""
import math

import torch

TRL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def spec_logp_and_entropy(logits, ids, temperature=1.0):
    """Per-token log-prob of ids and entropy of softmax(logits / temperature), [B, T] float64."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def spec_off_policy_mask(advantages, logp, sampling, mask, threshold):
    """[B, 1]: keep unless A < 0 and the row's mean (sampling - logp) is above threshold; NaN counts 0."""
    diff = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    mean = (diff * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean <= threshold)).double()


def spec_entropy_mask(entropy, mask, top_quantile):
    """[B, T]: the completion tokens whose entropy is >= the (1 - top_quantile) quantile of all of them."""
    values = entropy.detach()[mask.bool()]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1 - top_quantile)
    return ((entropy.detach() * mask >= threshold) & mask.bool()).double()


def spec_gamma_weights(advantages, token_log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's phi per row [B, 1], no gradient."""
    with torch.no_grad():
        low = math.log(1e-8)
        seq = (token_log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.log(is_ratio).clamp(low, 20.0).sum(-1, keepdim=True)
        log_w = seq.clamp(low, 20.0)
        k = torch.where(advantages >= 0, torch.tensor(k_pos, dtype=torch.float64),
                        torch.tensor(k_neg, dtype=torch.float64))
        lam = torch.where(advantages >= 0, torch.tensor(lambda_pos, dtype=torch.float64),
                          torch.tensor(lambda_neg, dtype=torch.float64)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def spec_trl_loss(logits, ids, mask, advantages, *, loss_type, old_logps=None, ref_logps=None, beta=0.0,
                  epsilon_low=0.2, epsilon_high=0.2, delta=None, importance_sampling_level="token",
                  max_completion_length=None, temperature=1.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                  vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                  use_bias_correction_kl=False, importance_sampling_ratio=None, off_policy_mask_threshold=None,
                  sampling_logps=None, top_entropy_quantile=1.0, entropy_coef=0.0, num_items_in_batch=None,
                  group_size=None, group_ids=None, lam=1.0, jackknife=True, baseline=True):
    """(loss, metrics) as TRL computes them for one process, one accumulation step (the divisor of dapo /
    cispo / vespo is num_items_in_batch itself, default the batch's completion tokens). loss_type "frpo"
    gives FRPO with the same masks and ratios (spec_frpo_policy)."""
    mask = mask.double()
    logp, entropy = spec_logp_and_entropy(logits, ids, temperature)
    adv = advantages.double().unsqueeze(1)
    old = logp.detach() if old_logps is None else old_logps.double()
    is_ratio = None if importance_sampling_ratio is None else importance_sampling_ratio.double()
    entropy_mask = None if top_entropy_quantile >= 1.0 else spec_entropy_mask(entropy, mask, top_entropy_quantile)
    off_mask = None
    if off_policy_mask_threshold is not None:
        sampling = old if sampling_logps is None else sampling_logps.double()
        off_mask = spec_off_policy_mask(adv, logp, sampling, mask, off_policy_mask_threshold)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)
    per_token_kl = None
    if beta != 0.0:
        diff = ref_logps.double() - logp
        per_token_kl = torch.exp(diff) - diff - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    metrics = {}
    if loss_type == "frpo":
        q = torch.ones_like(mask)
        for factor in (off_mask, entropy_mask, is_ratio):
            if factor is not None:
                q = q * factor
        loss = spec_frpo_policy(log_iw, mask, q, advantages.double(), group_size, group_ids, lam, jackknife,
                                baseline, epsilon_low, epsilon_high, delta)
        if per_token_kl is not None:
            loss = loss + ((beta * per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        if loss_type == "cispo":
            clamped = torch.clamp(coef_1, max=epsilon_high).detach()
            per_token_loss = -clamped * adv * logp
            metrics["cispo_clip_ratio"] = (coef_1 > epsilon_high) & (adv > 0)
        elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
            c1 = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
            per_token_loss = -torch.min(c1 * adv, coef_2 * adv)
            metrics["clip_ratio/low_mean"] = (c1 < 1 - epsilon_low) & (adv < 0)
            metrics["clip_ratio/high_mean"] = (c1 > 1 + epsilon_high) & (adv > 0)
        elif loss_type == "sapo":
            tau = torch.where(adv > 0, torch.tensor(sapo_temperature_pos, dtype=torch.float64),
                              torch.tensor(sapo_temperature_neg, dtype=torch.float64))
            per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
        elif loss_type == "vespo":
            phi = spec_gamma_weights(adv, log_ratio, mask, is_ratio, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                                     vespo_lambda_neg)
            per_token_loss = -phi * adv * logp
            metrics["vespo/phi_seq_mean"] = phi
        else:
            raise ValueError(loss_type)
        if off_mask is not None:
            per_token_loss = per_token_loss * off_mask
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if is_ratio is not None and loss_type != "vespo":
            per_token_loss = per_token_loss * is_ratio
        if per_token_kl is not None:
            per_token_loss = per_token_loss + beta * per_token_kl
        if loss_type in ("grpo", "sapo"):
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif loss_type == "bnpo":
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        elif loss_type == "dr_grpo":
            loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * (max_completion_length or mask.shape[1]))
        elif loss_type in ("cispo", "dapo", "vespo"):
            items = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
            loss = (per_token_loss * mask).sum() / items
        else:  # luspo
            loss = (per_token_loss * mask).sum(-1).mean()
    if entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * ((entropy * effective).sum() / effective.sum().clamp(min=1.0))
    if per_token_kl is not None:
        metrics["kl"] = per_token_kl
    effective = mask if entropy_mask is None else mask * entropy_mask
    metrics["entropy_bonus/sum"] = (entropy * effective).sum()
    metrics["entropy_bonus/count"] = effective.sum()
    return loss, {name: _spec_mean(value, mask) if value.dim() == 2 else value for name, value in metrics.items()}


def _spec_mean(x, mask):
    """TRL's global_masked_mean on one process: [B, 1] per row, else per completion token."""
    x = x.double()
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def spec_frpo_policy(log_iw, mask, q, advantages, group_size, group_ids, lam, jackknife, baseline, epsilon_low,
                     epsilon_high, delta):
    """FRPO's policy term with per-token factors q, as loops: o_i = sum_t m q min(c1, c2) / T_i (T_i = sum_t m),
    s_i = exp(-A_i / lam) o_i; rows with sum_t m q = 0 are no samples."""
    batch, length = mask.shape
    if group_ids is None:
        groups = [list(range(g, g + group_size)) for g in range(0, batch, group_size)]
    else:
        members = {}
        for i, g in enumerate(group_ids.tolist()):
            members.setdefault(g, []).append(i)
        groups = [members[g] for g in sorted(members)]
    o, log_s = {}, {}
    for i in range(batch):
        if float((mask[i] * q[i]).sum()) == 0:
            continue
        total = 0
        for t in range(length):
            r = torch.exp(log_iw[i, t if log_iw.shape[1] > 1 else 0])
            c2 = torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high)
            c1 = r if delta is None else torch.clamp(r, max=delta)
            total = total + mask[i, t] * q[i, t if q.shape[1] > 1 else 0] * torch.minimum(c1, c2)
        o[i] = total / max(float(mask[i].sum()), 1.0)
        log_s[i] = -float(advantages[i]) / lam + torch.log(o[i])
    terms, offsets = [], []
    for members in groups:
        rows = [i for i in members if i in log_s]
        n = len(rows)
        if n == 0:
            continue
        log_u = torch.logsumexp(torch.stack([log_s[i] for i in rows]), 0) - math.log(n)
        offsets.append(sum(o[i] for i in rows) / n)
        if not jackknife or n == 1:
            terms.append(log_u)
            continue
        loo = [torch.logsumexp(torch.stack([log_s[j] for j in rows if j != i]), 0) - math.log(n - 1) for i in rows]
        terms.append(n * log_u - (n - 1) * sum(loo) / n)
    robust = sum(terms) / len(terms)
    if baseline:
        robust = robust - sum(offsets) / len(offsets)
    return max(lam, 1.0) * robust
