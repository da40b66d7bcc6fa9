"""Groups that span ranks: gather the O(B*T) inputs of the loss from every rank of a process group,
so that loss(..., process_group=pg) sees the global batch. No O(B*T*V) tensor is ever communicated.

Convention (also in loss()'s docstring): the value returned on every rank is the single-process loss
of the global batch, and its gradient is world_size times the single-process gradient w.r.t. this
rank's rows, so that DDP's average over ranks (sum / world_size) gives the single-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from frpo_kernels import checks


def world_size(process_group) -> int:
    """Size of `process_group`; a clear error when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first, or pass process_group=None")
    return dist.get_world_size(process_group)


class BatchSpan:
    """This rank's rows of the global batch and the collectives over the process group.

    The global batch is the rank-major concatenation of every rank's local batch. Ranks may have
    different batch sizes B_r and completion lengths T_r: token tensors are right-padded with zeros
    (mask 0) to T = max_r T_r, which only the dr_grpo normaliser without max_completion_length sees.
    """

    def __init__(self, process_group, batch: int, length: int, device: torch.device):
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.device = device
        self.local_batch, self.local_length = batch, length
        shape = torch.tensor([batch, length], dtype=torch.long, device=device)
        shapes = [torch.empty_like(shape) for _ in range(self.world)]
        dist.all_gather(shapes, shape, group=process_group)
        shapes = torch.stack(shapes).tolist()
        self.batches = [b for b, _ in shapes]
        self.max_batch = max(self.batches)
        self.length = max(t for _, t in shapes)
        self.start = sum(self.batches[:self.rank])
        self.stop = self.start + batch
        self.total = sum(self.batches)

    @classmethod
    def create(cls, process_group, batch, length, device):
        """A span over the ranks of process_group, or a LocalSpan (no process group, or one rank)."""
        if process_group is None or world_size(process_group) == 1:
            return LocalSpan(batch, length, device)
        return cls(process_group, batch, length, device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B_r, ...] on each rank -> [sum_r B_r, ...] in rank order (token tensors padded to T).

        Rows of other ranks arrive detached; this rank's rows are `x` itself, so they keep their
        autograd graph. Every rank must call gather with the same sequence of (dtype, ndim).
        """
        padded = self._pad(x)
        buffers = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(buffers, padded.detach().contiguous(), group=self.group)
        buffers[self.rank] = padded
        return torch.cat([buf[:rows] for buf, rows in zip(buffers, self.batches)])

    def _pad(self, x):
        if x.dim() >= 2 and x.shape[1] != self.length:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, self.length - x.shape[1]))
        if x.shape[0] != self.max_batch:
            x = torch.cat([x, x.new_zeros((self.max_batch - x.shape[0],) + tuple(x.shape[1:]))])
        return x

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """[B_global, T, ...] -> this rank's rows [B_r, T_r, ...] (the inverse of gather)."""
        x = x[self.start:self.stop]
        return x[:, :self.local_length] if x.dim() >= 2 else x

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a (detached) tensor over ranks."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value

    def scale_gradient(self, global_loss: torch.Tensor) -> torch.Tensor:
        """Same value; gradient multiplied by the world size (undone by DDP's average over ranks)."""
        scaled = global_loss * self.world
        return global_loss.detach() + (scaled - scaled.detach())

    def groups(self, group_size, group_ids, jackknife):
        """(group_size, group_ids) of the global batch: this rank's group_ids [B_r] gathered, or
        contiguous blocks of group_size over the global batch; checked against the global batch (a
        group may span ranks)."""
        if group_ids is None or group_size is not None:
            checks.check_groups(self.total, group_size, group_ids, self.device, jackknife)
            return None, torch.arange(self.total, device=self.device) // group_size
        checks.check_token_tensor("group_ids", group_ids, (self.local_batch,), self.device, allow_none=False)
        if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        group_ids = self.gather(group_ids.long())
        checks.check_groups(self.total, None, group_ids, self.device, jackknife)
        return None, group_ids


def sum_over_ranks(value: torch.Tensor, process_group) -> torch.Tensor:
    """The sum of every rank's `value`; its gradient is world_size times this rank's (undone by DDP's
    average over ranks)."""
    world = world_size(process_group)
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    scaled = value * world
    return total + (scaled - scaled.detach())


class LocalSpan:
    """The single-process batch: the span whose collectives do nothing, so the loss has no
    `if distributed` branches."""

    world = 1

    def __init__(self, batch: int, length: int, device: torch.device):
        self.total, self.length, self.device = batch, length, device

    def gather(self, x):
        return x

    def local(self, x):
        return x

    def all_sum(self, value):
        return value

    def scale_gradient(self, global_loss):
        return global_loss

    def groups(self, group_size, group_ids, jackknife):
        checks.check_groups(self.total, group_size, group_ids, self.device, jackknife)
        return group_size, group_ids


def gather_token_factor(span, factor, mask):
    """A per-token factor [B_r, T] or per-row [B_r, 1] (importance_sampling_ratio) over the span's rows as
    mask.dtype, 1 where mask == 0 ([B, T]: padding there is never read)."""
    if factor is None:
        return None
    factor = factor.to(mask.dtype)
    if factor.shape[1] == 1 and mask.shape[1] != 1:
        if span.world == 1:
            return factor  # one per row
        # On a rank with T_r = 1, [B_r, 1] is per-row and per-token alike, but every rank must run the
        # same all_gather: each spreads its [B_r, 1] over its tokens and gathers [B_r, T_r].
        factor = factor.expand(-1, span.local_length)
    return torch.where(mask != 0, span.gather(factor), torch.ones_like(mask))


def gather_unmasked(span, token_values, mask):
    """Gathered per-token log-probs as mask.dtype with 0 where mask == 0: padding there (-inf, NaN) is
    never read."""
    if token_values is None:
        return None
    token_values = span.gather(token_values.to(mask.dtype))
    return torch.where(mask != 0, token_values, torch.zeros_like(mask))
