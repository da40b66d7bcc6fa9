#!/usr/bin/env bash
# The per-ISA tables of bench/results.md in one command: bench_core on every path this CPU runs
# (avx512, avx2, portable) and, on x86-64, the portable loops built as 4-lane FMA code (a stand-in for
# NEON, which cannot be timed on x86), fp32 and bf16 at 2048 x 49152, interleaved by csrc/bench/cmp.py
# against the run's fastest memcpy. ROUNDS (default 3) x 7 rounds per dtype.
set -euo pipefail
cd "$(dirname "$0")/../.."
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -G Ninja >/dev/null
ninja -C build/cmake bench_core >/dev/null
commands=()
for isa in avx512 avx2 portable; do  # bench_core exits non-zero, saying why, on a path this CPU lacks
  if why=$(FRPO_CPU_ISA=$isa build/cmake/bench_core 1 64 f32 0 1 2>&1); then
    commands+=("FRPO_CPU_ISA=$isa build/cmake/bench_core")
  else
    echo "skipped $isa: ${why%%$'\n'*}"
  fi
done
if [ "$(uname -m)" = x86_64 ]; then
  cmake -S . -B build/cmake-fma128 -DCMAKE_BUILD_TYPE=Release -G Ninja \
    -DCMAKE_CXX_FLAGS="-mavx2 -mfma -mprefer-vector-width=128" >/dev/null
  ninja -C build/cmake-fma128 bench_core >/dev/null
  commands+=("FRPO_CPU_ISA=portable build/cmake-fma128/bench_core")
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores;" \
     "$(grep -m1 -ow -E 'avx512f|avx512bw|avx512_bf16|avx2|fma|asimd' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for dtype in f32 bf16; do
  echo "== $dtype $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  python csrc/bench/cmp.py "${ROUNDS:-3}" "2048 49152 $dtype 1 7" "${commands[@]}"
done
