"""CPU benchmarks of the hidden-states path (frpo_kernels/ops/linear_logprobs.py): log-probs and the
loss gradient from hidden [N, H] and the LM head [V, H] without the [N, V] logits.

Per head (frozen, as under LoRA, or trainable), one round runs, back to back:
  linear_fused   linear_fused_loss, on-policy coef: one sweep, fwd+bwd
  gemms_fused    its GEMMs alone, tile by tile like its loop: h·Wᵀ, dlogits·W (+ dlogitsᵀ·h)
  linear_2pass   linear_token_logprobs then backward: two sweeps, fwd+bwd
  gemms_2pass    its GEMMs alone: h·Wᵀ; then h·Wᵀ again, dlogits·W (+ dlogitsᵀ·h)
  trl_chunked    trl.kernels.ChunkedLogProbFunction (vocab chunks of 32768 as TRL's trainer uses)
  eager          materialised logits + log_softmax/gather, autograd
Every implementation computes the same loss sum(coef * logp), gradients by torch.autograd.grad.
Rounds are interleaved (every implementation once per round) and each reports its minimum of wall
time and of process CPU time: the machine is shared, and with FRPO_BENCH_THREADS=1 the CPU time
is what other jobs disturb least. Printed: times, ratio of linear_* to its own GEMMs (target
<= 1.15x), speed-up over TRL (target >= 2.5x) and over eager.

Quick by default (N=512, H=128, V=8192, 2 rounds, memory at N=2048); FRPO_BENCH_FULL=1: N=4096,
H=576, V=49152 fp32, 3 rounds, and the peak RSS of fwd+bwd at N=16384 above the inputs and their
gradients (target <= 512 MB), measured in a subprocess. Nothing here asserts on time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import FULL

from frpo_kernels.ops import linear_logprobs as lin
from frpo_kernels.ops import tile_policy

try:
    from trl.kernels import ChunkedLogProbFunction
except Exception:  # TRL is optional
    ChunkedLogProbFunction = None

N, H, V = (4096, 576, 49152) if FULL else (512, 128, 8192)
ROUNDS = 3 if FULL else 2
MEMORY_N = 16384 if FULL else 2048
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(n, size, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, size, generator=gen)
    weight = torch.randn(vocab, size, generator=gen) * (2 / size ** 0.5)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    # on-policy GRPO-like coefficients: an advantage per sequence of 128 tokens over the token count
    coef = (torch.randn(max(1, n // 128), generator=gen).repeat_interleave(128)[:n] / n).contiguous()
    if coef.numel() < n:
        coef = torch.full((n,), 1.0 / n)
    return hidden, weight, ids, coef


def _leaves(hidden, weight, train_head):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(train_head)
    return h, w, ([h, w] if train_head else [h])


def linear_fused(hidden, weight, ids, coef, train_head):
    h, w, wrt = _leaves(hidden, weight, train_head)
    loss = lin.linear_fused_loss(h, w, None, ids, None, 1.0, coef, None, None, False, "cpu",
                                 lambda logp: (coef * logp).sum())[0]
    torch.autograd.grad(loss, wrt)
    return loss.detach()


def linear_2pass(hidden, weight, ids, coef, train_head):
    h, w, wrt = _leaves(hidden, weight, train_head)
    loss = (coef * lin.linear_token_logprobs(h, w, ids, backend="cpu")).sum()
    torch.autograd.grad(loss, wrt)
    return loss.detach()


def trl_chunked(hidden, weight, ids, coef, train_head):
    if ChunkedLogProbFunction is None:
        return None
    h, w, wrt = _leaves(hidden, weight, train_head)
    logp = ChunkedLogProbFunction.apply(h, w, None, ids, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())[0]
    loss = (coef * logp).sum()
    torch.autograd.grad(loss, wrt)
    return loss.detach()


def eager(hidden, weight, ids, coef, train_head):
    h, w, wrt = _leaves(hidden, weight, train_head)
    logits = h @ w.t()
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss = (coef * logp).sum()
    torch.autograd.grad(loss, wrt)
    return loss.detach()


def _gemm_tiles(hidden, weight, train_head, backward_only=False, forward_only=False):
    """The GEMMs of one sweep exactly as the loop runs them (same rows, workspace, out=), no kernel."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = tile_policy.sweep_rows(n, vocab, hidden.shape[1], hidden.dtype, hidden.device)
    workspace = torch.empty(rows, vocab, dtype=hidden.dtype)
    grad_hidden = None if forward_only else torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight) if train_head and not forward_only else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        tile = workspace[:stop - start]
        torch.mm(hidden[start:stop], weight.t(), out=tile)
        if forward_only:
            continue
        torch.mm(tile, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            grad_weight.addmm_(tile.t(), hidden[start:stop])


def gemms_fused(hidden, weight, ids, coef, train_head):
    _gemm_tiles(hidden, weight, train_head)


def gemms_2pass(hidden, weight, ids, coef, train_head):
    _gemm_tiles(hidden, weight, train_head, forward_only=True)
    _gemm_tiles(hidden, weight, train_head)


IMPLS = {"linear_fused": linear_fused, "gemms_fused": gemms_fused, "linear_2pass": linear_2pass,
         "gemms_2pass": gemms_2pass, "trl_chunked": trl_chunked, "eager": eager}
_inputs = {}


def _shared_inputs():
    if "x" not in _inputs:
        _inputs["x"] = make_inputs(N, H, V)
    return _inputs["x"]


def timing_lines(best, values):
    """One line per implementation: its minimum wall and CPU time, and its loss value (if any)."""
    return [f"  {name:>13} {wall * 1e3:10.1f} ms wall {cpu * 1e3:10.1f} ms cpu  "
            f"{f'loss {values[name]:+.6f}' if name in values else '(GEMMs only)'}"
            for name, (wall, cpu) in best.items()]


def summary_lines(head, best, values):
    """best: name -> (wall seconds, process CPU seconds), each the minimum over the rounds."""
    def ratio(a, b, clock):
        return f"{best[a][clock] / best[b][clock]:.2f}x" if a in best and b in best else "-"

    def ratios(a, b):
        return f"{ratio(a, b, 0)} wall, {ratio(a, b, 1)} cpu"

    rows = tile_policy.sweep_rows(N, V, H, torch.float32, torch.device("cpu"))
    lines = [f"N={N} H={H} V={V} fp32, {head} head, min of {ROUNDS} interleaved rounds, "
             f"{torch.get_num_threads()} thread(s), tile rows {rows}; wall clock and process CPU time"]
    lines += timing_lines(best, values)
    lines.append(f"  linear_fused / its GEMMs {ratios('linear_fused', 'gemms_fused')}; "
                 f"linear_2pass / its GEMMs {ratios('linear_2pass', 'gemms_2pass')}")
    lines.append(f"  TRL / linear_fused {ratios('trl_chunked', 'linear_fused')}; "
                 f"TRL / linear_2pass {ratios('trl_chunked', 'linear_2pass')}")
    lines.append(f"  eager / linear_fused {ratios('eager', 'linear_fused')}; "
                 f"eager / linear_2pass {ratios('eager', 'linear_2pass')}")
    return lines


@pytest.fixture
def bench_threads():
    """FRPO_BENCH_THREADS=k runs these cases on k threads (1 thread + CPU time: robust to other jobs)."""
    wanted = int(os.environ.get("FRPO_BENCH_THREADS", "0") or 0)
    before = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_bench_linear(benchmark, head, bench_threads):
    hidden, weight, ids, coef = _shared_inputs()
    train_head = head == "trainable"
    best, values = {}, {}

    def one_round():
        for name, fn in IMPLS.items():
            wall, cpu = time.perf_counter(), time.process_time()
            value = fn(hidden, weight, ids, coef, train_head)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if name == "trl_chunked" and value is None:
                continue
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
            if value is not None:
                values[name] = float(value)

    small = (hidden[:64], weight, ids[:64], coef[:64], train_head)
    for fn in IMPLS.values():  # warm-up on 64 rows: imports, thread pools, first-call costs
        fn(*small)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    # the same loss from every implementation (correctness, not timing)
    for name in ("linear_2pass", "trl_chunked", "eager"):
        if name in values:
            assert abs(values[name] - values["linear_fused"]) <= 1e-4 * max(1.0, abs(values["eager"])), values
    lines = summary_lines(head, best, values)
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update({f"{k}_wall_ms": v[0] * 1e3 for k, v in best.items()})
    benchmark.extra_info.update({f"{k}_cpu_ms": v[1] * 1e3 for k, v in best.items()})


MEMORY_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, "bench")  # run from the repository root
    from proc_status import status_kib
    from frpo_kernels.ops import linear_logprobs as lin
    from frpo_kernels.ops import tile_policy

    n, size, vocab, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, size, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, size, generator=gen) * (2 / size ** 0.5)).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    coef = torch.full((n,), 1.0 / n)
    lin.linear_token_logprobs(hidden[:4].detach(), weight.detach(), ids[:4], backend="cpu")  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    if path == "fused":
        loss = lin.linear_fused_loss(hidden, weight, None, ids, None, 1.0, coef, None, None, False, "cpu",
                                     lambda lp: (coef * lp).sum())[0]
    else:
        loss = (coef * lin.linear_token_logprobs(hidden, weight, ids, backend="cpu")).sum()
    loss.backward()
    peak = status_kib("VmHWM")
    grads = hidden.grad.numel() * 4 + weight.grad.numel() * 4
    rows = tile_policy.sweep_rows(n, vocab, size, torch.float32, torch.device("cpu"))
    print(json.dumps({"peak_growth_bytes": (peak - before) * 1024, "grad_bytes": grads,
                      "workspace_bytes": rows * vocab * 4, "logits_bytes": n * vocab * 4}))
""")


@pytest.mark.parametrize("path", ["fused", "2pass"])
def test_bench_linear_peak_memory(path):
    """Peak RSS of fwd+bwd (trainable head) above the inputs and their gradients, in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(MEMORY_N), str(H), str(V), path],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = row["peak_growth_bytes"] - row["grad_bytes"]
    print(f"\n  linear_{path} N={MEMORY_N} H={H} V={V} fp32 trainable head: peak RSS growth "
          f"{row['peak_growth_bytes'] / 2**20:.1f} MiB, above the gradients {extra / 2**20:.1f} MiB "
          f"(workspace {row['workspace_bytes'] / 2**20:.1f} MiB; the logits would be "
          f"{row['logits_bytes'] / 2**20:.0f} MiB)")


def test_gpu_check_without_cuda_says_so_and_exits_0():
    """bench/gpu_check.sh on a machine without CUDA: a one-line notice, exit status 0, no files."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: bench/gpu_check.sh would run the GPU check")
    before = {name: os.path.getmtime(os.path.join(ROOT, "bench", name))
              for name in ("results-gpu.md", "results-gpu.json") if os.path.exists(os.path.join(ROOT, "bench", name))}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA is not available" in proc.stdout and "skipped" in proc.stdout, proc.stdout
    after = {name: os.path.getmtime(os.path.join(ROOT, "bench", name))
             for name in ("results-gpu.md", "results-gpu.json") if os.path.exists(os.path.join(ROOT, "bench", name))}
    assert before == after
