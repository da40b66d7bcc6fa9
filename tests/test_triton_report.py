"""python -m frpo_kernels.backends.triton.report runs, and the DRAM bytes it gives per token are the floor
of each kernel's design: forward reads the row once; backward and fused read it once (fused's
second sweep is an L2 re-read) and write the gradient once; plus the per-token arrays."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from frpo_kernels.backends.triton import aot, report  # noqa: E402
from frpo_kernels.backends.triton import kernels  # noqa: E402

ROW_PASSES_FLOOR = {"forward": 1, "backward": 2, "fused": 2}  # DRAM passes over V per token
SWEEPS = {"forward": (1, 0), "backward": (1, 1), "fused": (2, 1)}  # (row loads, row stores)


@pytest.fixture(scope="module")
def table():
    if not os.path.exists(aot.cuobjdump_path()):
        pytest.skip("this triton ships no cuobjdump")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "frpo_kernels.backends.triton.report", "--json"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_report_lists_every_specialisation(table):
    assert len(table) == len(aot.specialisations())
    keys = {"kernel", "target", "dtype", "config", "n_regs", "n_spills", "shared_bytes",
            "bytes_per_token"}
    for row in table:
        assert keys <= set(row)
        assert row["n_regs"] > 0 and row["n_spills"] == 0


def test_bytes_per_token_is_the_floor(table):
    for row in table:
        kernel = row["kernel"]
        assert (row["row_load_sweeps"], row["row_store_sweeps"]) == SWEEPS[kernel], row
        floor = (ROW_PASSES_FLOOR[kernel] * row["V"] * aot.ELEMENT_BYTES[row["dtype"]]
                 + sum(report.PER_TOKEN[kernel].values()))
        assert row["bytes_per_token"] == floor, row


def test_per_token_arrays_are_the_kernel_arguments():
    # Every pointer argument other than the logits and the gradient is a [B, T] array the kernel
    # reads or writes once per token: the report must count each of them and nothing else.
    for name in aot.KERNELS:
        fn = getattr(kernels, f"{name}_kernel")
        pointers = {a[:-len("_ptr")] for a in fn.arg_names if a.endswith("_ptr")}
        assert set(report.PER_TOKEN[name]) == pointers - {"logits", "grad"}


def test_report_text_states_the_l2_assumption():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "frpo_kernels.backends.triton.report"], cwd=root,
                         env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Assumption:" in out.stdout and "L2" in out.stdout and "ms" in out.stdout
