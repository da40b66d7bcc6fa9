"""Triton backend of the kernel contract in frpo_kernels/reference.py: forward, backward, fused.

Launchers only: allocate outputs, pick the configuration, launch. CUDA tensors run compiled
kernels; CPU tensors run them in Triton's interpreter, and only when TRITON_INTERPRET=1 is set.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

try:
    import triton
    from triton.runtime.jit import JITFunction
    _IMPORT_ERROR = None
except ImportError as exc:  # availability() reports it; nothing below runs without triton
    triton = JITFunction = None
    _IMPORT_ERROR = exc

from frpo_kernels.triton.configs import select_config

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability():
    """(True, "") if the Triton kernels can run; (False, reason) otherwise."""
    if _IMPORT_ERROR is not None:
        return False, f"triton cannot be imported ({_IMPORT_ERROR}); pip install triton"
    try:
        load_kernels(interpreted=_interpret_env())
    except Exception as exc:  # a triton too old for these kernels, for instance
        return False, f"the triton kernels do not load with triton {triton.__version__} ({exc})"
    return True, ""


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_loaded = {}


def load_kernels(interpreted: bool):
    """The kernels module with compiled (False) or interpreted (True) @triton.jit functions.

    triton decides at decoration time from TRITON_INTERPRET; the module is imported normally and,
    if it was decorated the other way, a private copy is executed with the variable set as needed.
    So CPU (interpreted) and CUDA (compiled) calls and the AOT compile test share one source file.
    """
    if interpreted in _loaded:
        return _loaded[interpreted]
    from frpo_kernels.triton import kernels
    if isinstance(kernels.forward_kernel, JITFunction) != interpreted:
        module = kernels
    else:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpreted else "0"
        try:
            name = "frpo_kernels.triton._kernels_" + ("interpreted" if interpreted else "compiled")
            spec = importlib.util.spec_from_file_location(name, kernels.__file__)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
    _loaded[interpreted] = module
    return module


def _kernels_for(logits):
    if _IMPORT_ERROR is not None:
        raise RuntimeError(availability()[1])
    if logits.device.type == "cuda":
        from frpo_kernels.triton import kernels  # compiled, or interpreted if TRITON_INTERPRET was set
        return kernels
    if logits.device.type == "cpu" and _interpret_env():
        return load_kernels(interpreted=True)
    raise ValueError("the triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                     f"logits are on {logits.device}")


def _check(logits, ids):
    if logits.dim() != 3 or logits.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"logits must be [B, T, V] float32/bfloat16/float16, got {tuple(logits.shape)} "
                        f"{logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must have stride(-1) == 1 (the kernels read rows as contiguous runs)")
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"ids must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(ids.shape)}")


def _per_token(x, logits, dtype):
    """x as a contiguous [B, T] tensor of dtype on the logits' device (scalars broadcast)."""
    return torch.as_tensor(x, device=logits.device).to(dtype).expand(logits.shape[:2]).contiguous()


def _common(logits, ids, mask):
    batch, length, vocab = logits.shape
    ids = _per_token(ids, logits, torch.int64)
    # bool and uint8 share a layout; the kernel tests mask != 0.
    mask_u8 = None if mask is None else _per_token(mask, logits, torch.bool).view(torch.uint8)
    cfg = select_config(vocab, logits.dtype)
    grid = (triton.cdiv(batch * length, cfg.rows),)
    return ids, mask_u8, cfg, grid


class _on_device:
    """Launch on the logits' CUDA device (triton launches on the current one)."""

    def __init__(self, tensor):
        self.ctx = torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def forward(logits, ids, mask, temperature, with_entropy):
    _check(logits, ids)
    module = _kernels_for(logits)
    batch, length, vocab = logits.shape
    ids, mask_u8, cfg, grid = _common(logits, ids, mask)
    logp = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if logp.numel() == 0:
        return logp, lse, entropy
    with _on_device(logits):
        module.forward_kernel[grid](
            logits, logits.stride(0), logits.stride(1), ids, ids if mask_u8 is None else mask_u8,
            logp, lse, logp if entropy is None else entropy, batch * length, length, vocab,
            1.0 / float(temperature), HAS_MASK=mask_u8 is not None, WITH_ENTROPY=bool(with_entropy),
            **cfg.meta(), **cfg.launch())
    return logp, lse, entropy


def _grad_output(logits, inplace):
    if inplace:
        return logits
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature, inplace=False):
    _check(logits, ids)
    module = _kernels_for(logits)
    batch, length, vocab = logits.shape
    ids, mask_u8, cfg, grid = _common(logits, ids, mask)
    with_entropy_grad = entropy is not None and dentropy is not None
    lse = _per_token(lse, logits, torch.float32)
    dlogp = _per_token(dlogp, logits, torch.float32)
    entropy = _per_token(entropy, logits, torch.float32) if with_entropy_grad else lse
    dentropy = _per_token(dentropy, logits, torch.float32) if with_entropy_grad else lse
    grad = _grad_output(logits, inplace)
    if lse.numel() == 0:
        return grad
    with _on_device(logits):
        module.backward_kernel[grid](
            logits, logits.stride(0), logits.stride(1), ids, ids if mask_u8 is None else mask_u8,
            lse, dlogp, entropy, dentropy, grad, grad.stride(0), grad.stride(1), batch * length,
            length, vocab, 1.0 / float(temperature), HAS_MASK=mask_u8 is not None,
            WITH_ENTROPY_GRAD=with_entropy_grad, **cfg.meta(), **cfg.launch())
    return grad


def fused(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, inplace=False):
    _check(logits, ids)
    module = _kernels_for(logits)
    batch, length, vocab = logits.shape
    ids, mask_u8, cfg, grid = _common(logits, ids, mask)
    has_kl = kl_coef is not None
    if has_kl and ref_logps is None:
        raise ValueError("fused: kl_coef needs ref_logps")
    coef = _per_token(coef, logits, torch.float32)
    kl_coef = _per_token(kl_coef, logits, torch.float32) if has_kl else coef
    ref_logps = _per_token(ref_logps, logits, torch.float32) if has_kl else coef
    logp = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    grad = _grad_output(logits, inplace)
    if logp.numel() == 0:
        return logp, lse, entropy, grad
    with _on_device(logits):
        module.fused_kernel[grid](
            logits, logits.stride(0), logits.stride(1), ids, ids if mask_u8 is None else mask_u8,
            coef, kl_coef, ref_logps, logp, lse, logp if entropy is None else entropy, grad,
            grad.stride(0), grad.stride(1), batch * length, length, vocab, 1.0 / float(temperature),
            HAS_MASK=mask_u8 is not None, HAS_KL=has_kl, WITH_ENTROPY=bool(with_entropy),
            **cfg.meta(), **cfg.launch())
    return logp, lse, entropy, grad
