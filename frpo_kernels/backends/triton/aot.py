"""Ahead-of-time compilation of every kernel specialisation to PTX + cubin, without a GPU.

Used by tests/test_triton_compile.py and the report: triton.compile on an ASTSource for sm_80 and
sm_90 targets, then register / stack / local / shared usage read from the cubin with the
cuobjdump that ships with triton. Results are cached on disk (triton's cache, in a temp dir).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
import multiprocessing

from frpo_kernels.backends.triton.configs import CONFIGS

DTYPES = ("fp32", "bf16", "fp16")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TARGETS = (80, 90)  # compute capabilities: A100 and H100
KERNELS = ("forward", "backward", "fused")

# Every optional feature on: the specialisation with the most live values per kernel.
ALL_FEATURES = {
    "forward": {"HAS_MASK": True, "WITH_ENTROPY": True},
    "backward": {"HAS_MASK": True, "WITH_ENTROPY_GRAD": True},
    "fused": {"HAS_MASK": True, "HAS_KL": True, "HAS_GATE": True, "WITH_ENTROPY": True, "HAS_ENTROPY_GRAD": True,
              "GATE_KIND": 2},  # sapo's soft gate: the most live values of the three
}
_ROW_INTS = ("stride_b", "stride_t", "grad_stride_b", "grad_stride_t")


@dataclass(frozen=True)
class Spec:
    kernel: str            # forward / backward / fused
    dtype: str             # fp32 / bf16 / fp16 (logits and grad)
    config: str            # a KernelConfig name
    capability: int        # 80 / 90
    aligned: bool = True   # strides and V multiples of 16 (vectorised loads), as for padded vocabs
    int64_strides: bool = False  # strides >= 2**31 (huge B*T*V): triton passes them as i64

    @property
    def target(self):
        return f"sm_{self.capability}"

    @property
    def label(self):
        extra = ("" if self.aligned else ",unaligned") + (",i64" if self.int64_strides else "")
        return f"{self.kernel}/{self.dtype}/{self.config}/{self.target}{extra}"


def specialisations():
    """The specialisations users hit: each kernel x dtype x config x target, with every feature
    on; plus the unaligned-vocab variants (V % 16 != 0, scalar loads) on sm_90 and i64 strides."""
    specs = [Spec(k, d, c.name, cap) for k in KERNELS for d in DTYPES for c in CONFIGS for cap in TARGETS]
    specs += [Spec(k, d, c.name, 90, aligned=False) for k in KERNELS for d in DTYPES for c in CONFIGS]
    specs += [Spec(k, "bf16", "row_v8192", 90, int64_strides=True) for k in KERNELS]
    return specs


def _signature(fn, spec, constexprs):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in ("logits_ptr", "grad_ptr"):
            sig[name] = "*" + spec.dtype
        elif name == "ids_ptr":
            sig[name] = "*i64"
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name in ("ratio_lo_ptr", "ratio_hi_ptr"):  # the gate's bounds are float64 (launch.fused)
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "inv_temperature":
            sig[name] = "fp32"
        elif name in _ROW_INTS and spec.int64_strides:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
        # What the JIT infers at launch: torch allocations are 16-byte aligned; ints that are
        # multiples of 16 get the divisibility hint.
        if name.endswith("_ptr") or (spec.aligned and (name in _ROW_INTS or name == "V")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def cuobjdump_path():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cache_dir():
    return os.path.join(tempfile.gettempdir(), "frpo_kernels_triton_aot")


def compile_spec(spec: Spec) -> dict:
    """Compile one specialisation; returns its resource usage (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from frpo_kernels.backends.triton import kernels

    cfg = {c.name: c for c in CONFIGS}[spec.config]
    fn = getattr(kernels, f"{spec.kernel}_kernel")
    if not isinstance(fn, JITFunction):
        raise RuntimeError("AOT compilation needs triton imported without TRITON_INTERPRET")
    constexprs = {**ALL_FEATURES[spec.kernel], **cfg.meta()}
    sig, attrs = _signature(fn, spec, constexprs)
    source = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", spec.capability, 32),
                              options=cfg.launch())
    usage = cubin_usage(compiled.asm["cubin"])
    return {"spec": spec, "ttir": compiled.asm["ttir"], "ptx_bytes": len(compiled.asm["ptx"]),
            "cubin_bytes": len(compiled.asm["cubin"]), "dynamic_shared": compiled.metadata.shared,
            **usage}


def cubin_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, found.groups())
    return {"n_regs": reg, "stack": stack, "static_shared": shared, "local": local}


def _worker_init():
    # A fresh process: triton is imported compiled (the interpreter would replace tl.* with
    # interpreted functions that the compiler cannot call), with the on-disk cache in a temp dir.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_CACHE_DIR", cache_dir())
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences a warning


def compile_all(specs=None, workers=None):
    """compile_spec over specs in spawned worker processes (also with one worker: the caller may
    have imported triton under TRITON_INTERPRET)."""
    specs = specialisations() if specs is None else list(specs)
    workers = workers or max(1, min(len(specs), os.cpu_count() or 1, 4))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(compile_spec, specs, chunksize=4))


def spec_dict(spec: Spec) -> dict:
    return asdict(spec)
