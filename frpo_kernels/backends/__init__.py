"""The kernel backends, and the one place one is chosen for a tensor: "torch" (torch_reference.py,
the spec), "cpu" (cpu.py, loader of csrc/) or "triton" (triton/). Each exposes forward / backward /
fused with the contract written in torch_reference.py; ops/ holds the autograd wrappers that call them.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODULE_PATHS = {"cpu": "frpo_kernels.backends.cpu", "triton": "frpo_kernels.backends.triton.launch"}
_loaded = {}  # a plain dict lookup once loaded, so torch.compile can trace resolve() without a break
_available = {}  # backend name -> (ok, reason), probed once per process
_warned_fallback = set()


def _module(name):
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULE_PATHS[name])
    return module


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, logits: torch.Tensor) -> str:
    """Name of the backend that will run for these logits; raises ValueError if unusable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if logits.dtype not in KERNEL_DTYPES:
            return "torch"
        wanted = "triton" if logits.device.type == "cuda" else "cpu" if logits.device.type == "cpu" else None
        if wanted is None:
            return "torch"
        ok, why = _availability(wanted, logits)
        if not ok:
            if wanted not in _warned_fallback:
                _warned_fallback.add(wanted)
                warnings.warn(f"frpo_kernels: {wanted} kernels not used ({why}); using the "
                              "torch reference", RuntimeWarning, stacklevel=3)
            return "torch"
        return wanted
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend={backend!r} takes logits of dtype float32, bfloat16 or float16, "
                        f"got {logits.dtype}; use backend='torch' for {logits.dtype}")
    ok, why = _availability(backend, logits)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    return backend


def _availability(name, logits):
    if name == "cpu":
        if logits.device.type != "cpu":
            return False, f"the cpu backend takes CPU tensors, logits are on {logits.device}"
    elif name == "triton":
        if logits.device.type != "cuda" and not (_triton_interpreted() and logits.device.type == "cpu"):
            return False, ("the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                           f"set before Python starts); logits are on {logits.device}")
    return _module_availability(name)


def _module_availability(name):
    known = _available.get(name)
    if known is None:
        try:
            known = _module(name).availability()
        except ImportError as exc:
            known = (False, f"cannot import it ({exc})")
        _available[name] = known
    return known


def kernels(name: str):
    """The kernel module (forward/backward/fused) of a resolved backend name."""
    if name == "torch":
        from frpo_kernels.backends import torch_reference
        return torch_reference
    return _module(name)
