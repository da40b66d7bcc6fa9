#!/usr/bin/env bash
# One GPU check of the Triton backend, at most 8 minutes on one H100 (details: bench/gpu_check.py):
#   1. Triton numerics on CUDA tensors against the torch reference (kernels, loss(), hidden-states path)
#   2. timings at V = 151936 bf16, N in {8192, 32768}: token_logprobs, loss() and the hidden-states
#      path against torch eager, torch.compile, TRL's chunked function and Liger where installed
#   3. bench/results-gpu.md and bench/results-gpu.json
# Without CUDA it says so and exits 0. Extra arguments go to gpu_check.py (e.g. --budget-s 300).
set -euo pipefail
cd "$(dirname "$0")/.."
# gpu_check.py stops starting measurements after --budget-s (default 420 s) and then writes its
# results; the outer limit only catches a hang (one measurement that never returns).
exec timeout -k 10 470 python bench/gpu_check.py "$@"
