"""How many rows of logits a hidden-states sweep (linear_logprobs.py) computes per tile: the rule
for CPU and CUDA, and the measurements behind it. TILE_ROWS = k forces k rows (tests, benchmarks)."""
from __future__ import annotations

import torch

# Rows per tile for every sweep when set (tests, benchmarks); None: tile_rows() chooses.
TILE_ROWS = None

_INT32_ELEMENTS = 2**31 - 1


def tile_rows(vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per tile for logits of `vocab` columns in `dtype` from a [vocab, hidden_size] head
    (TILE_ROWS overrides). The rule and its measurement: the comments at CPU_* / CUDA_* below.
    rows * vocab also stays below 2**31, so every offset inside a tile fits a 32-bit int in any
    kernel (offsets across tiles are torch's slicing, in int64)."""
    if TILE_ROWS is not None:
        return max(1, int(TILE_ROWS))
    esize = torch.empty((), dtype=dtype).element_size()
    row_bytes = vocab * esize
    if torch.device(device).type == "cuda":
        rows = CUDA_WORKSPACE_BYTES // row_bytes // 128 * 128
        rows = min(CUDA_MAX_ROWS, max(CUDA_MIN_ROWS, rows))
    else:
        cache = _last_level_cache_bytes()
        if vocab * hidden_size * esize <= cache // 2:  # the head stays cached: so can the workspace
            rows = min(cache // 2, CPU_CACHED_WORKSPACE_BYTES) // row_bytes
        else:  # the head streams from memory once per tile: enough rows to amortise it
            rows = min(CPU_STREAMING_ROWS, CPU_MAX_WORKSPACE_BYTES // row_bytes)
        rows = max(CPU_MIN_ROWS, rows // 16 * 16)
    return max(1, min(rows, _INT32_ELEMENTS // max(1, vocab)))


# CPU rule. Every GEMM of a tile reads the whole head W [V, H] once, and a tile does 2 * rows flops
# per element of W it reads. When W is larger than the last-level cache (LLC) it streams from DRAM
# on every tile, and the tile must be tall for the GEMMs to run at speed, even though the workspace
# then no longer fits in the LLC (the kernel's extra pass over it is ~20 flops per logit against
# 4H to 6H in the GEMMs); when W fits in half the LLC, a workspace of the other half is as fast.
# Measured (AMD EPYC Zen 3, 32 MiB L3, torch 2.13 MKL; 1 thread and process CPU time, because this
# 2-core VM was shared with other jobs at load 4-8: wall-clock sweeps varied 2x between rounds):
#   N=1536 rows of work, H=576, V=49152 fp32 (W 113 MB streams), linear_fused_loss fwd+bwd, min of 3:
#     rows         64     128    256    512    768
#     frozen head  4.44   3.43   3.12   3.11   2.96 s   (its GEMMs alone at 512: 3.25 s)
#     trainable    5.72   5.00   5.11   4.18   4.83 s   (its GEMMs alone at 512: 4.38 s)
#   the same on 2 threads, wall clock, once the machine was quiet (min of 3):
#     rows         128    256    512    768    1536
#     frozen head  2.59   1.97   1.87   1.84   1.48 s
#     trainable    3.36   2.83   2.70   2.59   2.83 s
#   N=4096, H=64, V=32768 fp32 (W 8 MB stays in L3), 1 thread, CPU time, min of 5:
#     rows         32     64     128    256    512    1024
#     frozen head  1.30   1.11   1.00   1.03   1.02   1.07 s
#     trainable    1.73   1.54   1.49   1.53   1.69   1.66 s
# So: 512 rows when W streams (N=4096, H=576, V=49152: a 96 MiB workspace; 256 to 1536 rows are
# within the machine's noise of each other, 128 and fewer are 10-35% slower), capped at 128 MiB of
# workspace for huge V (V=151936 fp32: 208 rows; V=262144: 128 rows); when W fits in half the LLC,
# a workspace of half the LLC (H=64, V=32768: 128 rows, 16 MiB), at most 32 MiB: a VM's sysfs reports the
# whole socket's L3 (480 MiB on a 2-core Intel Xeon slice, 2026-12-04), whose half as workspace took
# 240 MiB for those 16 MiB of speed (post hoc: the peak-memory test failed there; 128 to 512 rows measured
# alike above).
CPU_CACHED_WORKSPACE_BYTES = 32 * 2**20
CPU_STREAMING_ROWS = 512
CPU_MAX_WORKSPACE_BYTES = 128 * 2**20
CPU_MIN_ROWS = 32
# CUDA rule (not measured in this session; bench/gpu_check.sh times 1024/2048/4096 rows): the GEMMs
# read all of W once per tile and do `rows` flops per byte of bf16 W read, so cuBLAS needs ~1000
# rows to be compute-bound (H100: ~990 TFLOP/s over 3.35 TB/s = ~300 flops per byte); up to 1 GiB
# of workspace (V=151936 bf16: 3456 rows) keeps the tile count low without a large footprint.
CUDA_WORKSPACE_BYTES = 1 << 30
CUDA_MIN_ROWS = 256
CUDA_MAX_ROWS = 4096
_LLC_FALLBACK_BYTES = 32 * 2**20


def _last_level_cache_bytes():
    if "llc" not in _CACHE:
        _CACHE["llc"] = _read_llc_bytes() or _LLC_FALLBACK_BYTES
    return _CACHE["llc"]


_CACHE = {}


def _read_llc_bytes():
    """The largest cache of cpu0 from Linux sysfs (e.g. "32768K"), or None."""
    import glob

    best = None
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
        best = size if best is None else max(best, size)
    return best


def sweep_rows(active, vocab, hidden_size, dtype, device):
    """Rows per tile of a sweep over `active` rows: TILE_ROWS as set, else tile_rows() spread evenly
    over the tiles it needs (the GEMMs of a small ragged last tile run slowly)."""
    if TILE_ROWS is not None:
        return max(1, min(int(TILE_ROWS), active))
    multiple = 128 if torch.device(device).type == "cuda" else 16
    return max(1, min(_balanced(tile_rows(vocab, hidden_size, dtype, device), active, multiple), active))


def _balanced(rows, active, multiple):
    """As few tiles as `rows` allows, of about equal size (no small ragged last tile): rounded up to
    a multiple of `multiple` rows (whole GEMM blocks) where the last tile stays at least half full."""
    if active <= rows:
        return max(1, active)
    tiles = -(-active // rows)
    even = -(-active // tiles)
    rounded = -(-even // multiple) * multiple
    last = active - (tiles - 1) * rounded
    return rounded if rounded <= rows and 2 * last >= rounded else even
