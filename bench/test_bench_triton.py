"""GPU benchmarks of backend="triton" against torch eager, torch.compile and (if installed)
Liger-Kernel's GRPO kernel, side by side; time / floor printed per case, nothing asserted on time.

Runs only with a CUDA GPU; CI has none (it proves the Triton kernels with the interpreter and
ahead-of-time compilation in tests/test_triton_*.py).
"""
from __future__ import annotations

import os

import pytest
import torch

import frpo_kernels

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU here: Triton kernels are timed only on a GPU (numerics and compilation are "
           "proven in tests/test_triton_*.py)")

FULL = os.environ.get("FRPO_BENCH_FULL", "0") not in ("", "0")
SHAPES = [(4096, 151936), (8192, 151936)] if FULL else [(4096, 32768)]
GROUP = 8


def _inputs(n, v, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = 2 * GROUP
    logits = torch.randn(batch, n // batch, v, device="cuda", generator=gen).to(dtype)
    ids = torch.randint(0, v, (batch, n // batch), device="cuda", generator=gen)
    mask = torch.ones(batch, n // batch, device="cuda")
    rewards = torch.randint(0, 2, (batch,), device="cuda", generator=gen).float()
    return logits, ids, mask, rewards


def _bandwidth_bytes_per_s(logits):
    dst = torch.empty_like(logits)
    dst.copy_(logits)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(logits)
    end.record()
    torch.cuda.synchronize()
    return 5 * 2 * logits.numel() * logits.element_size() / (start.elapsed_time(end) / 1e3)


def _step(impl, mode, logits, ids, mask, rewards):
    if impl == "liger":
        grpo = pytest.importorskip("liger_kernel.ops.grpo_loss", reason="Liger-Kernel is not installed")
        # Liger's kernel takes [B, T + 1, V] logits (the last position unused) and advantages
        padded = torch.cat([logits, logits[:, -1:]], dim=1).detach().requires_grad_(mode != "forward")
        adv = frpo_kernels.group_advantages(rewards, group_size=GROUP)
        if mode == "forward":
            return lambda: grpo.fused_selective_log_softmax(padded, torch.cat([ids, ids[:, -1:]], 1), 1.0)
        return lambda: grpo.triton_grpo_loss(padded, None, None, ids, adv, mask, temperature=1.0, beta=0.0,
                                             inplace=False)[0].sum().backward()
    backend = {"torch_eager": "torch", "torch_compile": "torch", "triton": "triton"}[impl]
    fn = frpo_kernels.loss if impl != "torch_compile" else torch.compile(frpo_kernels.loss)
    if mode == "forward":
        return lambda: frpo_kernels.token_logprobs(logits, ids, backend=backend)
    z = logits.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(fn(z, ids, mask, rewards=rewards, group_size=GROUP, backend=backend), z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["forward", "fwd_bwd_fused"])
@pytest.mark.parametrize("impl", ["torch_eager", "torch_compile", "liger", "triton"])
def test_bench_gpu(benchmark, impl, mode, shape, dtype):
    logits, ids, mask, rewards = _inputs(*shape, dtype)
    step = _step(impl, mode, logits, ids, mask, rewards)

    def timed():
        step()
        torch.cuda.synchronize()

    timed()  # warm-up: compilation and autotuning stay out of the timing
    benchmark.pedantic(timed, rounds=5 if FULL else 3, warmup_rounds=1)
    floor_bytes = logits.numel() * logits.element_size() * (1 if mode == "forward" else 2)
    floor_s = floor_bytes / _bandwidth_bytes_per_s(logits)  # bandwidth: bytes read + written per second
    ratio = benchmark.stats.stats.min / floor_s
    benchmark.extra_info.update(impl=impl, mode=mode, time_over_floor=ratio)
    print(f"\n{impl:>14} {mode:>14} {shape[0]}x{shape[1]} {dtype}: "
          f"{benchmark.stats.stats.min * 1e3:.2f} ms = {ratio:.2f}x floor")
