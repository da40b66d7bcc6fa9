"""An independent float64 spec of the published formulas, written as plain loops.

It shares no code with frpo_kernels: a second reading of the issue's formulas, slow but obvious.
"""
import math

import torch


def spec_token_logp(logits, ids, temperature):
    batch, length, _ = logits.shape
    out = torch.zeros(batch, length, dtype=torch.float64)
    rows = []
    for b in range(batch):
        row = []
        for t in range(length):
            z = logits[b, t].double() / temperature
            row.append(z[ids[b, t]] - torch.logsumexp(z, dim=0))
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else out


def spec_group_members(batch, group_size, group_ids):
    if group_ids is None:
        return [list(range(g, g + group_size)) for g in range(0, batch, group_size)]
    members = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)
    return [members[g] for g in sorted(members)]


def spec_std(vals):
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def spec_advantages(rewards, groups, scale):
    """scale: True or "group" (group std), "batch" (std of all rewards, as TRL), False or "none"."""
    adv = [None] * len(rewards)
    for members in groups:
        vals = [rewards[i] for i in members]
        mean = sum(vals) / len(vals)
        std = spec_std(vals) if scale in (True, "group") else spec_std(rewards) if scale == "batch" else None
        for i in members:
            adv[i] = rewards[i] - mean if std is None else (rewards[i] - mean) / (std + 1e-4)
    return adv


def spec_logsumexp(values):
    return torch.logsumexp(torch.stack(values), dim=0)


def spec_loss(logits, ids, mask, *, advantages=None, rewards=None, group_size=None, group_ids=None,
              old_logps=None, ref_logps=None, loss_type="frpo", lam=1.0, beta=0.0, epsilon_low=0.2,
              epsilon_high=0.2, delta=None, jackknife=True, baseline=True,
              importance_sampling_level="token", scale_rewards=False, temperature=1.0,
              max_completion_length=None, group_lams=None):
    """group_lams: one lam per group (in sorted group-id order) in place of lam, each group's term and
    baseline scaled by its own max(lam_g, 1) (lam="auto")."""
    batch, length, _ = logits.shape
    groups = spec_group_members(batch, group_size, group_ids)
    if advantages is None:
        adv = spec_advantages([float(r) for r in rewards.double()], groups, scale_rewards)
    else:
        adv = [float(a) for a in advantages.double()]
    logp = spec_token_logp(logits, ids, temperature)
    old = logp.detach() if old_logps is None else old_logps.double()
    m = mask.double()

    def ratios(i):
        if importance_sampling_level == "token":
            rs = [torch.exp(logp[i, t] - old[i, t]) for t in range(length)]
        else:
            n = max(float(m[i].sum()), 1.0)
            r = torch.exp(sum(m[i, t] * (logp[i, t] - old[i, t]) for t in range(length)) / n)
            rs = [r] * length
        out = []
        for r in rs:
            c2 = torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high)
            c1 = r if delta is None else torch.clamp(r, max=delta)
            out.append((c1, c2))
        return out

    def kl(i, t):
        d = ref_logps[i, t].double() - logp[i, t]
        return torch.exp(d) - d - 1

    T = [max(float(m[i].sum()), 1.0) for i in range(batch)]
    if loss_type != "frpo":
        per_tok = []
        for i in range(batch):
            rc = ratios(i)
            row = []
            for t in range(length):
                c1, c2 = rc[t]
                val = -torch.minimum(c1 * adv[i], c2 * adv[i])
                if beta != 0:
                    val = val + beta * kl(i, t)
                row.append(m[i, t] * val)
            per_tok.append(row)
        if loss_type == "grpo":
            return sum(sum(per_tok[i]) / T[i] for i in range(batch)) / batch
        if loss_type in ("bnpo", "dapo"):
            return sum(sum(r) for r in per_tok) / max(float(m.sum()), 1.0)
        lmax = max_completion_length or length
        return sum(sum(r) for r in per_tok) / (batch * lmax)

    # FRPO. Rows with no completion token are not samples: groups count only rows with a token.
    # log s_i = -A_i/lam + log o_i, all group means as log-sum-exps (exp(-A/lam) overflows for small lam).
    row_lam = {i: lam if group_lams is None else float(group_lams[g])
               for g, members in enumerate(groups) for i in members}
    log_s, o = {}, {}
    for i in range(batch):
        if float(m[i].sum()) == 0:
            continue
        rc = ratios(i)
        o[i] = sum(m[i, t] * torch.minimum(rc[t][0], rc[t][1]) for t in range(length)) / T[i]
        log_s[i] = -adv[i] / row_lam[i] + torch.log(o[i])
    terms, offsets, scales = [], [], []
    for g, members in enumerate(groups):
        rows = [i for i in members if i in log_s]
        n = len(rows)
        if n == 0:
            continue
        scales.append(1.0 if group_lams is None else max(float(group_lams[g]), 1.0))
        log_u = spec_logsumexp([log_s[i] for i in rows]) - math.log(n)
        offsets.append(sum(o[i] for i in rows) / n)
        if not jackknife or n == 1:
            terms.append(log_u)
            continue
        loo = [spec_logsumexp([log_s[j] for j in rows if j != i]) - math.log(n - 1) for i in rows]
        terms.append(n * log_u - (n - 1) * sum(loo) / n)
    if not baseline:
        offsets = [0.0] * len(terms)
    if group_lams is not None:
        result = sum(c * (t - b) for c, t, b in zip(scales, terms, offsets)) / len(terms) if terms \
            else (logp * 0).sum()
    else:
        robust = sum(terms) / len(terms) if terms else (logp * 0).sum()  # no token at all: 0
        if baseline and offsets:
            robust = robust - sum(offsets) / len(offsets)
        result = max(lam, 1.0) * robust
    if beta != 0:
        result = result + beta * sum(
            sum(m[i, t] * kl(i, t) for t in range(length)) / T[i] for i in range(batch)) / batch
    return result
