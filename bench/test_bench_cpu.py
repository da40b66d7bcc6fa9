"""CPU benchmarks of the per-token log-prob work inside frpo_kernels.loss(), side by side:
torch eager reference, TRL's selective_log_softmax, torch.compile of the reference, backend="cpu", and
backend="cpu" with overwrite_logits=True ("cpu_inplace": the gradient goes into the logits' storage, no
[B, T, V] allocation; timed from fresh logits each round, gradient taken with torch.autograd.grad,
see test_bench), and backend="cpu" on the portable kernels ("cpu_portable": FRPO_CPU_ISA=portable, the
compiler-vectorised loops that ARM runs; "cpu" is auto: AVX-512 or AVX2 on x86-64) and, on a CPU where auto
runs AVX-512, on the AVX2 ones ("cpu_avx2"). The TRL and torch.compile rows time only
per-token log-probs plus a trivial sum loss (a lower bound on their cost).

Each case prints time / floor, floor = minimum bytes / this machine's copy bandwidth (forward: read
the logits once; fused fwd+bwd: read + write; two-phase fwd+bwd: read twice + write once), and the
peak RSS beyond the logits and their gradient. Quick by default; FRPO_BENCH_FULL=1 runs the grid and
writes bench/results.json and bench/results.png. Nothing here asserts on time. The session ends with a
table of time / floor and the speed-up over torch eager and torch.compile per case (conftest.py).
In the full grid TRL runs on 2048 x 49152 only, and the peers get 1 timed round (cpu rows: best of 3).
On the largest grid shape (4096 x 151936) only the cpu rows run: the peers' eager fp32 softmax
intermediates need ~5x the 2.5 GB logits (see conftest.PEERS_MAX_ELEMENTS); the cpu rows' values are
then not re-checked against eager (tests/ cover correctness).
"""
from __future__ import annotations

import pytest
import torch

import frpo_kernels
from conftest import (FULL, PEERS_MAX_ELEMENTS, TRL_MAX_ELEMENTS, copy_seconds, logits_batch, peak_rss_delta_bytes,
                      record, rounds, shapes)

try:
    from trl.trainer.utils import selective_log_softmax
except Exception:  # TRL is optional
    selective_log_softmax = None

GROUP = 8
IMPLS = ["torch_eager", "trl_selective", "torch_compile", "cpu", "cpu_inplace", "cpu_portable", "cpu_avx2"]
FORCED_ISA = {"cpu_portable": "portable", "cpu_avx2": "avx2"}  # rows that run backend="cpu" on a chosen path
PEERS = ("torch_eager", "trl_selective", "torch_compile")
MODES = ["forward", "fwd_bwd_fused", "fwd_bwd_2phase"]
_reference_values = {}
_compiled = {}


def _auto_isa():
    try:
        from frpo_kernels.backends import cpu
        return cpu.isa()
    except Exception:
        return None


_last_inputs = {}


def _inputs(n, v, dtype):
    """The same inputs for every case of one shape and dtype (kept: generating 2.5 GB takes seconds)."""
    key = (n, v, dtype)
    if key not in _last_inputs:
        _last_inputs.clear()
        _last_inputs[key] = logits_batch(GROUP * 2, n // (GROUP * 2), v, dtype)
    return _last_inputs[key]


def _loss_fn(impl, mode, ids, mask, rewards, old):
    kwargs = dict(rewards=rewards, group_size=GROUP, old_logps=old if mode == "fwd_bwd_2phase" else None)
    if impl == "trl_selective":
        if selective_log_softmax is None:
            pytest.skip("trl is not installed")
        if mode == "fwd_bwd_2phase":
            pytest.skip("TRL's path has one backward (autograd), shown under fwd_bwd_fused")
        # TRL computes per-token log-probs this way; the O(B*T) loss on top is negligible, so use a sum
        return lambda z: -(selective_log_softmax(z, ids).float() * mask).sum()
    if impl == "torch_compile":
        # inductor (torch 2.13 CPU) fails to compile loss()'s group scatter, so compile the O(B*T*V)
        # part, the reference per-token log-probs, with the same trivial loss on top as the TRL row
        if mode == "fwd_bwd_2phase":
            pytest.skip("compiled reference has one backward (autograd), shown under fwd_bwd_fused")
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(
                lambda z, ids, mask: -(frpo_kernels.token_logprobs(z, ids, backend="torch") * mask).sum())
        fn = _compiled["fn"]
        return lambda z: fn(z, ids, mask)
    backend = "torch" if impl == "torch_eager" else "cpu"  # cpu_portable / cpu_avx2: the ISA is set in test_bench
    if impl == "cpu_inplace":
        if mode == "forward":
            pytest.skip("no gradient in forward mode")
        kwargs["overwrite_logits"] = True
    return lambda z: frpo_kernels.loss(z, ids, mask, backend=backend, **kwargs)


def _cases():
    auto_isa = _auto_isa()
    for n, v in shapes():
        for dtype in (torch.float32, torch.bfloat16):
            for mode in MODES:
                for impl in IMPLS:
                    if not FULL and impl == "torch_compile" and dtype != torch.float32:
                        continue  # compiling costs ~10 s a case; the quick run keeps one dtype
                    if impl in PEERS and n * v > PEERS_MAX_ELEMENTS:
                        continue  # too large for the eager peers here: see the module docstring
                    if impl == "trl_selective" and n * v > TRL_MAX_ELEMENTS:
                        continue
                    if impl == "cpu_inplace" and mode == "forward":
                        continue
                    if impl == "cpu_avx2" and auto_isa != "avx512":
                        continue  # "cpu" already is the AVX2 path (or there is none)
                    yield pytest.param(n, v, dtype, mode, impl, id=f"{mode}-{impl}-{n}x{v}-{str(dtype)[6:]}")


@pytest.mark.parametrize("n,v,dtype,mode,impl", list(_cases()))
def test_bench(benchmark, request, n, v, dtype, mode, impl):
    if impl in FORCED_ISA:  # process-wide: forward and backward kernels both run the chosen loops
        from frpo_kernels.backends import cpu
        previous = cpu.isa()
        cpu.set_isa(FORCED_ISA[impl])
        request.addfinalizer(lambda: cpu.set_isa(previous))
    logits, ids, mask, rewards, old = _inputs(n, v, dtype)
    fn = _loss_fn(impl, mode, ids, mask, rewards, old)
    esize = logits.element_size()
    grad_bytes = 0 if mode == "forward" or impl == "cpu_inplace" else logits.numel() * esize

    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(logits)
        setup = None
    else:
        leaf = logits.clone().requires_grad_(True)

        def run():
            value = fn(leaf)
            if impl == "cpu_inplace":
                # as when the logits come from an LM head: the gradient goes on to the producer, not
                # into a leaf's .grad (AccumulateGrad clones a gradient that aliases the saved logits:
                # 2-phase 416 ms instead of 80 ms at 2048 x 49152 fp32)
                torch.autograd.grad(value, leaf)
            else:
                value.backward()
            return value

        def setup():
            leaf.grad = None
            if impl == "cpu_inplace":  # the last run overwrote the logits with their gradient
                with torch.no_grad():
                    leaf.copy_(logits)

    # correctness (not timing): every implementation agrees with the eager reference
    value = run() if mode == "forward" else (setup(), run())[1]
    key = (n, v, dtype, mode)
    if impl in ("torch_eager", "cpu", "cpu_inplace", "cpu_portable") and n * v <= PEERS_MAX_ELEMENTS:
        if key not in _reference_values:
            ref = _loss_fn("torch_eager", mode, ids, mask, rewards, old)
            if mode == "forward":
                with torch.no_grad():
                    _reference_values[key] = ref(logits).item()
            else:
                z = logits.clone().requires_grad_(True)
                _reference_values[key] = ref(z).item()
        want = _reference_values[key]
        assert abs(value.item() - want) <= 1e-3 * max(1.0, abs(want)), (value.item(), want)

    benchmark.pedantic(run, setup=setup, rounds=rounds(impl), iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.min

    copy = copy_seconds(logits)
    floor_reads_writes = {"forward": 0.5, "fwd_bwd_fused": 1.0, "fwd_bwd_2phase": 1.5}[mode]  # in copies
    floor = copy * floor_reads_writes
    if setup:
        setup()
    peak = peak_rss_delta_bytes(run)
    extra = None if peak is None else (peak - grad_bytes) / 2**20
    row = dict(impl=impl, mode=mode, N=n, V=v, dtype=str(dtype)[6:], seconds=seconds, floor_ms=floor * 1e3,
               floor_ratio=seconds / floor, copy_gbps=2 * logits.numel() * esize / copy / 1e9, extra_peak_mib=extra)
    benchmark.extra_info.update(row)
    record(row)
