"""Shared pieces of the CPU benchmarks: the shape grid (quick by default, FRPO_BENCH_FULL=1 for all),
copy-bandwidth floor, peak-RSS measurement, and the results file + chart written at session end.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from proc_status import status_kib

FULL = os.environ.get("FRPO_BENCH_FULL", "0") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = []
# Above this many logits the eager/TRL/compile peers are not run (4096 x 151936 fp32 is 2.5 GB; eager
# softmax + autograd keeps several full-size intermediates, more than this machine can spare).
PEERS_MAX_ELEMENTS = 2048 * 151936
# TRL's selective_log_softmax runs only up to this size in the full grid (13 s per fwd+bwd call at
# 2048 x 49152 fp32 here; the larger shapes would take most of the grid's time).
TRL_MAX_ELEMENTS = 2048 * 49152


def cpu_description():
    """The CPU model, its vector extensions that matter here, and the path backend="cpu" runs on it."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:  # x86, aarch64
                    flags = set(value.split())
    except OSError:
        pass
    simd = [name for name in ("avx512f", "avx512bw", "avx512_bf16", "avx2", "fma", "neon", "asimd") if name in flags]
    try:
        from frpo_kernels.backends import cpu
        path = cpu.isa()
    except Exception as exc:  # the backend is unavailable: say so instead of a path
        path = f"unavailable ({exc})"
    return f"CPU: {model} ({os.cpu_count()} cores; {' '.join(simd) or 'no AVX2/AVX-512'}); backend='cpu' runs {path}"


def shapes():
    """(N = B*T, V) cases: the full grid, or one small shape that runs in seconds."""
    if FULL:
        return [(2048, 49152), (4096, 49152), (2048, 151936), (4096, 151936)]
    return [(256, 32768)]  # 32 MiB of fp32 logits: about the L3 size, so the floor roughly means something


def rounds(impl="cpu"):
    """Timed rounds (best of): the full grid gives the cpu rows 3 and the much slower peers 1."""
    return 3 if FULL and impl.startswith("cpu") else 1


def logits_batch(batch, length, vocab, dtype):
    """A seeded batch of completion logits and what loss() needs with them: (logits [B, T, V] in dtype,
    ids, mask [B, T] with row 1's second half masked, rewards [B] in {0, 1}, old_logps [B, T])."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, length, vocab, generator=gen) * 2).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length)
    mask[1, length // 2:] = 0
    rewards = torch.randint(0, 2, (batch,), generator=gen).float()
    old = -torch.rand(batch, length, generator=gen) * 3
    return logits, ids, mask, rewards, old


def copy_seconds(logits, repeats=3):
    """Best time of copying the logits buffer once (one read + one write of it): this machine's floor unit."""
    dst = torch.empty_like(logits)
    dst.copy_(logits)  # fault the pages in first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(logits)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_delta_bytes(fn):
    """Peak resident memory during fn() above the RSS before it, in bytes (Linux: resets VmHWM through
    /proc/self/clear_refs, then reads it back); None where that is not possible. Counts every byte the
    process touches (torch CPU has no allocator statistics), including fn's own outputs. The cpu rows
    get their gradient from the buffer ops.cpp keeps from the previous call, resident already, so their
    "extra" (this minus the gradient's size) can be negative: that much of the gradient was reused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS")
        out = fn()
        peak = status_kib("VmHWM")
        del out
        return max(0, peak - before) * 1024
    except (OSError, KeyError):
        return None


def record(row):
    RESULTS.append(row)
    floor = row["floor_ratio"]
    mem = row["extra_peak_mib"]
    print(f"\n  {row['impl']:>14} {row['mode']:>14} N={row['N']} V={row['V']} {row['dtype']:>8}: "
          f"{row['seconds'] * 1e3:9.1f} ms  = {floor:5.2f} x floor ({row['floor_ms']:.1f} ms)  "
          f"extra peak RSS {'n/a' if mem is None else f'{mem:.0f} MiB'}")


def _write_outputs():
    path = os.path.join(HERE, "results.json")
    with open(path, "w") as f:
        json.dump({"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
                   "results": RESULTS}, f, indent=1)
    write_report(RESULTS)


def write_report(rows):
    """bench/results.md (the table) and bench/results.png (time / floor per case and impl)."""
    RESULTS = rows
    floors = best_floors(rows)
    path = os.path.join(HERE, "results.md")
    # the grid is the file's head; the "## " sections after it come from other benchmarks: keep them
    later = ""
    if os.path.exists(path):
        text = open(path).read()
        later = text[text.index("\n## "):] if "\n## " in text else ""
    with open(path, "w") as f:
        f.write(f"FRPO_BENCH_FULL=1 python -m pytest bench -q -s  ({torch.get_num_threads()} threads, torch "
                f"{torch.__version__}); best of {rounds('cpu')} rounds for cpu rows, {rounds('torch_eager')} "
                f"for the peers\n\n{cpu_description()}\n\nfloor = bytes moved / copy bandwidth (forward: 0.5 copy, fused: 1, two-phase: 1.5),"
                f" copy = torch's copy_ of the logits, fastest of the session for that shape and dtype. On this "
                f"shared 2-core VM the copy of 2048x49152 fp32 took 34-68 ms across sessions (other jobs' load), "
                f"so a row's ratio depends on how quiet the machine was when its copy was timed; "
                f"csrc/bench/bench_core reports the core against memcpy side by side."
                f"\n\n```\n{ratio_table(RESULTS)}\n```\n" + later)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = sorted({(r["mode"], r["N"], r["V"], r["dtype"]) for r in RESULTS})
    impls = sorted({r["impl"] for r in RESULTS})
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ys = []
        for case in cases:
            hit = [r["seconds"] * 1e3 / floors[id(r)] for r in RESULTS
                   if (r["mode"], r["N"], r["V"], r["dtype"]) == case and r["impl"] == impl]
            ys.append(hit[0] if hit else 0)
        ax.bar([i + k * width for i in range(len(cases))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{m}\n{n}x{v}\n{d}" for m, n, v, d in cases], fontsize=6)
    ax.set_ylabel("time / memory-traffic floor (session's best copy; lower is better)")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results.png"), dpi=120)


FLOOR_COPIES = {"forward": 0.5, "fwd_bwd_fused": 1.0, "fwd_bwd_2phase": 1.5}  # floor in units of one copy


def best_floors(rows):
    """Each row's floor from the fastest copy of its (N, V, dtype) measured in the session: the copy is
    timed next to every case, and under other jobs' load single measurements vary by up to 2x."""
    best = {}
    for r in rows:
        key = (r["N"], r["V"], r["dtype"])
        best[key] = min(best.get(key, float("inf")), r["floor_ms"] / FLOOR_COPIES[r["mode"]])
    return {id(r): best[(r["N"], r["V"], r["dtype"])] * FLOOR_COPIES[r["mode"]] for r in rows}


def ratio_table(rows):
    """One line per (case, impl): time, time / floor (floor from the session's best copy of that shape,
    see best_floors), and speed-up over torch eager / torch.compile (their time divided by this one;
    '-' where that peer did not run)."""
    floors = best_floors(rows)
    lines = [f"{'mode':<22} {'N x V':>13} {'dtype':>8} {'impl':>14} {'ms':>9} {'floor ms':>9} {'/floor':>7} "
             f"{'vs eager':>9} {'vs compile':>10}"]
    order = {m: i for i, m in enumerate(["forward", "fwd_bwd_fused", "fwd_bwd_2phase"])}
    cases = sorted({(r["mode"], r["N"], r["V"], r["dtype"]) for r in rows}, key=lambda c: (order.get(c[0], 9), *c[1:]))
    for case in cases:
        hits = {r["impl"]: r for r in rows if (r["mode"], r["N"], r["V"], r["dtype"]) == case}
        # compare against the peers' best-of time in the same mode (compile/TRL report under fwd_bwd_fused)
        for impl, r in hits.items():
            speed = []
            for peer in ("torch_eager", "torch_compile"):
                pr = hits.get(peer)
                speed.append(f"{pr['seconds'] / r['seconds']:.2f}x" if pr else "-")
            fl = floors[id(r)]
            lines.append(f"{case[0]:<22} {f'{case[1]}x{case[2]}':>13} {case[3]:>8} {impl:>14} "
                         f"{r['seconds'] * 1e3:9.1f} {fl:9.1f} {r['seconds'] * 1e3 / fl:6.2f}x {speed[0]:>9} {speed[1]:>10}")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_sep("=", "time / floor (floor = bytes moved / copy bandwidth) and speed-ups")
        terminalreporter.write_line(cpu_description())
        terminalreporter.write_line(ratio_table(RESULTS))


@pytest.fixture(scope="session", autouse=True)
def _bench_session():
    yield
    if FULL and RESULTS:
        _write_outputs()
