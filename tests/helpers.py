"""Shared test inputs (small random batches with masks, old/ref log-probs and rewards) and the rule
for which process runs which kernel backend."""
import os
import subprocess
import sys

import pytest
import torch

from frpo_kernels import backends

# Set when this process is a rerun under Triton's interpreter (Triton reads it at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rerun_under_interpreter(test_file, select=None, timeout=900, **env):
    """pytest on test_file (only the tests -k select chooses) in a subprocess with TRITON_INTERPRET=1
    (and env), asserting it passed; returns the finished process for the caller's own checks."""
    command = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-p", "no:cacheprovider",
               "-W", "ignore::RuntimeWarning"] + (["-k", select] if select else [])
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1", **env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    return proc


def cpu_flags():
    """This CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_isas():
    """The CPU kernel paths this CPU runs, fastest first, from /proc/cpuinfo (independent of the
    core's own detection, which the tests check against it)."""
    names = ["portable"]
    if {"avx2", "fma", "f16c"} <= cpu_flags():
        names.insert(0, "avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= cpu_flags():
            names.insert(0, "avx512")
    return names


def expected_isa():
    """The path cpu.isa() must report in this process: FRPO_CPU_ISA's choice, else the fastest."""
    chosen = os.environ.get("FRPO_CPU_ISA", "").strip() or "auto"
    return runnable_isas()[0] if chosen == "auto" else chosen


def rerun_under_isa(test_file, isa, timeout=900):
    """pytest on test_file in a subprocess with FRPO_CPU_ISA=isa, asserting it passed: the same
    cases on another kernel path of this CPU."""
    command = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, FRPO_CPU_ISA=isa), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    return proc


def make_batch(batch=6, length=5, vocab=7, group_size=3, dtype=torch.float64, seed=0,
               old_spread=0.3, with_old=True, with_ref=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).to(torch.float64)
    mask[0] = 1.0
    mask[-1, 1:] = 0.0
    true_logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    noise = lambda: torch.randn(batch, length, generator=gen, dtype=torch.float64) * old_spread
    return {
        "logits": logits.to(dtype),
        "ids": ids,
        "mask": mask,
        "old": (true_logp + noise()) if with_old else None,
        "ref": (true_logp + noise()) if with_ref else None,
        "rewards": torch.randint(0, 3, (batch,), generator=gen).to(torch.float64),
        "group_size": group_size,
    }


def require_cpu_kernels():
    """Skips, saying why, where the C++ extension is not built; in CI (CI set) it must be: fails."""
    try:
        backends.resolve("cpu", torch.zeros(1, 1, 2))
    except ValueError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cpu kernel backend must be built in CI: {exc}")
        pytest.skip(f"cpu kernel backend not built: {exc}")


def use_backend(backend):
    """Skips where this process does not run `backend`: triton only in the interpreter rerun (the
    file's test_triton_cases_under_interpreter starts it), torch and cpu only in the main process."""
    if backend == "triton" and not INTERPRETED:
        pytest.skip("runs in test_triton_cases_under_interpreter's subprocess (TRITON_INTERPRET=1)")
    if backend != "triton" and INTERPRETED:
        pytest.skip(f"the {backend} cases run in the main process")
    if backend == "cpu":
        require_cpu_kernels()
    return backend


def count_kernel_calls(monkeypatch, backend):
    """{"fused": n, "backward": n}: how often the loss called the backend's one-pass and two-pass kernels."""
    module = backends.kernels(backend)
    calls = {"fused": 0, "backward": 0}
    for name in calls:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def exit_torchrun_child():
    """End a torchrun child whose checks passed and printed: take the process group down and skip the
    interpreter's teardown. On 2 cores that teardown aborted one rank about 1 run in 10 ("terminate
    called without an active exception": a native thread still running at exit) with the group still
    up, and 1 in 90 after destroy_process_group."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
