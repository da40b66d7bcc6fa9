"""Launch configurations of the Triton kernels: a short explicit list, chosen by V and dtype.

The list is what the AOT compile test (tests/test_triton_compile.py) and the report compile, so
every configuration a user can hit is checked for compile errors and register spills.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    name: str
    rows: int        # rows per program (power of two); > 1 only where V is small
    block_v: int     # tile width over V (power of two)
    num_warps: int
    num_stages: int = 1  # a streaming reduction: latency is hidden by occupancy, not smem stages

    def meta(self):
        return {"ROWS": self.rows, "BLOCK_V": self.block_v}

    def launch(self):
        # enable_fp_fusion=False: no multiply fused into the add that uses it, so z = x/T is rounded
        # before the max is subtracted, as the max itself was (a row's largest logit then gets exp(0) = 1,
        # not exp(residual): the CPU kernels' fix, tests/test_no_silent_wrong_answers.py, 5c)
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": False}


CONFIGS = (
    # Tiles of 16 elements per thread (8 for the 2-D small-V tiles): the fused kernel's 2-D tiles
    # spill at 32 per thread (STACK:8 at 128 registers), and with 16 per thread when V is not a
    # multiple of 16 (no vector loads: a 64-bit address per element, 255 registers). rows4_v1024's
    # warps follow ptxas: at 8 warps triton 3.6's kept the bf16/fp16 fused kernel at 64 registers and
    # spilled (STACK:8), so it had 16; once the fused kernel kept the row's max and log-sum apart
    # (lse = m + log s, for precision), 16 warps spilled the fp32 one under 3.6 (sm_90, 64
    # registers, STACK:8) and 8 warps spilled nothing under either version (64-117 registers).
    # Check both versions: tests/test_triton36.py (the report under triton 3.6).
    KernelConfig("rows8_v256", rows=8, block_v=256, num_warps=8),
    KernelConfig("rows4_v1024", rows=4, block_v=1024, num_warps=8),
    KernelConfig("row_v2048", rows=1, block_v=2048, num_warps=4),
    KernelConfig("row_v4096", rows=1, block_v=4096, num_warps=8),
    KernelConfig("row_v8192", rows=1, block_v=8192, num_warps=16),
)
_BY_NAME = {c.name: c for c in CONFIGS}


def select_config(V: int, dtype: torch.dtype) -> KernelConfig:
    """The configuration for rows of V logits of this dtype.

    Small V: several rows per program so a program still moves >= 4k elements per tile. Large V:
    one row per program, 16 KiB tiles for fp32 and bf16/fp16 alike (fewer loop trips for 2-byte
    types); registers and spills: python -m frpo_kernels.backends.triton.report.
    """
    if V <= 256:
        return _BY_NAME["rows8_v256"]
    if V <= 1024:
        return _BY_NAME["rows4_v1024"]
    if V <= 8192:
        return _BY_NAME["row_v2048"]
    if dtype == torch.float32:
        return _BY_NAME["row_v4096"]
    return _BY_NAME["row_v8192"]
