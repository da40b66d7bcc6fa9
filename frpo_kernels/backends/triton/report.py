"""python -m frpo_kernels.backends.triton.report [--json]: registers, shared memory and spills of every
compiled kernel specialisation (sm_80, sm_90), and the DRAM bytes each kernel moves per token.

Bytes per token come from the kernels' load/store design, counted in their TTIR: sweeps over the
row (loads / stores of [ROWS, BLOCK_V] tiles inside a loop) and per-token arrays read or written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

H100_BYTES_PER_S = 3.35e12
N_TOKENS, VOCAB = 4096, 151_936
L2_ASSUMPTION = (
    "The fused kernel sweeps each row twice (sum-exp, then gradient). The second read is counted "
    "as an L2 hit: it holds while L2 keeps every row in flight, (programs in flight) x (row bytes) "
    "<= L2 share; launch.fused_programs bounds the programs started to make that so (at least one "
    "per SM: for V=151,936 fp32, 132 SMs x 594 KiB exceeds H100's 50 MiB L2, so part of the "
    "re-read will come from DRAM - to be measured, bench/). Forward reads a row once; backward "
    "reads it once and writes the gradient once. The target logit is re-read from a row that is "
    "in cache; it is not counted.")

# Per-token arrays each kernel touches exactly once, with every feature on (bytes per token):
# ids int64, mask uint8, lse two float32 (hi, lo), everything else float32.
PER_TOKEN = {
    "forward": {"ids": 8, "mask": 1, "logp": 4, "lse": 8, "entropy": 4},
    "backward": {"ids": 8, "mask": 1, "lse": 8, "dlogp": 4, "entropy": 4, "dentropy": 4},
    "fused": {"ids": 8, "mask": 1, "coef": 4, "kl_coef": 4, "ref": 4, "old": 4, "ratio_lo": 4, "ratio_hi": 4,
              "entropy_coef": 4, "logp": 4, "lse": 8, "entropy": 4},
}


def row_sweeps(ttir: str) -> tuple[int, int]:
    """(tile loads, tile stores) over a row inside loops: each is one pass over the row's V."""
    loads = stores = 0
    regions = []  # open regions, innermost last: True for an scf.for body
    for line in ttir.splitlines():
        code = line.split(" loc(")[0].strip()
        if code.startswith("}") and regions:  # (the tt.func line is cut at its first loc: unseen)
            regions.pop()
        in_loop = any(regions)
        if in_loop and re.search(r"= tt\.load %\S+.* : tensor<\d+x\d+x!tt\.ptr", code):
            loads += 1
        elif in_loop and re.search(r"^tt\.store %\S+.* : tensor<\d+x\d+x!tt\.ptr", code):
            stores += 1
        if code.endswith("{"):
            regions.append("scf.for" in code)
    return loads, stores


def bytes_per_token(kernel: str, element_bytes: int, ttir: str, vocab: int = VOCAB) -> int:
    """DRAM bytes per token: one read of the row however many sweeps read it (the re-read is an
    L2 hit, see L2_ASSUMPTION), one write per storing sweep, plus the per-token arrays."""
    loads, stores = row_sweeps(ttir)
    dram_row_passes = min(loads, 1) + stores
    return dram_row_passes * vocab * element_bytes + sum(PER_TOKEN[kernel].values())


def rows(results):
    from frpo_kernels.backends.triton.aot import ELEMENT_BYTES
    out = []
    for r in results:
        spec = r["spec"]
        loads, stores = row_sweeps(r["ttir"])
        out.append({
            "kernel": spec.kernel, "target": spec.target, "dtype": spec.dtype, "config": spec.config,
            "aligned": spec.aligned, "int64_strides": spec.int64_strides,
            "n_regs": r["n_regs"], "n_spills": r["stack"] + r["local"],
            "shared_bytes": r["static_shared"] + r["dynamic_shared"],
            "row_load_sweeps": loads, "row_store_sweeps": stores, "V": VOCAB,
            "bytes_per_token": bytes_per_token(spec.kernel, ELEMENT_BYTES[spec.dtype], r["ttir"]),
        })
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one entry per kernel")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    from frpo_kernels.backends.triton.aot import compile_all
    table = rows(compile_all(workers=args.workers))
    if args.json:
        json.dump(table, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'kernel/dtype/config/target':44} {'regs':>5} {'spill':>5} {'smem':>6} {'B/token':>9}")
    for r in table:
        label = f"{r['kernel']}/{r['dtype']}/{r['config']}/{r['target']}"
        label += ("" if r["aligned"] else ",unaligned") + (",i64" if r["int64_strides"] else "")
        print(f"{label:44} {r['n_regs']:5d} {r['n_spills']:5d} {r['shared_bytes']:6d} "
              f"{r['bytes_per_token']:9d}")
    spills = [r for r in table if r["n_spills"]]
    print(f"\n{len(table)} specialisations, max registers {max(r['n_regs'] for r in table)}, "
          f"{len(spills)} with spills (STACK+LOCAL > 0)")
    print(f"\nDRAM floor at N={N_TOKENS} tokens, V={VOCAB}, H100 {H100_BYTES_PER_S / 1e12} TB/s:")
    seen = set()
    for r in table:
        key = (r["kernel"], r["dtype"])
        if key in seen:
            continue
        seen.add(key)
        total = r["bytes_per_token"] * N_TOKENS
        print(f"  {r['kernel']:8} {r['dtype']}: {r['row_load_sweeps']} row read sweep(s), "
              f"{r['row_store_sweeps']} write sweep(s); {r['bytes_per_token']:,} B/token, "
              f"{total / 2**30:.2f} GiB, {total / H100_BYTES_PER_S * 1e3:.3f} ms")
    print("\nAssumption: " + L2_ASSUMPTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
