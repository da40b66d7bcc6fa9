"""The Triton kernels under triton 3.6, the version the lent GPU machine carries (with torch 2.11, no
network), as well as under the main environment's triton: in triton 3.6's own virtual environment
(scripts/triton36_env.sh, which scripts/setup.sh --tests runs; frpo_kernels from this checkout,
unbuilt extension not needed), `python bench/gpu_check.py --smoke` passes (the kernels, loss() and
the hidden-states path in triton 3.6's interpreter, and the whole script's flow), and
`python -m frpo_kernels.backends.triton.report` compiles every specialisation with triton 3.6's compiler for
sm_80/sm_90 with no register spill.

The two runs start together (they take about 2 minutes each on one core; the report's compiles
are cached in triton's cache under the temp dir, so a rerun of it takes seconds). In CI (CI set) a
missing environment is a failure; elsewhere the tests skip and say how to make it.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_VERSION = "3.6.0"
TIMEOUT_S = 900


def venv_dir():
    return os.environ.get("FRPO_TRITON36_VENV", os.path.join(ROOT, ".venv-triton36"))


def venv_python():
    return os.path.join(venv_dir(), "bin", "python")


class Run:
    """A command in the venv, started now; a thread collects its output and when it ended."""

    def __init__(self, args, **env):
        self.args = args
        self.started = time.monotonic()
        self.proc = subprocess.Popen([venv_python()] + args, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE,
                                     env=dict(os.environ, PYTHONPATH=ROOT, FRPO_NO_JIT="1", **env))
        self.output = None
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        out, err = self.proc.communicate()
        self.output = (self.proc.returncode, out, err, time.monotonic() - self.started)

    def wait(self):
        """(exit status, stdout, stderr, seconds it ran)."""
        self.thread.join(max(1.0, TIMEOUT_S - (time.monotonic() - self.started)))
        if self.output is None:
            self.stop()
            pytest.fail(f"{' '.join(self.args)} did not finish in {TIMEOUT_S} s")
        return self.output

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.thread.join()


@pytest.fixture(scope="module")
def runs():
    python = venv_python()
    if not os.path.exists(python):
        message = (f"triton {TRITON_VERSION}'s virtual environment {venv_dir()} is missing: run "
                   "scripts/triton36_env.sh (or scripts/setup.sh --tests)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip() == TRITON_VERSION, \
        f"{venv_dir()} has triton {version.stdout.strip()}, not {TRITON_VERSION}: rerun scripts/triton36_env.sh"
    started = {
        "smoke": Run(["bench/gpu_check.py", "--smoke"], TRITON_INTERPRET="1"),
        "report": Run(["-m", "frpo_kernels.backends.triton.report", "--json"], TRITON_INTERPRET="0"),
    }
    yield started
    for run in started.values():
        run.stop()


def test_gpu_check_smoke_under_triton36(runs):
    code, out, err, seconds = runs["smoke"].wait()
    failed = [line for line in out.splitlines() if "[FAIL]" in line]
    assert code == 0 and not failed, "\n".join(failed) + "\n" + out[-6000:] + err[-6000:]
    assert "numerics ok" in out, out[-3000:]
    print(f"gpu_check --smoke under triton {TRITON_VERSION}: ok in {seconds:.0f} s")


def test_report_under_triton36_has_no_spills(runs):
    code, out, err, seconds = runs["report"].wait()
    assert code == 0, err[-6000:]
    table = json.loads(out)
    from frpo_kernels.backends.triton import aot
    assert len(table) == len(aot.specialisations())
    spilled = [f"{r['kernel']}/{r['dtype']}/{r['config']}/{r['target']}"
               f"{'' if r['aligned'] else ',unaligned'}{',i64' if r['int64_strides'] else ''}: "
               f"{r['n_regs']} registers, {r['n_spills']} bytes spilled" for r in table if r["n_spills"]]
    assert not spilled, f"spills under triton {TRITON_VERSION}:\n" + "\n".join(spilled)
    assert all(0 < r["n_regs"] <= 255 for r in table)
    print(f"report under triton {TRITON_VERSION}: {len(table)} specialisations, max registers "
          f"{max(r['n_regs'] for r in table)}, no spills, in {seconds:.0f} s")
