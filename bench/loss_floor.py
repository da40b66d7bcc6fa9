"""frpo_kernels.loss(..., backend="cpu") fwd + bwd against its floor, one copy of the logits, side by side.

  python bench/loss_floor.py                    # 16 x 128 x 49,152 bf16, 15 rounds
  python bench/loss_floor.py --dtype float32 --rounds 9 --batch 8 --loss-type grpo

Every round times, in turn: `torch.Tensor.copy_` of the logits (the floor: one read and one write of
them), the C++ fused kernel alone (allocating, and in place), `loss()` fwd + `.backward()` (the
gradient freed after each call, as a trainer frees it), the same with `overwrite_logits=True`, and
`loss()` at the same B and T on a vocabulary of 64 (its O(B*T) work in Python: the per-call overhead).
Interleaving puts a slow phase of a shared machine on every row alike; each row's number is its
fastest round. Prints the CPU, the load average and each row as milliseconds and x the copy.
Nothing is asserted: tests/test_bench_scripts.py runs it small to check that it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import frpo_kernels  # noqa: E402
from frpo_kernels.backends import cpu  # noqa: E402
from frpo_kernels.loss_types import NAMES  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cpu_description, logits_batch  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="completions B (groups of 8)")
    parser.add_argument("--length", type=int, default=128, help="tokens per completion T")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loss-type", default="frpo", choices=NAMES, help="the loss() rows' loss_type")
    args = parser.parse_args(argv)
    if args.batch < 8 or args.batch % 8:
        parser.error(f"--batch must be a positive multiple of the group size 8, got {args.batch}")
    for name in ("length", "vocab", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cases(args):
    """name -> a callable timing one call, in seconds (set-up outside the timed part)."""
    dtype = getattr(torch, args.dtype)
    logits, ids, mask, rewards, _ = logits_batch(args.batch, args.length, args.vocab, dtype)
    small = logits_batch(args.batch, args.length, 64, dtype)[:4]
    copy_dst, scratch = torch.empty_like(logits), torch.empty_like(logits)
    coef = torch.full(mask.shape, -1.0 / mask.sum().item())

    def loss_call(z, ids_, mask_, rewards_, **kw):
        frpo_kernels.loss(z, ids_, mask_, rewards=rewards_, group_size=8, backend="cpu", loss_type=args.loss_type,
                          **kw).backward()

    def loss_allocating():
        leaf = logits.detach().requires_grad_(True)
        seconds = timed(lambda: loss_call(leaf, ids, mask, rewards))
        leaf.grad = None
        return seconds

    def loss_overwrite():
        scratch.copy_(logits)
        leaf = scratch.detach().requires_grad_(True)
        return timed(lambda: loss_call(leaf, ids, mask, rewards, overwrite_logits=True))

    def core(inplace):
        def run():
            if inplace:
                scratch.copy_(logits)
            target = scratch if inplace else logits
            out = []
            seconds = timed(lambda: out.append(cpu.fused(target, ids, mask, 1.0, coef, None, None, False,
                                                         inplace=inplace)))
            del out
            return seconds
        return run

    def overhead():
        leaf = small[0].detach().requires_grad_(True)
        return timed(lambda: loss_call(leaf, *small[1:]))

    return {
        "copy": lambda: timed(lambda: copy_dst.copy_(logits)),
        "core fused": core(False),
        "core fused in place": core(True),
        "loss() fwd+bwd": loss_allocating,
        "loss() overwrite_logits": loss_overwrite,
        "loss() at V=64 (overhead)": overhead,
    }


def main(argv=None):
    args = parse_args(argv)
    print(cpu_description())
    print(f"{args.batch} x {args.length} x {args.vocab} {args.dtype}, loss_type={args.loss_type}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds; load average before "
          f"{' '.join(open('/proc/loadavg').read().split()[:3]) if os.path.exists('/proc/loadavg') else 'n/a'}")
    rows = cases(args)
    for fn in rows.values():  # warm-up: page faults, the grad cache, lazy init
        fn()
    best = {name: float("inf") for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            best[name] = min(best[name], fn())
    floor = best["copy"]
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds * 1e3:8.2f} ms  {seconds / floor:5.2f}x the copy")
    return best


if __name__ == "__main__":
    main()
