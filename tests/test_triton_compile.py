"""Ahead-of-time compilation of every Triton kernel specialisation for sm_80 and sm_90, no GPU needed:
each must produce PTX and a cubin, spill nothing (cuobjdump: STACK and LOCAL 0), and widen the
row strides to int64 before multiplying (B*T*V may exceed 2**31)."""
import itertools
import os
import re

import pytest
import torch

pytest.importorskip("triton")

from frpo_kernels.backends.triton import aot  # noqa: E402
from frpo_kernels.backends.triton.configs import CONFIGS, select_config  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    if not os.path.exists(aot.cuobjdump_path()):
        pytest.skip("this triton ships no cuobjdump")
    # Spawned workers, triton's on-disk cache in a temp dir: a rerun takes seconds.
    return aot.compile_all(workers=min(2, os.cpu_count() or 1))


def test_every_kernel_dtype_config_and_target_compiles(compiled):
    got = {(r["spec"].kernel, r["spec"].dtype, r["spec"].config, r["spec"].capability)
           for r in compiled}
    want = set(itertools.product(aot.KERNELS, aot.DTYPES, [c.name for c in CONFIGS], aot.TARGETS))
    assert want <= got
    for r in compiled:
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, r["spec"].label


def test_no_register_spills(compiled):
    spilled = [f"{r['spec'].label}: REG:{r['n_regs']} STACK:{r['stack']} LOCAL:{r['local']}"
               for r in compiled if r["stack"] or r["local"]]
    assert not spilled, "spills:\n" + "\n".join(spilled)


def test_row_strides_are_widened_to_int64_before_use(compiled):
    checked = 0
    for r in compiled:
        if r["spec"].int64_strides:
            continue
        body = [line for line in r["ttir"].splitlines()
                if not line.startswith("#") and "tt.func" not in line]
        for name in aot._ROW_INTS:
            uses = [line.strip() for line in body if re.search(rf"%{name}\b", line)]
            for use in uses:
                assert re.search(rf"= arith\.extsi %{name} : i32 to i64", use), \
                    f"{r['spec'].label}: {name} used as i32: {use[:120]}"
            checked += len(uses)
    assert checked > 0


def test_the_launcher_only_picks_listed_configs():
    for vocab, dtype in itertools.product([1, 37, 256, 257, 1024, 1025, 8192, 8193, 151_936, 262_144],
                                          [torch.float32, torch.bfloat16, torch.float16]):
        assert select_config(vocab, dtype) in CONFIGS
