"""The AVX-512 path on a machine without AVX-512: csrc/core/logprob_kernels_avx512.cpp built with
FRPO_AVX512_SIMDE on SIMDe's portable implementations of the same intrinsics (the simde-py package,
plus csrc/tests/avx512_simde.h for the three it lacks), with the core's C++ tests (csrc/tests: every
dtype, vector tails, streaming stores, non-finite logits, compared with a float64 reference) run on it,
under AddressSanitizer and UBSan.
Where the CPU has AVX-512 the extension's own tests run the real path (tests/test_cpu_isa.py); here the
native build is checked to be AVX-512 code.
"""
import os
import re

import pytest

from csrc_build import ROOT, core_flags, core_test_binary, run_all

simde_py = pytest.importorskip("simde_py", reason="simde-py not installed (pip install simde-py; in requirements.txt)")

CXX = os.environ.get("CXX", "g++")
AVX512_SOURCE = os.path.join(ROOT, "csrc", "core", "logprob_kernels_avx512.cpp")

# SIMDe's loads and stores are memcpy: under AddressSanitizer a vector access past a row's end is caught.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def test_core_tests_pass_on_the_avx512_path_emulated(tmp_path):
    emulated = ["-DFRPO_AVX512_SIMDE", f"-I{simde_py.get_include()}", f"-I{os.path.join(ROOT, 'csrc', 'tests')}",
                "-Wno-psabi", *SANITIZE]  # -Wno-psabi: SIMDe passes its 512-bit structs by value
    binary = core_test_binary(CXX, str(tmp_path), flags=emulated, link_flags=SANITIZE)
    (out,) = run_all([[binary]])
    assert "isa avx512: done" in out, out[-6000:]
    assert out.rstrip().endswith("all passed"), out[-6000:]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the AVX-512 path is built on x86-64 only")
def test_native_build_is_avx512_code(tmp_path):
    """The shipped build (no SIMDe) turns the same file into 512-bit instructions: FMAs on zmm registers,
    the bf16 word permutes and streaming stores."""
    asm = str(tmp_path / "avx512.s")
    run_all([[CXX, *core_flags(), "-S", AVX512_SOURCE, "-o", asm]])
    text = open(asm).read()
    zmm_fma = len(re.findall(r"\tvfn?madd\d+ps\t[^\n]*%zmm", text))
    assert zmm_fma >= 24 * 6, f"only {zmm_fma} FMAs on zmm registers"
    for what, pattern in [("bf16 pack of 32 (vpermt2w / vpermi2w)", r"\tvperm[ti]2w\t"),
                          ("bf16 pack of 16 (vpermw)", r"\tvpermw\t"),
                          ("streaming fp32 stores", r"\tvmovntps\t%zmm"),
                          ("fp16 loads (vcvtph2ps to zmm)", r"\tvcvtph2ps\t[^\n]*%zmm")]:
        assert re.search(pattern, text), f"no {what} in the AVX-512 build"
