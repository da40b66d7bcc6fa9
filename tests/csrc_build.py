"""Builds the torch-free core and its C++ test (csrc/tests/test_logprob_kernels.cpp) outside CMake, with
the sources and flags of frpo_kernels/_build.py, for the builds CMake does not make here: the aarch64
cross build (test_csrc_aarch64.py) and the AVX-512 file on SIMDe (test_csrc_avx512_simde.py)."""
import os
import subprocess

from frpo_kernels import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_TEST = os.path.join(ROOT, "csrc", "tests", "test_logprob_kernels.cpp")


def core_flags():
    return _build.core_compile_flags(ROOT)


def run_all(commands, timeout=600):
    """Runs the commands side by side; asserts each succeeded, with its log."""
    procs = [(cmd, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for cmd in commands]
    logs = []
    for cmd, proc in procs:
        log, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-6000:]}"
        logs.append(log)
    return logs


def core_test_binary(cxx, out_dir, flags=(), link_flags=(), also=()):
    """Compiles the core and its C++ test with cxx (core_flags() + flags), side by side with the extra
    commands `also`, and links the test; returns the binary's path."""
    sources = [os.path.join(ROOT, s) for s in _build.CORE_SOURCES] + [CORE_TEST]
    objects = [os.path.join(out_dir, f"{k}.o") for k in range(len(sources))]
    run_all([[cxx, *core_flags(), *flags, "-c", src, "-o", obj] for src, obj in zip(sources, objects)] + list(also))
    binary = os.path.join(out_dir, "test_logprob_kernels")
    run_all([[cxx, *link_flags, *objects, "-o", binary]])
    return binary
