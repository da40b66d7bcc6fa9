"""How csrc/ is compiled, in one place: read by setup.py, the JIT fallback in backends/cpu.py, CMakeLists.txt
(which runs this file: `python frpo_kernels/_build.py cmake`), tests/csrc_build.py (the aarch64 cross
build and the AVX-512-on-SIMDe build) and csrc/bench/mca_loops.py.

Standard library only: setup.py and CMake load it without importing frpo_kernels or torch.
"""
from __future__ import annotations

import sys

# The torch-free core (csrc/core): built into the extension, the CMake library and the cross build.
# The AVX2 and AVX-512 files use per-function target attributes, so every file takes the same flags and
# the binary runs on any CPU of its architecture (the vector path is chosen at run time).
CORE_SOURCES = (
    "csrc/core/logprob_kernels.cpp",
    "csrc/core/logprob_kernels_portable.cpp",
    "csrc/core/logprob_kernels_avx2.cpp",
    "csrc/core/logprob_kernels_avx512.cpp",
)
EXTENSION_SOURCES = ("csrc/ops.cpp",) + CORE_SOURCES  # + the torch binding
INCLUDE_DIRS = ("csrc",)
# -O3: the portable loops are vectorised at -O3 (GCC 12 vectorises only cheap loops at -O2).
# -fno-math-errno: std::exp / std::log / std::fma need not set errno, so they inline.
# -fopenmp-simd: the portable loops' `#pragma omp simd` (vector lanes for the sums), no OpenMP runtime.
# -fno-trapping-math: nothing here reads the FP exception flags; without it GCC 12 will not turn the
# exp argument's clamp (a float compare and select) into vector code, and the portable loops stay
# scalar. NaN and inf are still honoured (this is not -ffinite-math-only).
CXX_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-Wall", "-Wextra",
             "-Wno-unused-parameter")
# The language standard of the torch-free builds (CMake, the aarch64 cross build). The extension takes
# torch's own (-std=c++20 for torch 2.13's headers; forcing c++17 there made them warn).
CORE_STD_FLAGS = ("-std=c++17",)
# torch's ATen parallel backend is OpenMP and at::parallel_for is inlined into ops.cpp, so the extension
# is compiled and linked with it; the core itself has no OpenMP (callers split rows across threads).
OPENMP_FLAGS = ("-fopenmp",)


def core_compile_flags(root):
    """The compiler flags of a torch-free build of the core outside CMake, for the checkout at root."""
    return list(CXX_FLAGS + CORE_STD_FLAGS) + [f"-I{root}/{d}/core" for d in INCLUDE_DIRS]


if __name__ == "__main__":
    if sys.argv[1:] != ["cmake"]:
        sys.exit("usage: python frpo_kernels/_build.py cmake")
    for name in ("CORE_SOURCES", "EXTENSION_SOURCES", "INCLUDE_DIRS", "CXX_FLAGS", "CORE_STD_FLAGS", "OPENMP_FLAGS"):
        for value in globals()[name]:  # one "FRPO_<NAME> <item>" line per list item
            print(f"FRPO_{name} {value}")
