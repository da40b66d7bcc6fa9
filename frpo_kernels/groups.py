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


def advantages_from_rewards(rewards: torch.Tensor, groups: Groups, scale_rewards: bool) -> torch.Tensor:
    """A_i = r_i - mean_g r; with scale_rewards divided by (unbiased std_g(r) + 1e-4)."""
    mean = groups.broadcast(groups.mean(rewards))
    advantages = rewards - mean
    if scale_rewards:
        sq = groups.sum((rewards - mean) ** 2)
        std = torch.sqrt(sq / (groups.counts - 1).to(rewards.dtype))
        advantages = advantages / (groups.broadcast(std) + 1e-4)
    return advantages


def group_log_mean(values: torch.Tensor, groups: Groups, jackknife: bool, floor: float = 1e-12):
    """mean over groups of log(mean_{i in g} values_i), optionally jackknife bias-corrected.

    Jackknife per group: n*log(u) - (n-1) * mean_i log(u_{-i}), u_{-i} the leave-one-out mean.
    Returns (scalar, u [num]).
    """
    u = groups.mean(values)
    log_u = torch.log(u.clamp_min(floor))
    if not jackknife:
        return log_u.mean(), u
    n = groups.counts.to(values.dtype)
    total = groups.broadcast(groups.sum(values))
    leave_one_out = (total - values) / (groups.broadcast(n) - 1)
    mean_log_loo = groups.mean(torch.log(leave_one_out.clamp_min(floor)))
    return (n * log_u - (n - 1) * mean_log_loo).mean(), u
