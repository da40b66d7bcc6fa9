"""Builds the torch-free C++ core and its tests (csrc/tests) with CMake under ASan+UBSan and runs ctest.

Skipped only when cmake is not installed; a compiler or test failure fails the test with the log.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (apt-get install cmake)")
def test_core_under_asan_and_ubsan(tmp_path):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    build = str(tmp_path / "build")
    _run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Debug", "-DFRPO_SANITIZE=ON",
          "-DFRPO_BUILD_BENCH=OFF"], ROOT, env)
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], ROOT, env)
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], ROOT, env)
    assert "100% tests passed" in out, out
