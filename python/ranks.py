"""This process's place in a torchrun job, and the few collectives the training loop needs
(gradient all-reduce, a check that every rank holds the same adapter)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1, pg None: a plain single-process run)."""
    pg: object = None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n items (sizes differ by at most one)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def all_sum(self, values: list[float]) -> list[float]:
        if self.pg is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pg)
        return t.tolist()

    def gather(self, values: list) -> list:
        """This rank's list concatenated with every other rank's, in rank order."""
        if self.pg is None:
            return values
        out = [None] * self.world
        dist.all_gather_object(out, values, group=self.pg)
        return [v for part in out for v in part]


def setup_distributed(args) -> Dist:
    """init_process_group when started by torchrun (WORLD_SIZE > 1); the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device)


def reduce_gradients(params, ctx: Dist, average: bool = True):
    """Sum (average=False) or mean of the parameters' gradients over ranks, in one all-reduce."""
    if ctx.pg is None:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.pg)
    if average:
        flat /= ctx.world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def check_in_sync(params, ctx: Dist):
    """Every rank must hold bit-identical adapters (same init, same averaged gradients)."""
    if ctx.pg is None:
        return
    mine = [float(p.detach().double().sum()) for p in params]
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, mine, group=ctx.pg)
    if any(x != everyone[0] for x in everyone):
        raise RuntimeError("distributed ranks hold different LoRA parameters; the gradient all-reduce "
                           "did not give the same bytes on every rank")
