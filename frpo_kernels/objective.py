"""The O(B*T) part of the loss: from per-token log-probs to the scalar FRPO / GRPO-family loss.

Readable torch; every formula of the issue lives here once. Shapes: [B, T] tokens, [B] sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frpo_kernels.groups import Groups, group_log_mean

LOSS_TYPES = ("frpo", "grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "frpo"
    lam: float = 1.0
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    jackknife: bool = True
    baseline: bool = True
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """T_i = max(sum_t m_it, 1), [B, 1]."""
    return mask.sum(-1, keepdim=True).clamp_min(1)


def clipped_ratios(logp, old, mask, cfg: LossConfig):
    """(c1, c2): the ratio (delta-capped) and its clip; [B, T] or [B, 1] for sequence-level IS."""
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / sequence_lengths(mask)
    ratio = torch.exp(log_ratio)
    c2 = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    c1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    return c1, c2


def token_weights(mask, cfg: LossConfig) -> torch.Tensor:
    """w [B, T] with loss = sum(w * per-token term): the loss type's normalisation of token sums."""
    batch, length = mask.shape
    if cfg.loss_type in ("grpo", "frpo"):
        return mask / (sequence_lengths(mask) * batch)
    if cfg.loss_type in ("bnpo", "dapo"):
        return mask / mask.sum().clamp_min(1)
    max_len = cfg.max_completion_length or length
    return mask / (batch * max_len)


def k3_kl(logp, ref_logps):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    diff = ref_logps - logp
    return torch.exp(diff) - diff - 1


def kl_weights(mask, cfg: LossConfig):
    """The loss is policy_loss + sum(kl_weights * k3_kl): beta times the loss type's token weights."""
    return cfg.beta * token_weights(mask, cfg)


def policy_loss(logp, old, mask, advantages, groups: Groups, cfg: LossConfig):
    """The loss without its KL term. Returns (scalar, details) with details for the metrics."""
    c1, c2 = clipped_ratios(logp, old, mask, cfg)
    adv = advantages.unsqueeze(-1)
    details = {"c1": c1, "adv": adv}
    if cfg.loss_type != "frpo":
        per_token = -torch.minimum(c1 * adv, c2 * adv)
        return (token_weights(mask, cfg) * per_token).sum(), details
    lengths = sequence_lengths(mask).squeeze(-1)
    w = torch.exp(-adv / cfg.lam)
    s = (mask * torch.minimum(c1 * w, c2 * w)).sum(-1) / lengths
    robust, u = group_log_mean(s, groups, cfg.jackknife)
    if cfg.baseline:
        offset = (mask * torch.minimum(c1, c2)).sum(-1) / lengths
        robust = robust - groups.mean(offset).mean()
    details.update(w=w, u=u)
    return max(cfg.lam, 1.0) * robust, details
