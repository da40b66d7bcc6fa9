"""The loss types: one table from a name to everything that differs between them. config.py,
objective.py, loss.py and group_stats.py read it; no other module names a loss type.

An entry (LossType) gives
  surrogate        the per-token policy loss l [B, T] ([B, 1] with a sequence-level ratio) from TokenTerms;
                   None for FRPO, whose term couples the rows of a group (objective.frpo_policy_loss)
  normaliser       the token weights w [B, T] with loss = sum(w * q * l) (q: the masks and the importance-
                   sampling ratio, objective.token_scale); the KL term uses the same weights
  levels           the importance_sampling_levels it takes; advised_level: the one TRL advises (TRL warns
                   otherwise, and so does LossConfig, with level_advice)
  gate             off-policy at token-level IS, d loss / d logp of a token is -w A q times a function of
                   its own ratio, one of the kernels' gates (torch_reference.py): gate(advantages, cfg) ->
                   (lo, hi, kind). So one fused sweep serves it (token_local); None: two passes
  value_reads_logp the value is linear in logp itself, not only through ratios (cispo, vespo): the fused
                   on-policy path takes the value at the kernel's logp rather than at a probe
  ratio_inside     importance_sampling_ratio enters the surrogate (vespo's gamma weights, per token only)
                   instead of multiplying the per-token loss
  metrics          what the trainer logs of it (TRL's names): clip counts, weights

The formulas are TRL 1.16's GRPOTrainer._compute_loss (see README.md, "The loss").

Adding a loss type: write its surrogate here (and a normaliser, if none fits), add one LossType to
TYPES, and add its case to tests/spec_trl_losses.py and tests/test_loss_types.py. Nothing else changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from frpo_kernels.backends.torch_reference import GATE_CAPPED, GATE_SOFT, GATE_WINDOW
from frpo_kernels.ratios import cap_log_ratio, clipped_ratios, positive_clip_cap, sequence_lengths

IS_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------------- normalisers

@dataclass(frozen=True)
class Normaliser:
    """How token sums become the loss: weights(mask, size, cfg) -> w [B, T]; size: objective.BatchSize of
    the whole batch (its rows, completion tokens and length T)."""
    divides_by: str
    weights: Callable
    takes_num_items: bool = False  # divides by num_items_in_batch when it is given
    reads_max_completion_length: bool = False
    batch_token_mean: bool = False  # divides by the token count of the batch passed (TRL: of each process's)


SEQUENCE_MEAN = Normaliser(
    "each row's token sum by its length T_i, then the mean over rows",
    lambda mask, size, cfg: mask / (sequence_lengths(mask) * size.rows))
BATCH_TOKENS = Normaliser(
    "the completion tokens of the batch passed (all ranks' with process_group, the whole batch's with "
    "group_stats; TRL: each process's micro-batch)",
    lambda mask, size, cfg: mask / size.tokens, batch_token_mean=True)
ROWS_TIMES_LENGTH = Normaliser(
    "rows x max_completion_length (default: T)",
    lambda mask, size, cfg: mask / (size.rows * (cfg.max_completion_length or size.length)),
    reads_max_completion_length=True)
SEQUENCE_SUM = Normaliser(
    "the mean over rows of each row's token sum",
    lambda mask, size, cfg: mask / size.rows)
ITEMS_IN_BATCH = Normaliser(
    "num_items_in_batch, by default the completion tokens of the batch passed (all ranks' with "
    "process_group, the whole batch's with group_stats)",
    lambda mask, size, cfg: mask / (size.tokens if cfg.num_items_in_batch is None else cfg.num_items_in_batch),
    takes_num_items=True)


# ---------------------------------------------------------------------------------------------- surrogates

@dataclass
class TokenTerms:
    """What a surrogate reads. Float64; masked positions hold finite values (never read through w)."""
    logp: torch.Tensor             # [B, T] current log-probs: the gradient flows through them
    log_ratio: torch.Tensor        # log(pi / pi_old) at the importance-sampling level, [B, T] or [B, 1], uncapped
    token_log_ratio: torch.Tensor  # [B, T] per token, whatever the level
    advantages: torch.Tensor       # [B, 1]
    mask: torch.Tensor             # [B, T]
    importance_sampling_ratio: torch.Tensor | None  # [B, T] or [B, 1], 1 at masked positions


def clipped_surrogate(t: TokenTerms, cfg):
    """-min(c1 A, c2 A): c1 the ratio (capped at delta if given), c2 its clip to [1 - eps_low, 1 + eps_high]."""
    adv = t.advantages
    c1, c2 = clipped_ratios(cap_log_ratio(t.log_ratio, cfg, adv >= 0), cfg)
    return -torch.minimum(c1 * adv, c2 * adv), {"c1": c1, "adv": adv}


def cispo_surrogate(t: TokenTerms, cfg):
    """-sg[min(r, epsilon_high)] * A * logp: epsilon_high is an absolute cap on the ratio here (TRL's, the
    ScaleRL paper's eps_max), not 1 + epsilon_high."""
    adv, cap = t.advantages, cfg.epsilon_high
    # capped above log(cap) only, where clamp(r, max=cap) is cap either way: no overflow in exp
    ratio = torch.exp(t.log_ratio.clamp(max=(math.log(cap) if cap > 0 else 0.0) + 1.0))
    clamped = torch.clamp(ratio, max=cap).detach()
    return -clamped * adv * t.logp, {"ratio": ratio.detach(), "adv": adv}


def sapo_surrogate(t: TokenTerms, cfg):
    """-sigmoid(tau (r - 1)) * 4 / tau * A, tau = sapo_temperature_pos where A > 0, else sapo_temperature_neg."""
    adv = t.advantages
    tau = torch.where(adv > 0, adv.new_tensor(cfg.sapo_temperature_pos), adv.new_tensor(cfg.sapo_temperature_neg))
    # past tau (r - 1) = 40 the float64 sigmoid is exactly 1 and its derivative 0: the cap changes nothing
    # but keeps exp from overflowing
    ratio = torch.exp(torch.minimum(t.log_ratio, torch.log1p(40.0 / tau)))
    return -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv, {}


# ---------------------------------------------------------------------------------------------- fused gates
# Each gives (lo, hi, kind) [B, T] for advantages [B, T]: d surrogate / d logp = -A * gate(logp - old).
# lo and hi are float64: the kernels compare the log-ratio with them in double, as torch compares the ratio
# with 1 + epsilon (bounds rounded to fp32 moved a clip by up to 3e-8 and opened the gate where torch's is shut).

def _float64(adv, value):
    return torch.tensor(value, dtype=torch.float64, device=adv.device)


def window_gate(adv, cfg):
    """The clipped surrogate's: -min(c1 A, c2 A) moves with r only where the min's active branch does: for
    A > 0 up to the clip at 1 + epsilon_high (and delta, if lower); for A < 0 from 1 - epsilon_low on, up
    to delta if given (past max(delta, 1 + epsilon_high) both branches are constant)."""
    clip_high = math.log1p(cfg.epsilon_high)
    log_delta = math.inf if cfg.delta is None else math.log(cfg.delta)
    clip_low = math.log(1 - cfg.epsilon_low) if cfg.epsilon_low < 1 else -math.inf
    lo = torch.where(adv < 0, _float64(adv, clip_low), _float64(adv, -math.inf))
    hi = torch.where(adv < 0, _float64(adv, max(log_delta, clip_high)), _float64(adv, positive_clip_cap(cfg)))
    return lo, hi, GATE_WINDOW


def cispo_gate(adv, cfg):
    """cispo's: -sg[min(r, epsilon_high)] A logp has d / d logp = -A min(r, epsilon_high)."""
    cap = math.log(cfg.epsilon_high) if cfg.epsilon_high > 0 else -math.inf
    bound = dict(dtype=torch.float64, device=adv.device)
    return torch.full(adv.shape, -math.inf, **bound), torch.full(adv.shape, cap, **bound), GATE_CAPPED


def sapo_gate(adv, cfg):
    """sapo's: -sigmoid(tau (r - 1)) 4 / tau A has d / d logp = -A 4 s (1 - s) r, constant past the
    surrogate's own cap log1p(40 / tau)."""
    tau = torch.where(adv > 0, _float64(adv, cfg.sapo_temperature_pos), _float64(adv, cfg.sapo_temperature_neg))
    return tau, torch.log1p(40.0 / tau), GATE_SOFT


@torch.no_grad()
def gamma_weights(t: TokenTerms, cfg):
    """VESPO's phi(w) = exp(lam) w^k exp(-lam w) per row [B, 1] (phi(1) = 1), detached: w is the sequence's
    importance weight exp(sum_t m_t clamp(log r_t, -20, 20) + sum_t clamp(log is_t, log 1e-8, 20)), its log
    clamped to [log 1e-8, 20]; (k, lam) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, else the _neg pair,
    lam at least 1e-4. A non-finite phi counts 0 (TRL's)."""
    lowest = math.log(1e-8)
    log_w = (t.token_log_ratio.clamp(-20.0, 20.0) * t.mask).sum(-1, keepdim=True)
    if t.importance_sampling_ratio is not None:
        log_w = log_w + torch.log(t.importance_sampling_ratio).clamp(lowest, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(lowest, 20.0)
    nonneg = t.advantages >= 0
    k = torch.where(nonneg, log_w.new_tensor(cfg.vespo_k_pos), log_w.new_tensor(cfg.vespo_k_neg))
    lam = torch.where(nonneg, log_w.new_tensor(cfg.vespo_lambda_pos),
                      log_w.new_tensor(cfg.vespo_lambda_neg)).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(t: TokenTerms, cfg):
    """-phi * A * logp with phi the row's gamma weight (gamma_weights)."""
    phi = gamma_weights(t, cfg)
    return -phi * t.advantages * t.logp, {"phi": phi}


# ---------------------------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Metric:
    """A per-token [B, T] (or per-row [B, 1]) value and how loss() reduces it: "mean" (over the completion
    tokens; over rows for [B, 1]), "row_min" / "row_max" (of each row's token mean, NaN rows left out:
    TRL's nanmin / nanmax)."""
    values: torch.Tensor
    how: str = "mean"


def _clip_counts(low, high):
    return {"clip_ratio/low_mean": Metric(low), "clip_ratio/high_mean": Metric(high),
            "clip_ratio/region_mean": Metric(low | high), "clip_ratio/low_min": Metric(low, "row_min"),
            "clip_ratio/high_max": Metric(high, "row_max")}


def clipped_metrics(details, cfg):
    """TRL's clip counts: the ratio below 1 - eps_low where A < 0, above 1 + eps_high where A > 0."""
    c1, adv = details["c1"].detach(), details["adv"]
    return _clip_counts((c1 < 1 - cfg.epsilon_low) & (adv < 0), (c1 > 1 + cfg.epsilon_high) & (adv > 0))


def frpo_metrics(details, cfg):
    """FRPO's term min(c1, c2) never takes the low clip (there c1 < c2) and is clipped, its gradient 0,
    exactly where the log-ratio passes log(1 + epsilon_high) or log(delta) (ratios.log_min_ratio); and the
    weights w_i and group means u_g (exp of log-domain values: inf where lam is small enough to overflow)."""
    log_ratio = details["log_ratio"].detach()
    metrics = _clip_counts(torch.zeros_like(log_ratio, dtype=torch.bool), log_ratio > positive_clip_cap(cfg))
    w, log_u = details["log_w"].detach().exp(), details["log_u"].detach()
    nonempty = log_u > float("-inf")  # groups with at least one completion token
    u = log_u.exp()
    metrics.update({"frpo/w_mean": w.mean(), "frpo/w_max": w.max(),
                    "frpo/u_mean": torch.where(nonempty, u, 0).sum() / nonempty.sum().clamp_min(1),
                    "frpo/u_min": torch.where(nonempty, u, float("inf")).min(), "frpo/u_max": u.max()})
    if details["lams"] is not None:
        metrics["frpo/lam_groups"] = details["lams"]
    return metrics


# metrics of one value per row (the rest are per token at token-level IS): trainers weight them by rows
PER_ROW_METRICS = ("vespo/phi_seq_mean",)


def cispo_metrics(details, cfg):
    """TRL's cispo_clip_ratio: the ratio above epsilon_high where A > 0."""
    return {"cispo_clip_ratio": Metric((details["ratio"] > cfg.epsilon_high) & (details["adv"] > 0))}


def vespo_metrics(details, cfg):
    return {"vespo/phi_seq_mean": Metric(details["phi"])}


def no_metrics(details, cfg):
    return {}


# ---------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class LossType:
    name: str
    normaliser: Normaliser
    surrogate: Callable | None     # None: group-coupled (FRPO)
    metrics: Callable
    gate: Callable | None = None
    value_reads_logp: bool = False
    ratio_inside: bool = False
    levels: tuple = IS_LEVELS
    advised_level: str | None = None
    level_advice: str = ""
    options: tuple = ()            # the keywords only this type reads (TRL's GRPOConfig names)

    @property
    def token_local(self) -> bool:
        """Off-policy at token-level IS, one fused sweep serves it (its gradient is a kernel gate)."""
        return self.gate is not None

    @property
    def group_coupled(self) -> bool:
        """Its policy term couples the rows of a group (FRPO): objective.frpo_policy_loss, group_stats."""
        return self.surrogate is None


_TOKEN_SUM_ADVICE = ("it sums per-token terms, so each sequence weighs by its length rather than the loss "
                     "optimising a per-sequence objective; GSPO's setup is loss_type='grpo' with "
                     "importance_sampling_level='sequence'")

TYPES = {entry.name: entry for entry in (
    LossType("frpo", SEQUENCE_MEAN, None, frpo_metrics),
    LossType("grpo", SEQUENCE_MEAN, clipped_surrogate, clipped_metrics, gate=window_gate),
    LossType("bnpo", BATCH_TOKENS, clipped_surrogate, clipped_metrics, gate=window_gate,
             advised_level="token", level_advice=_TOKEN_SUM_ADVICE),
    LossType("dr_grpo", ROWS_TIMES_LENGTH, clipped_surrogate, clipped_metrics, gate=window_gate,
             advised_level="token", level_advice=_TOKEN_SUM_ADVICE),
    LossType("dapo", ITEMS_IN_BATCH, clipped_surrogate, clipped_metrics, gate=window_gate,
             advised_level="token", level_advice=_TOKEN_SUM_ADVICE),
    LossType("cispo", ITEMS_IN_BATCH, cispo_surrogate, cispo_metrics, gate=cispo_gate, value_reads_logp=True,
             advised_level="token", level_advice=_TOKEN_SUM_ADVICE),
    LossType("sapo", SEQUENCE_MEAN, sapo_surrogate, no_metrics, gate=sapo_gate,
             options=("sapo_temperature_pos", "sapo_temperature_neg")),
    LossType("luspo", SEQUENCE_SUM, clipped_surrogate, clipped_metrics, gate=window_gate,
             advised_level="sequence",
             level_advice="LUSPO (a length-scaled GSPO) is defined with importance_sampling_level='sequence'"),
    LossType("vespo", ITEMS_IN_BATCH, vespo_surrogate, vespo_metrics, value_reads_logp=True, ratio_inside=True,
             advised_level="token",
             level_advice="VESPO forms its sequence-level weights itself from the per-token ratios; the level "
                          "only changes the bias-corrected KL's ratio",
             options=("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")),
)}
NAMES = tuple(TYPES)


def get(name) -> LossType:
    """The entry of loss_type `name`; ValueError naming every type for anything else."""
    try:
        return TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {NAMES}, got {name!r}") from None


def names_where(predicate) -> tuple:
    """The names of the types whose entry satisfies predicate (for messages and docs)."""
    return tuple(name for name, entry in TYPES.items() if predicate(entry))
