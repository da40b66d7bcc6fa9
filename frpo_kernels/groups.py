"""Group bookkeeping for GRPO-style losses: explicit groups, group-relative advantages and
FRPO's group log-mean (plain or jackknifed). All O(B) torch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Groups:
    index: torch.Tensor   # [B] long: which group each sequence belongs to, 0..num-1
    counts: torch.Tensor  # [num] long: members per group
    num: int

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """[B] -> [num]: mean of x over each group's members."""
        return self.sum(x) / self.counts.to(x.dtype)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num, dtype=x.dtype, device=x.device).index_add_(0, self.index, x)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """[B] -> [num]: max of x over each group's members (-inf for a group without members)."""
        return torch.full((self.num,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(
            0, self.index, x, "amax", include_self=True)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """[num] -> [B]."""
        return per_group[self.index]


def make_groups(batch_size: int, group_size=None, group_ids=None, device=None) -> Groups:
    """Groups from contiguous blocks of `group_size` or from arbitrary integer `group_ids` [B]."""
    if group_ids is None:
        index = torch.arange(batch_size, device=device) // group_size
        num = batch_size // group_size
        counts = torch.full((num,), group_size, dtype=torch.long, device=device)
        return Groups(index, counts, num)
    _, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(index)
    return Groups(index, counts, int(counts.numel()))


SCALE_REWARDS = ("group", "batch", "none", True, False)


def scale_rewards_mode(scale_rewards) -> str:
    """"group" | "batch" | "none" from TRL's strings or this package's booleans (True = "group")."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    return scale_rewards


def advantages_from_rewards(rewards: torch.Tensor, groups: Groups, scale_rewards) -> torch.Tensor:
    """A_i = r_i - mean_g r, divided by (std + 1e-4) where std is the unbiased std of the group's
    rewards ("group" / True) or of the whole batch's ("batch", as TRL); "none" / False: not divided."""
    mean = groups.broadcast(groups.mean(rewards))
    advantages = rewards - mean
    mode = scale_rewards_mode(scale_rewards)
    if mode == "group":
        sq = groups.sum((rewards - mean) ** 2)
        std = torch.sqrt(sq / (groups.counts - 1).to(rewards.dtype))
        advantages = advantages / (groups.broadcast(std) + 1e-4)
    elif mode == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages


def group_log_terms(log_values: torch.Tensor, valid: torch.Tensor, groups: Groups, jackknife: bool):
    """Per group, log(mean_{i in g, valid} exp(log_values_i)), optionally jackknifed.

    Only rows with valid True count: n_g is the number of valid members. Jackknife per group with
    n_g >= 2: n*log(u) - (n-1) * mean_i log(u_{-i}), u_{-i} the leave-one-out mean; a group with one
    valid row uses log(u); a group with none has term 0. Everything stays in the log domain (FRPO's
    values exp(-A/lam) overflow for small lam), and each leave-one-out sum is formed from its own
    members rather than as total - own, which cancels catastrophically when one member dominates.
    Returns (terms [num], log_u [num] (-inf for empty groups), log u_{g,-i} [B] for valid rows,
    top [B] bool: the row each group's exclusions treat apart).
    """
    n = groups.sum(valid.to(log_values.dtype))
    lv = torch.where(valid, log_values, torch.full_like(log_values, float("-inf")))
    top, shift = _group_max(lv, valid, groups)
    log_u = _log_sum(shift, groups.sum(torch.exp(lv - shift[groups.index])), n > 0) - torch.log(n.clamp_min(1))
    log_loo = _log_leave_one_out_sums(lv, valid, top, shift, groups) \
        - torch.log((groups.broadcast(n) - 1).clamp_min(1))
    terms = log_u
    if jackknife:
        mean_log_loo = groups.sum(torch.where(valid, log_loo, torch.zeros_like(log_loo))) / n.clamp_min(1)
        terms = torch.where(n >= 2, n * log_u - (n - 1) * mean_log_loo, log_u)
    return torch.where(n > 0, terms, torch.zeros_like(terms)), log_u, log_loo, top


def _log_sum(shift, total, ok):
    """shift + log(total) where ok and total > 0, else -inf; never takes log of an unused entry (its
    -inf or NaN derivative would poison the gradient through torch.where)."""
    use = ok & (total > 0)
    return torch.where(use, shift + torch.log(torch.where(use, total, torch.ones_like(total))),
                       torch.full_like(total, float("-inf")))


def _group_max(lv, valid, groups):
    """(top [B] bool: the first valid row attaining its group's max; the max [num], 0 where it is not
    finite). The max only shifts the log-sum-exps, so it is detached."""
    lv = lv.detach()
    group_max = groups.max(lv)
    position = torch.arange(lv.shape[0], device=lv.device)
    at_max = valid & (lv == group_max[groups.index])
    first = torch.full((groups.num,), lv.shape[0], dtype=torch.long, device=lv.device)
    first = first.scatter_reduce(0, groups.index, torch.where(at_max, position, lv.shape[0]), "amin",
                                 include_self=True)
    top = valid & (position == first[groups.index])
    return top, torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))


def _log_leave_one_out_sums(lv, valid, top, shift, groups):
    """log(sum_{j in g, valid, j != i} exp(lv_j)) for every row i, [B].

    A row other than its group's top: after the shift by the max its sum still holds the top's
    exp(0) = 1, so total - own loses no precision. The top row: the sum of the rest, shifted by the
    runner-up."""
    row_shift = shift[groups.index]
    scaled = torch.exp(lv - row_shift)
    others = groups.broadcast(groups.sum(scaled)) - scaled
    not_top = _log_sum(row_shift, others, valid & ~top)
    rest = torch.where(top, torch.full_like(lv, float("-inf")), lv)
    _, runner_up = _group_max(rest, valid & ~top, groups)
    rest_sum = _log_sum(runner_up, groups.sum(torch.exp(rest - runner_up[groups.index])),
                        torch.ones_like(runner_up, dtype=torch.bool))
    return torch.where(top, groups.broadcast(rest_sum), not_top)


def group_logsumexp(values: torch.Tensor, include: torch.Tensor, groups: Groups) -> torch.Tensor:
    """[num]: log(sum_{i in g, include_i} exp(values_i)), -inf for a group with no included row."""
    lv = torch.where(include, values, torch.full_like(values, float("-inf")))
    _, shift = _group_max(lv, include, groups)
    return _log_sum(shift, groups.sum(torch.exp(lv - shift[groups.index])), torch.ones_like(shift, dtype=torch.bool))

