"""The O(B*T) part of the loss: from per-token log-probs to the scalar FRPO / GRPO-family loss.

Readable torch; every formula of the issue lives here once, but the loss types' own per-token surrogates,
normalisers and metrics, which are loss_types.py's table. Shapes: [B, T] tokens, [B] sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frpo_kernels.config import LossConfig
from frpo_kernels.groups import Groups, group_log_terms
from frpo_kernels.lam_auto import lam_scale
from frpo_kernels.loss_types import TokenTerms
from frpo_kernels.ratios import level_log_ratio, log_min_ratio, log_ratios, sequence_lengths


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
    return cfg.kind.normaliser.weights(mask, size or BatchSize.of(mask), cfg)


def k3_kl(logp, ref_logps):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    diff = ref_logps - logp
    return torch.exp(diff) - diff - 1


def per_token_kl(logp, old, ref_logps, mask, cfg: LossConfig):
    """The KL term's per-token value: k3, times the importance ratio pi / pi_old at the importance-sampling
    level with use_bias_correction_kl (TRL's, after DeepSeek-V3.2: neither clipped nor delta-capped, and
    differentiable, so it changes the gradient on-policy too, where its value is 1)."""
    kl = k3_kl(logp, ref_logps)
    if cfg.use_bias_correction_kl:
        kl = kl * torch.exp(level_log_ratio(logp, old, mask, cfg))
    return kl


def kl_weights(mask, cfg: LossConfig, size: BatchSize | None = None):
    """The loss is policy_loss + sum(kl_weights * per_token_kl): beta times the loss type's token weights
    (the KL term is not multiplied by the masks and ratios q)."""
    return cfg.beta * token_weights(mask, cfg, size)


def off_policy_mask(advantages, logp, sampling_logps, mask, threshold):
    """TRL's off-policy sequence mask (DeepSeek-V3.2) [B, 1]: 0 for a row with A < 0 whose mean over its
    tokens of sampling_logps - logp (detached; NaN counts 0) exceeds threshold, else 1."""
    kl = torch.nan_to_num(sampling_logps - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / sequence_lengths(mask)
    return ((advantages.unsqueeze(-1) >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def high_entropy_mask(entropy, mask, top_entropy_quantile):
    """TRL's get_high_entropy_mask [B, T] bool: the completion tokens whose entropy is at least the
    (1 - top_entropy_quantile) quantile (linear interpolation) of all completion tokens' entropies (pass
    every rank's: the quantile is over the global batch). In the entropies' own dtype, as TRL (float32)."""
    entropy = entropy.detach()
    chosen = entropy[mask != 0]
    if chosen.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    return (entropy >= torch.quantile(chosen, 1 - top_entropy_quantile)) & (mask != 0)


def token_scale(cfg: LossConfig, importance_sampling_ratio=None, row_mask=None, entropy_mask=None):
    """q [B, T] (or [B, 1]) = off-policy row mask * entropy mask * importance-sampling ratio, the factor of
    each token's policy loss (None when there is none). A loss type that reads the ratio itself (vespo)
    does not take it here."""
    ratio = None if cfg.kind.ratio_inside else importance_sampling_ratio
    factors = [f for f in (row_mask, None if entropy_mask is None else entropy_mask.to(torch.float64), ratio)
               if f is not None]
    if not factors:
        return None
    q = factors[0]
    for factor in factors[1:]:
        q = q * factor
    return q.detach()


def mean_bonus_entropy(entropy, mask, entropy_mask=None, tokens=None):
    """The entropy bonus's mean entropy sum(H * m_eff) / sum(m_eff), m_eff = mask * entropy_mask (TRL's
    effective mask); the loss subtracts entropy_coef times it. tokens: the denominator of a micro-batch's
    share (group_stats: the whole batch's completion tokens)."""
    effective = mask if entropy_mask is None else mask * entropy_mask
    denominator = effective.sum().clamp(min=1.0) if tokens is None else tokens
    return (entropy * effective).sum() / denominator


def policy_loss(logp, old, mask, advantages, groups: Groups, cfg: LossConfig, stats=None, lams=None, q=None,
                importance_sampling_ratio=None):
    """The loss without its KL term and entropy bonus. Returns (scalar, details) with details for the metrics.

    old must be finite wherever mask != 0 (masked positions are never read). With stats (a
    GroupStats of the whole generation batch; groups then index into its groups) the rows are a
    micro-batch and the result is their share: the shares of any partition of the batch add up to
    the whole batch's loss, in value and gradient. lams [groups.num]: each group's lam (FRPO,
    lam_auto.resolve_group_lams). q: token_scale's factor; importance_sampling_ratio: read by a loss
    type that takes it inside its surrogate (q has it for the others)."""
    kind = cfg.kind
    if kind.group_coupled:
        return frpo_policy_loss(logp, old, mask, advantages, groups, cfg, stats, lams, q)
    terms = TokenTerms(logp, level_log_ratio(logp, old, mask, cfg), logp - old, advantages.unsqueeze(-1), mask,
                       importance_sampling_ratio)
    per_token, details = kind.surrogate(terms, cfg)
    if q is not None:
        per_token = per_token * q
    return (token_weights(mask, cfg, None if stats is None else stats.size) * per_token).sum(), details


def frpo_policy_loss(logp, old, mask, advantages, groups: Groups, cfg: LossConfig, stats, lams, q=None):
    """FRPO's term max(lam, 1) * [mean_g J_g(s) - baseline mean_g mean_i o_i] (each group's own lam_g),
    s_i = w_i o_i, o_i = sum_t m_t q_t min(c1, c2) / T_i (frpo_log_terms)."""
    log_ratio = log_ratios(logp, old, mask, cfg, torch.ones_like(advantages.unsqueeze(-1), dtype=torch.bool))
    lam_rows = groups.broadcast(lams)
    log_s, log_o, valid = frpo_log_terms(log_ratio, mask, advantages, cfg, lam_rows, q)
    if stats is None:
        robust, log_u = frpo_group_term(log_s, log_o, valid, groups, cfg, lam_scale(lams))
    else:
        robust, log_u = stats.frpo_share(log_s, log_o, valid, groups.index), stats.log_u
    return robust, dict(log_ratio=log_ratio, log_w=-advantages / lam_rows, log_u=log_u,
                        lams=lams if cfg.auto_lam else None)


def _needs_two_passes(cfg: LossConfig) -> bool:
    """A mask decided during the loss (off-policy rows need the log-probs, low-entropy tokens the
    entropies) or the bias-corrected KL (k3 * r is not the kernels' KL term): the objective needs a
    forward pass first. The entropy bonus alone does not: its token coefficient -coef * m / sum(m) is
    known up front, and the kernels add its gradient in the same sweep."""
    return cfg.masks_tokens or (cfg.beta != 0 and cfg.use_bias_correction_kl)


def is_token_local(cfg: LossConfig) -> bool:
    """Whether a token's gradient coefficient needs only that token (its logp, old and ref log-probs,
    its row's advantage, its constant importance-sampling ratio and the batch's normaliser): then one
    fused sweep serves off-policy too (the loss type's kernel gate). FRPO (group log-means),
    sequence-level IS (a row's mean log-ratio), vespo (a row's gamma weight) and the options of
    _needs_two_passes need statistics first."""
    return cfg.kind.token_local and cfg.importance_sampling_level == "token" and not _needs_two_passes(cfg)


def one_pass_serves(cfg: LossConfig, on_policy: bool) -> bool:
    """Whether the fused sweep serves this loss: on-policy (ratios 1: each token's coefficient follows
    from the advantages, groups and constant ratios) or token-local, unless _needs_two_passes."""
    return (on_policy and not _needs_two_passes(cfg)) or is_token_local(cfg)


def fused_ratio_gate(mask, advantages, cfg: LossConfig, size: BatchSize | None = None, q=None):
    """A token-local loss's gradient off-policy as the kernels' gate: (coef [B, T], RatioGate without its
    old_logps) with d policy_loss / d logp = coef * gate(logp - old): coef = -w A q (w the token weights,
    q a constant importance-sampling ratio), the gate the loss type's (loss_types.LossType.gate)."""
    adv = advantages.unsqueeze(-1).expand_as(mask)
    coef = -token_weights(mask, cfg, size) * adv
    if q is not None:
        coef = coef * q
    lo, hi, kind = cfg.kind.gate(adv, cfg)
    return coef, lo, hi, kind  # lo, hi: float64 (loss_types' gates)


def frpo_log_terms(log_ratio, mask, advantages, cfg: LossConfig, lam=None, q=None):
    """(log s_i, log o_i, valid_i) [B]: s_i = w_i * o_i, w_i = exp(-A_i / lam), o_i = sum_t m_t q_t min(c1, c2)
    / T_i over the row's tokens (T_i = sum_t m_t; q: token_scale's masks and ratios, 1 if None); valid: the
    row has a token with m_t q_t > 0 (a row that the masks leave empty is no sample, like a row without
    completion tokens). In the log domain, so exp(-A/lam) never overflows, whatever lam. lam: cfg.lam, or
    each row's [B]."""
    lam = cfg.lam if lam is None else lam
    weight = mask if q is None else mask * q.detach()
    valid = weight.sum(-1) > 0
    log_min = log_min_ratio(log_ratio, cfg)
    if cfg.importance_sampling_level == "sequence":
        log_o = log_min.squeeze(-1)
        if q is not None:  # min(c1, c2) is the row's: o_i = min(c1, c2) * sum_t m_t q_t / T_i
            log_o = log_o + torch.log(weight.sum(-1)) - torch.log(sequence_lengths(mask).squeeze(-1))
    else:
        positive = weight > 0
        weighted = torch.where(positive, log_min + torch.log(torch.where(positive, weight, torch.ones_like(weight))),
                               torch.full_like(log_min, float("-inf")))
        weighted = torch.where(valid.unsqueeze(-1), weighted, torch.zeros_like(weighted))
        log_o = torch.logsumexp(weighted, -1) - torch.log(sequence_lengths(mask).squeeze(-1))
    return -advantages / lam + log_o, log_o, valid


def frpo_group_term(log_s, log_o, valid, groups: Groups, cfg: LossConfig, scale):
    """J = mean_g scale_g [jackknifed] log mean_i s_i  (- mean_g scale_g mean_i o_i with the baseline), scale
    [num]: lam_scale of each group's lam.

    Rows that are not samples (valid False) are left out of every group statistic (n_g counts the valid
    rows; a group left with none drops out). Returns (J, log_u [num])."""
    terms, log_u, _, _ = group_log_terms(log_s, valid, groups, cfg.jackknife)
    n = groups.sum(valid.to(terms.dtype))
    count = (n > 0).sum().clamp_min(1)
    robust = (terms * scale).sum() / count
    if cfg.baseline:
        o = torch.where(valid, torch.exp(log_o), torch.zeros_like(log_o))
        offsets = groups.sum(o) / n.clamp_min(1)
        robust = robust - (offsets * scale).sum() / count
    return robust, log_u
