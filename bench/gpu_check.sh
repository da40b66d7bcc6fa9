#!/usr/bin/env bash
# One GPU check of the Triton backend, at most 8 minutes on one H100/H200 (details: bench/gpu_check.py):
#   1. Triton numerics on CUDA tensors against the torch reference (kernels, loss(), hidden-states path)
#   2. timings at V = 151936 bf16, N in {8192, 32768}: token_logprobs, loss() and the hidden-states
#      path against torch eager, torch.compile, TRL's chunked function and Liger where importable
#   3. bench/results-gpu.md and bench/results-gpu.json
# Without CUDA it says so and exits 0. Extra arguments go to gpu_check.py (e.g. --budget-s 300).
# Needs only torch and triton (the lent machine: torch 2.11, triton 3.6, no network) and this source
# tree, unbuilt: the CPU extension is not used, and FRPO_NO_JIT keeps anything from compiling it.
# trl and Liger are optional; pure-Python wheels put in bench/wheels/ (git-ignored) are unpacked
# into a temporary folder on PYTHONPATH (Liger 0.8.5 imports from a plain unpack with triton 3.6; trl
# needs transformers and its own dependencies as well).
set -euo pipefail
cd "$(dirname "$0")/.."
export FRPO_NO_JIT=${FRPO_NO_JIT:-1}
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  for wheel in "${wheels[@]}"; do
    python -m zipfile -e "$wheel" "$site"
  done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check.sh: on PYTHONPATH from bench/wheels: ${wheels[*]##*/}"
fi
# gpu_check.py stops starting measurements after --budget-s (default 420 s) and then writes its
# results; the outer limit only catches a hang (one measurement that never returns).
timeout -k 10 470 python bench/gpu_check.py "$@"
