"""The O(B*T) part of the loss: from per-token log-probs to the scalar FRPO / GRPO-family loss.

Readable torch; every formula of the issue lives here once. Shapes: [B, T] tokens, [B] sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from frpo_kernels.config import LossConfig
from frpo_kernels.groups import Groups, group_log_terms


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """T_i = max(sum_t m_it, 1), [B, 1]."""
    return mask.sum(-1, keepdim=True).clamp_min(1)


def log_ratios(logp, old, mask, cfg: LossConfig, positive):
    """log(pi/pi_old) per token [B, T] (per sequence [B, 1] for sequence-level IS), capped only where
    the cap cannot change the loss: past the point where both c1 and c2 are constant, the token's value
    is fixed and its gradient 0. For a positive factor (A >= 0, or FRPO's w) that is the clip at
    1 + epsilon_high; for a negative one, max(delta, 1 + epsilon_high) (no point without delta).
    So a ratio that would overflow (old_logps far below logp) never reaches exp, whose inf would turn
    that zero gradient into NaN. positive: [B, 1] bool."""
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / sequence_lengths(mask)
    clip_high = math.log1p(cfg.epsilon_high)
    negative_cap = math.inf if cfg.delta is None else max(math.log(cfg.delta), clip_high) + 1.0
    return torch.where(positive, log_ratio.clamp(max=clip_high + 1.0), log_ratio.clamp(max=negative_cap))


def clipped_ratios(log_ratio, cfg: LossConfig):
    """(c1, c2): the ratio (delta-capped) and its clip to [1 - epsilon_low, 1 + epsilon_high]."""
    ratio = torch.exp(log_ratio)
    c2 = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    c1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    return c1, c2


def log_min_ratio(log_ratio, cfg: LossConfig):
    """log(min(c1, c2)), formed from the log-ratio (no exp, so no overflow or underflow)."""
    log_c1 = log_ratio if cfg.delta is None else log_ratio.clamp(max=math.log(cfg.delta))
    low = math.log(1 - cfg.epsilon_low) if cfg.epsilon_low < 1 else None
    return torch.minimum(log_c1, log_ratio.clamp(min=low, max=math.log1p(cfg.epsilon_high)))


@dataclass(frozen=True)
class BatchSize:
    """What the loss types normalise by: the whole batch's rows, completion tokens and length T.
    A micro-batch scored against group statistics (group_stats.py) uses the whole batch's."""
    rows: float
    tokens: float
    length: int

    @classmethod
    def of(cls, mask):
        return cls(mask.shape[0], mask.sum().clamp_min(1), mask.shape[1])


def token_weights(mask, cfg: LossConfig, size: BatchSize | None = None) -> torch.Tensor:
    """w [B, T] with loss = sum(w * per-token term): the loss type's normalisation of token sums."""
    size = size or BatchSize.of(mask)
    if cfg.loss_type in ("grpo", "frpo"):
        return mask / (sequence_lengths(mask) * size.rows)
    if cfg.loss_type in ("bnpo", "dapo"):
        return mask / size.tokens
    return mask / (size.rows * (cfg.max_completion_length or size.length))


def k3_kl(logp, ref_logps):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    diff = ref_logps - logp
    return torch.exp(diff) - diff - 1


def kl_weights(mask, cfg: LossConfig, size: BatchSize | None = None):
    """The loss is policy_loss + sum(kl_weights * k3_kl): beta times the loss type's token weights."""
    return cfg.beta * token_weights(mask, cfg, size)


def policy_loss(logp, old, mask, advantages, groups: Groups, cfg: LossConfig, stats=None, lams=None):
    """The loss without its KL term. Returns (scalar, details) with details for the metrics.

    old must be finite wherever mask != 0 (masked positions are never read). With stats (a
    GroupStats of the whole generation batch; groups then index into its groups) the rows are a
    micro-batch and the result is their share: the shares of any partition of the batch add up to
    the whole batch's loss, in value and gradient. lams [groups.num]: each group's lam (lam="auto")."""
    adv = advantages.unsqueeze(-1)
    positive = torch.ones_like(adv, dtype=torch.bool) if cfg.loss_type == "frpo" else adv >= 0
    log_ratio = log_ratios(logp, old, mask, cfg, positive)
    c1, c2 = clipped_ratios(log_ratio, cfg)
    details = {"c1": c1, "adv": adv, "log_ratio": log_ratio}
    if cfg.loss_type != "frpo":
        per_token = -torch.minimum(c1 * adv, c2 * adv)
        return (token_weights(mask, cfg, None if stats is None else stats.size) * per_token).sum(), details
    lam = cfg.lam if lams is None else groups.broadcast(lams)
    scale = None if lams is None else lams.clamp_min(1.0)  # max(lam_g, 1) inside the mean over groups
    log_s, log_o, valid = frpo_log_terms(log_ratio, mask, advantages, cfg, lam)
    if stats is None:
        robust, log_u = frpo_group_term(log_s, log_o, valid, groups, cfg, scale)
    else:
        robust, log_u = stats.frpo_share(log_s, log_o, valid, groups.index), stats.log_u
    details.update(log_w=-advantages / lam, log_u=log_u, lams=lams)
    return (1.0 if lams is not None else max(cfg.lam, 1.0)) * robust, details


def is_token_local(cfg: LossConfig) -> bool:
    """Whether a token's gradient coefficient needs only that token (its logp, old and ref log-probs,
    its row's advantage and the batch's normaliser): then one fused sweep serves off-policy too. FRPO
    (group log-means) and sequence-level IS (a row's mean log-ratio) need statistics first."""
    return cfg.loss_type != "frpo" and cfg.importance_sampling_level == "token"


def positive_clip_cap(cfg: LossConfig) -> float:
    """The log-ratio above which min(c1, c2) (times a factor >= 0) is constant: the clip at
    1 + epsilon_high, or delta where that is lower."""
    clip_high = math.log1p(cfg.epsilon_high)
    return clip_high if cfg.delta is None else min(clip_high, math.log(cfg.delta))


def clipped_ratio_gate(mask, advantages, cfg: LossConfig, size: BatchSize | None = None):
    """The token-local losses' gradient off-policy as the kernels' gate: (coef, lo, hi) [B, T] with
    d policy_loss / d logp = coef * r where lo <= log r <= hi, else 0 (r = exp(logp - old)).

    -min(c1 A, c2 A) moves with r only where the min's active branch does: for A > 0 up to the
    clip at 1 + epsilon_high (and delta, if lower); for A < 0 from 1 - epsilon_low on, up to delta
    if given (past max(delta, 1 + epsilon_high) both branches are constant)."""
    adv = advantages.unsqueeze(-1).expand_as(mask)
    coef = -token_weights(mask, cfg, size) * adv
    clip_high = math.log1p(cfg.epsilon_high)
    log_delta = math.inf if cfg.delta is None else math.log(cfg.delta)
    clip_low = math.log(1 - cfg.epsilon_low) if cfg.epsilon_low < 1 else -math.inf
    lo = torch.where(adv < 0, clip_low, -math.inf)
    hi = torch.where(adv < 0, max(log_delta, clip_high), positive_clip_cap(cfg))
    return coef, lo.to(mask.dtype), hi.to(mask.dtype)


def frpo_log_terms(log_ratio, mask, advantages, cfg: LossConfig, lam=None):
    """(log s_i, log o_i, valid_i) [B]: s_i = w_i * o_i, w_i = exp(-A_i / lam), o_i = mean_t min(c1, c2)
    over the row's tokens; valid: the row has a completion token. In the log domain, so exp(-A/lam)
    never overflows, whatever lam. lam: cfg.lam, or each row's [B] (lam="auto")."""
    lam = cfg.lam if lam is None else lam
    valid = mask.sum(-1) > 0
    log_min = log_min_ratio(log_ratio, cfg)
    if cfg.importance_sampling_level == "sequence":
        log_o = log_min.squeeze(-1)
    else:
        weighted = torch.where(mask > 0, log_min + torch.log(torch.where(mask > 0, mask, torch.ones_like(mask))),
                               torch.full_like(log_min, float("-inf")))
        weighted = torch.where(valid.unsqueeze(-1), weighted, torch.zeros_like(weighted))
        log_o = torch.logsumexp(weighted, -1) - torch.log(sequence_lengths(mask).squeeze(-1))
    return -advantages / lam + log_o, log_o, valid


def frpo_group_term(log_s, log_o, valid, groups: Groups, cfg: LossConfig, scale=None):
    """J = mean_g [jackknifed] log mean_i s_i  (- mean_g mean_i o_i with the baseline), each group's
    term times scale_g when scale [num] is given.

    Rows with no completion token are not samples: they are left out of every group statistic
    (n_g counts rows with a token; a group left with none drops out). Returns (J, log_u [num])."""
    terms, log_u, _, _ = group_log_terms(log_s, valid, groups, cfg.jackknife)
    n = groups.sum(valid.to(terms.dtype))
    count = (n > 0).sum().clamp_min(1)
    robust = (terms if scale is None else terms * scale).sum() / count
    if cfg.baseline:
        o = torch.where(valid, torch.exp(log_o), torch.zeros_like(log_o))
        offsets = groups.sum(o) / n.clamp_min(1)
        robust = robust - (offsets if scale is None else offsets * scale).sum() / count
    return robust, log_u
