"""FRPO when a group does not fit in one micro-batch: statistics of a whole generation batch, so that a
micro-batch holding any part of any group gets its exact share of the loss and of its gradient.

With s_i the per-sequence term, u_g the group mean and u_{g,-i} the leave-one-out means, the
jackknifed group term J_g = n log u_g - (n-1) mean_i log u_{g,-i} has dJ_g/ds_j = kappa_j =
1/u_g - (1/n) sum_{i != j} 1/u_{g,-i}: fixed by a few per-group sums. A micro-batch's loss is then
  sum_{j in micro-batch} [ J_g / n_g + kappa_j s_j * (log s_j - stop_grad(log s_j)) ] (and the baseline alike)
whose value is the rows' share of J and whose gradient is the whole batch's. Everything is kept in the
log domain (kappa_j s_j = s_j / u_g - (1/n) sum_{i != j} s_j / u_{g,-i}, each a bounded ratio), with the
top row of a group, whose exclusion would cancel catastrophically, given sums of its own.

The statistics may come from log-probs a little off the loss's (num_iterations > 1, recompute noise), so
the row that gets the top row's sums is decided by a split halfway (in log s) between the group's top and
its runner-up, never by a tolerance: a row is misplaced only when it drifted by half the gap, and then
the two rows are within that drift of each other and either formula is first-order right.

Each group's lam (a number, or lam="auto"'s from the whole batch's advantages, lam_auto.py) is resolved here
once and scales its terms. On-policy (ratios 1) s_i = exp(-A_i / lam) o_i for a row with a token, o_i =
sum_t m_t q_t / T_i: the statistics follow from advantages, masks and importance-sampling ratios alone.
Off-policy, and with an off-policy mask whose sampling log-probs are given, they need the current
policy's per-token log-probs (a no-grad pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frpo_kernels import checks
from frpo_kernels.config import LossConfig
from frpo_kernels.distributed import BatchSpan, gather_token_factor, gather_unmasked
from frpo_kernels.groups import (Groups, advantages_from_rewards, group_log_terms, group_logsumexp, make_groups,
                                 scale_rewards_mode)
from frpo_kernels.lam_auto import lam_scale, resolve_group_lams
from frpo_kernels.objective import BatchSize, frpo_log_terms, log_ratios, off_policy_mask, token_scale

# Options that must be the same in group_stats() and in the loss that uses the statistics. The per-token
# tensors (importance_sampling_ratio, sampling_logps) are passed to both: the whole batch's to
# group_stats, the micro-batch's rows to the loss.
SHARED_OPTIONS = ("loss_type", "lam", "kl_radius", "jackknife", "baseline", "scale_rewards", "epsilon_low",
                  "epsilon_high", "delta", "importance_sampling_level", "max_completion_length",
                  "num_items_in_batch", "off_policy_mask_threshold")


@dataclass
class GroupStats:
    """Per-group statistics of a whole generation batch (float64, [G] over its sorted group ids)."""
    cfg: LossConfig
    group_ids: torch.Tensor   # [G] the batch's global group ids, sorted
    size: BatchSize           # the whole batch's rows, tokens and length (the loss types' normalisers)
    reward_mean: torch.Tensor | None  # [G]; with reward_scale, advantages of a micro-batch's rewards
    reward_scale: torch.Tensor | None
    n: torch.Tensor           # rows with a completion token
    terms: torch.Tensor       # J_g (0 for a group without such rows)
    mean_o: torch.Tensor      # the baseline's mean_i o_i
    log_u: torch.Tensor       # log u_g
    top: torch.Tensor         # max_i log s_i
    top_split: torch.Tensor   # halfway from the runner-up to the top: rows above it take the top's sums
    log_sum: torch.Tensor     # log sum_i s_i
    log_rest: torch.Tensor    # log sum_{i != top row} s_i
    inv_loo: torch.Tensor     # log sum_i 1 / u_{g,-i}
    inv_loo_rest: torch.Tensor  # the same without the top row
    num_nonempty: int
    lams: torch.Tensor | None = None  # FRPO: each group's lam (lam_auto.resolve_group_lams)

    def index_of(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Position in these statistics of each row's global group id (ValueError for an unknown id)."""
        ids = group_ids.to(self.group_ids.device).long()
        pos = torch.searchsorted(self.group_ids, ids).clamp_max(self.group_ids.numel() - 1)
        if not torch.compiler.is_compiling() and not bool((self.group_ids[pos] == ids).all()):
            missing = ids[self.group_ids[pos] != ids]
            raise ValueError(f"group_ids has ids that group_stats did not see (e.g. {int(missing[0])}): pass the "
                             "global group ids of the batch the statistics were computed on")
        return pos.to(group_ids.device)

    def advantages(self, rewards, index):
        if self.reward_mean is None:
            raise ValueError("these group_stats were computed from advantages: pass advantages=, not rewards=")
        return (rewards.double() - self.reward_mean[index]) / self.reward_scale[index]

    def frpo_share(self, log_s, log_o, valid, index):
        """This micro-batch's share of mean_g J_g (- the baseline): exact value share, exact gradient."""
        dtype = log_s.dtype
        kappa_s = self.kappa_times_s(log_s.detach().double(), index).to(dtype)
        kappa_s = torch.where(valid, kappa_s, torch.zeros_like(kappa_s))  # a group with no sample: n = 0
        n = self.n[index].clamp_min(1)
        share = self.terms[index] / n
        term = torch.where(valid, share.to(dtype) + kappa_s * (log_s - log_s.detach()), torch.zeros_like(log_s))
        if self.cfg.baseline:
            o = torch.exp(log_o)
            base = self.mean_o[index] / n
            term = term - torch.where(valid, base.to(dtype) + (o - o.detach()) / n.to(dtype), torch.zeros_like(o))
        term = term * lam_scale(self.lams)[index].to(dtype)  # max(lam_g, 1) inside the mean over groups
        return term.sum() / max(self.num_nonempty, 1)

    def kappa_times_s(self, log_s, g):
        """dJ_g / dlog s_j = kappa_j s_j for each row (float64)."""
        n = self.n[g]
        own_u = torch.exp(log_s - self.log_u[g])  # s_j / u_g; d log u_g / d log s_j = s_j / (n u_g)
        if not self.cfg.jackknife:
            return own_u / n.clamp_min(1)
        is_top = log_s > self.top_split[g]
        # log sum_{i != j} s_i: the top row's own sum, or the group's minus this row's (the top stays in)
        scaled_rest = torch.exp(self.log_sum[g] - self.top[g]) - torch.exp(log_s - self.top[g])
        others = torch.where(is_top, self.log_rest[g], self.top[g] + torch.log(scaled_rest.clamp_min(1e-300)))
        log_loo = others - torch.log((n - 1).clamp_min(1))
        # log sum_{i != j} 1/u_{g,-i}: the top row's term dominates the others' sums
        rest_share = (1 - torch.exp(-log_loo - self.inv_loo[g])).clamp_min(1e-300)
        inv_others = torch.where(is_top, self.inv_loo_rest[g], self.inv_loo[g] + torch.log(rest_share))
        jack = own_u - torch.exp(log_s + inv_others) / n.clamp_min(1)
        return torch.where(n >= 2, jack, own_u)  # one row: log u_g = log s_j

    def check_matches(self, cfg: LossConfig):
        for name in SHARED_OPTIONS:
            if getattr(cfg, name) != getattr(self.cfg, name):
                raise ValueError(f"{name}={getattr(cfg, name)!r} differs from the group_stats' "
                                 f"{name}={getattr(self.cfg, name)!r}: pass the same options to both")


def group_stats(completion_mask, *, advantages=None, rewards=None, group_size=None, group_ids=None,
                loss_type="frpo", lam=1.0, jackknife=True, baseline=True, scale_rewards=False, logps=None,
                old_logps=None, epsilon_low=0.2, epsilon_high=0.2, delta=None, importance_sampling_level="token",
                max_completion_length=None, kl_radius=None, num_items_in_batch=None, importance_sampling_ratio=None,
                off_policy_mask_threshold=None, sampling_logps=None, process_group=None) -> GroupStats:
    """Statistics of a whole generation batch for loss(..., group_stats=stats) on its micro-batches.

    completion_mask [B, T]; exactly one of advantages/rewards [B] and one of group_size/group_ids.
    On-policy (old_logps None) nothing else is needed. Off-policy pass old_logps and logps, the
    current policy's per-token log-probs of the batch (under no_grad), so the statistics are exact at
    the current parameters. process_group: the batch is the rank-major concatenation of every rank's
    rows (as in loss()); the statistics describe it and are the same on every rank.

    The options are loss()'s (SHARED_OPTIONS must be equal in both). importance_sampling_ratio and
    sampling_logps: the whole batch's (the loss gets the micro-batch's rows); sampling_logps needs logps.
    top_entropy_quantile < 1 is not supported with group_stats (the loss refuses it).
    """
    cfg = LossConfig(loss_type=loss_type, lam=lam, jackknife=jackknife, baseline=baseline,
                     scale_rewards=scale_rewards, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                     importance_sampling_level=importance_sampling_level,
                     max_completion_length=max_completion_length, kl_radius=kl_radius,
                     num_items_in_batch=num_items_in_batch, off_policy_mask_threshold=off_policy_mask_threshold)
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be a [B, T] tensor, got {checks._describe(completion_mask)}")
    checks.check_token_weights("completion_mask", completion_mask)
    batch, length = completion_mask.shape
    device = completion_mask.device
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages and rewards (each of shape [B])")
    checks.check_finite_per_sequence("advantages" if rewards is None else "rewards",
                                     rewards if advantages is None else advantages, batch, device)
    advantages, rewards = (None if t is None else t.detach() for t in (advantages, rewards))  # data, as in loss()
    group_size = checks.optional_positive_int("group_size", group_size)
    if (logps is None) != (old_logps is None) and (old_logps is not None or sampling_logps is None):
        raise ValueError("off-policy statistics need both old_logps and logps (the current policy's "
                         "per-token log-probs); on-policy pass neither (or logps alone, for the off-policy "
                         "mask's sampling_logps)")
    checks.check_token_tensor("logps", logps, (batch, length), device, floating=True)
    checks.check_token_tensor("old_logps", old_logps, (batch, length), device, floating=True)
    checks.check_ratio_and_sampling_logps(cfg, importance_sampling_ratio, sampling_logps, batch, length, device,
                                          completion_mask)
    if sampling_logps is not None and logps is None:
        raise ValueError("sampling_logps needs logps (the current policy's per-token log-probs), which the "
                         "off-policy mask compares them with")
    importance_sampling_ratio, sampling_logps = (None if t is None else t.detach()
                                                 for t in (importance_sampling_ratio, sampling_logps))
    span = BatchSpan.create(process_group, batch, length, device)
    group_size, group_ids = span.groups(group_size, group_ids, cfg.frpo_jackknife)
    if group_ids is None:
        group_ids = torch.arange(span.total, device=device) // group_size
    mask = span.gather(completion_mask.double())
    groups = make_groups(span.total, None, group_ids, device)
    reward_mean = reward_scale = None
    if advantages is None:
        checks.check_scale_rewards(cfg.scale_rewards, groups.counts)
        rewards = span.gather(rewards.double())
        reward_mean = groups.mean(rewards)
        reward_scale = _group_divisor(rewards, groups, cfg.scale_rewards)
        advantages = advantages_from_rewards(rewards, groups, cfg.scale_rewards)
    else:
        advantages = span.gather(advantages.double())
    size = BatchSize(span.total, mask.sum().clamp_min(1), span.length)
    stats = dict(n=torch.zeros(groups.num, dtype=torch.float64, device=device))
    if cfg.kind.group_coupled:
        lams = resolve_group_lams(cfg, advantages, mask.sum(-1) > 0, groups)
        tokens = dict(logps=logps, old_logps=old_logps, importance_sampling_ratio=importance_sampling_ratio,
                      sampling_logps=sampling_logps)
        stats = dict(_frpo_statistics(cfg, mask, advantages, groups, span, lams, **tokens), lams=lams)
    else:
        stats.update({name: stats["n"] for name in ("terms", "mean_o", "log_u", "top", "top_split", "log_sum",
                                                     "log_rest", "inv_loo", "inv_loo_rest")}, num_nonempty=0)
    return GroupStats(cfg, torch.unique(group_ids).long(), size, reward_mean, reward_scale, **stats)


def _group_divisor(rewards, groups: Groups, scale_rewards):
    """What advantages_from_rewards divides a group's centred rewards by."""
    mode = scale_rewards_mode(scale_rewards)
    if mode == "none":
        return torch.ones(groups.num, dtype=rewards.dtype, device=rewards.device)
    if mode == "batch":
        return (rewards.std() + 1e-4).expand(groups.num).clone()
    mean = groups.broadcast(groups.mean(rewards))
    return torch.sqrt(groups.sum((rewards - mean) ** 2) / (groups.counts - 1).to(rewards.dtype)) + 1e-4


@torch.no_grad()
def _frpo_statistics(cfg, mask, advantages, groups, span, lams, logps, old_logps, importance_sampling_ratio,
                     sampling_logps):
    logp = old = torch.zeros_like(mask)  # on-policy: log-ratios 0
    if logps is not None:  # old_logps None: on-policy, logps only for the off-policy mask
        logp = gather_unmasked(span, logps, mask)
        old = logp if old_logps is None else gather_unmasked(span, old_logps, mask)
    row_keep = None
    if cfg.off_policy_mask_threshold is not None:  # as the loss: the sampler's, else the old, log-probs
        sampling = old if sampling_logps is None else gather_unmasked(span, sampling_logps, mask)
        row_keep = off_policy_mask(advantages, logp, sampling, mask, cfg.off_policy_mask_threshold)
    q = token_scale(cfg, gather_token_factor(span, importance_sampling_ratio, mask), row_keep)
    log_ratio = log_ratios(logp, old, mask, cfg, torch.ones_like(mask[:, :1], dtype=torch.bool))
    log_s, log_o, valid = frpo_log_terms(log_ratio, mask, advantages, cfg, groups.broadcast(lams), q)
    n = groups.sum(valid.double())
    terms, log_u, log_loo, top_row = group_log_terms(log_s, valid, groups, cfg.jackknife)
    top = groups.max(torch.where(valid, log_s, float("-inf")))
    # the max over the rest; equal to the top for a tie (then no row is set apart), -inf for one row
    runner_up = groups.max(torch.where(valid & ~top_row, log_s, float("-inf")))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    o = torch.where(valid, torch.exp(log_o), torch.zeros_like(log_o))
    return dict(
        n=n, terms=terms, mean_o=groups.sum(o) / n.clamp_min(1), log_u=log_u, top=top,
        top_split=top - (top - runner_up) / 2, log_sum=log_u + torch.log(n.clamp_min(1)),
        log_rest=group_logsumexp(log_s, valid & ~top_row, groups),
        inv_loo=group_logsumexp(-log_loo, valid, groups),
        inv_loo_rest=group_logsumexp(-log_loo, valid & ~top_row, groups),
        num_nonempty=int((n > 0).sum()))
