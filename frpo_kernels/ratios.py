"""Importance ratios pi / pi_old at the token or sequence level, and their clips, kept in the log domain.

Shared by the loss types' surrogates (loss_types.py) and the objective (objective.py). Shapes: [B, T]
tokens; a sequence-level log-ratio is [B, 1].
"""
from __future__ import annotations

import math

import torch


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """T_i = max(sum_t m_it, 1), [B, 1]."""
    return mask.sum(-1, keepdim=True).clamp_min(1)


def level_log_ratio(logp, old, mask, cfg):
    """log(pi / pi_old) at cfg.importance_sampling_level: per token [B, T], or the row's masked mean [B, 1]
    ("sequence", GSPO's). Uncapped: callers that exponentiate cap it where the cap changes nothing."""
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        return (log_ratio * mask).sum(-1, keepdim=True) / sequence_lengths(mask)
    return log_ratio


def log_ratios(logp, old, mask, cfg, positive):
    """log(pi/pi_old) per token [B, T] (per sequence [B, 1] for sequence-level IS), capped only where
    the cap cannot change the loss: past the point where both c1 and c2 are constant, the token's value
    is fixed and its gradient 0. For a positive factor (A >= 0, or FRPO's w) that is the clip at
    1 + epsilon_high; for a negative one, max(delta, 1 + epsilon_high) (no point without delta).
    So a ratio that would overflow (old_logps far below logp) never reaches exp, whose inf would turn
    that zero gradient into NaN. positive: [B, 1] bool."""
    return cap_log_ratio(level_log_ratio(logp, old, mask, cfg), cfg, positive)


def cap_log_ratio(log_ratio, cfg, positive):
    """log_ratios' cap on a level's log-ratio (see there)."""
    clip_high = math.log1p(cfg.epsilon_high)
    negative_cap = math.inf if cfg.delta is None else max(math.log(cfg.delta), clip_high) + 1.0
    return torch.where(positive, log_ratio.clamp(max=clip_high + 1.0), log_ratio.clamp(max=negative_cap))


def clipped_ratios(log_ratio, cfg):
    """(c1, c2): the ratio (delta-capped) and its clip to [1 - epsilon_low, 1 + epsilon_high]."""
    ratio = torch.exp(log_ratio)
    c2 = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    c1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    return c1, c2


def log_min_ratio(log_ratio, cfg):
    """log(min(c1, c2)), formed from the log-ratio (no exp, so no overflow or underflow)."""
    log_c1 = log_ratio if cfg.delta is None else log_ratio.clamp(max=math.log(cfg.delta))
    low = math.log(1 - cfg.epsilon_low) if cfg.epsilon_low < 1 else None
    return torch.minimum(log_c1, log_ratio.clamp(min=low, max=math.log1p(cfg.epsilon_high)))


def positive_clip_cap(cfg) -> float:
    """The log-ratio above which min(c1, c2) (times a factor >= 0) is constant: the clip at
    1 + epsilon_high, or delta where that is lower."""
    clip_high = math.log1p(cfg.epsilon_high)
    return clip_high if cfg.delta is None else min(clip_high, math.log(cfg.delta))
