#!/usr/bin/env bash
# Creates, once, the virtual environment in which tests/test_triton36.py checks the Triton kernels
# under triton 3.6, the version the lent GPU machine carries (with torch 2.11, no network): it runs
# `python bench/gpu_check.py --smoke` (the kernels in triton 3.6's interpreter) and
# `python -m frpo_kernels.backends.triton.report` (triton 3.6's compiler: sm_80/sm_90 cubins, registers, spills).
# What matters is triton's version, not torch's: torch is the same 2.13.0 CPU build as the main
# environment (installs in seconds). Do not pin torch 2.11 here: its wheel pulls several GB of CUDA
# libraries (and triton 3.6 itself as a dependency) for nothing a CPU machine can run.
# frpo_kernels comes from this checkout through PYTHONPATH, unbuilt (the C++ extension is not needed:
# the triton and torch backends do not use it, and backends/cpu.py falls back when it cannot be loaded).
# Reruns are a no-op while the stamp (Python, pins) matches. FRPO_TRITON36_VENV: where (default
# .venv-triton36).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FRPO_TRITON36_VENV:-.venv-triton36}
python=${PYTHON:-python}
pins="triton==3.6.0 torch==2.13.0 numpy==2.4.6 pytest==9.0.3 hypothesis==6.155.2"
stamp="$venv/frpo-triton36-stamp"
want="$("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])') $pins"

. scripts/venv_cache.sh
venv_begin "$venv" "$stamp" "$want" "triton 3.6 venv"
# torch's own dependencies come unpinned from the resolver; --no-compile keeps the install short
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile $pins
"$venv/bin/python" -c "import triton, torch; assert triton.__version__ == '3.6.0', triton.__version__"
venv_done
