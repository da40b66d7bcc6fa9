"""The ARM build without ARM hardware: cross-compiles the torch-free core and its C++ tests
(csrc/tests, compared there with a float64 reference) for aarch64 with Debian's g++-aarch64-linux-gnu,
using the sources and flags of frpo_kernels/_build.py, and runs them under qemu-user. Also checks that
the compiler turned the portable loops into NEON vector code (the point of the portable path).

Skipped only when the two tools are missing (apt-get install g++-aarch64-linux-gnu qemu-user; .ci/run
installs them).
"""
import os
import re
import shutil

import pytest

from csrc_build import ROOT, core_flags, core_test_binary, run_all

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's aarch64 libc and libstdc++ (for qemu's -L)

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None or shutil.which(QEMU) is None,
    reason=f"{CXX} / {QEMU} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)")


@pytest.fixture(scope="module")
def cross_build(tmp_path_factory):
    """The core + the C++ test, and the portable file's assembly, compiled side by side."""
    out = tmp_path_factory.mktemp("aarch64")
    asm = str(out / "portable.s")
    portable = os.path.join(ROOT, "csrc", "core", "logprob_kernels_portable.cpp")
    binary = core_test_binary(CXX, str(out), also=[[CXX, *core_flags(), "-S", portable, "-o", asm]])
    return binary, asm


def test_core_tests_pass_on_aarch64_under_qemu(cross_build):
    binary, _ = cross_build
    (out,) = run_all([[QEMU, "-L", SYSROOT, binary]])
    assert "isa portable: done" in out, out
    assert "isa avx2 not available here" in out, out  # the x86 path compiles to a stub on ARM
    assert out.rstrip().endswith("all passed"), out


def test_portable_loops_are_neon_vector_code(cross_build):
    _, asm = cross_build
    text = open(asm).read()
    vector_fma = len(re.findall(r"\tfmla\tv\d+\.4s", text))  # 4 fp32 lanes
    scalar_fma = len(re.findall(r"\tfmadd\ts\d+", text))       # the loops' scalar remainders
    # 24 exp loops (3 dtypes x sum_exp/grad_span variants), each a 5-term polynomial plus the reduction
    assert vector_fma >= 24 * 6, f"only {vector_fma} vector FMAs (scalar: {scalar_fma}): the loops were not vectorised"
    assert re.search(r"\tfcvtl2?\tv\d+\.4s, v\d+\.[48]h", text), "fp16 loads are not vectorised (fcvtl)"
