"""Triton backend of the kernel contract in frpo_kernels/backends/torch_reference.py: forward, backward, fused.

Launchers only: allocate outputs, pick the configuration, launch. CUDA tensors run compiled
kernels; CPU tensors run in Triton's interpreter, when TRITON_INTERPRET=1 was set before import.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    _IMPORT_ERROR = None
except ImportError as exc:  # availability() reports it; nothing below runs without triton
    triton = tl = InterpretedFunction = None
    _IMPORT_ERROR = exc

from frpo_kernels.backends.triton.configs import select_config
from frpo_kernels.backends.torch_reference import GATE_KINDS, GATE_WINDOW

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability():
    """(True, "") if triton imports; (False, reason) otherwise. backends/__init__.py checks the device."""
    if _IMPORT_ERROR is not None:
        return False, f"triton cannot be imported ({_IMPORT_ERROR}); pip install triton"
    return True, ""


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreted():
    """Whether triton was imported with TRITON_INTERPRET set: only then do its own tl.* helpers
    (and so any kernel) run in the interpreter; setting the variable later has no effect."""
    return isinstance(tl.zeros, InterpretedFunction)


def _kernels_for(logits):
    if _IMPORT_ERROR is not None:
        raise RuntimeError(availability()[1])
    from frpo_kernels.backends.triton import kernels
    if logits.device.type == "cuda":
        return kernels
    if logits.device.type == "cpu" and _interpret_env():
        if not (triton_interpreted() and isinstance(kernels.forward_kernel, InterpretedFunction)):
            raise ValueError("TRITON_INTERPRET=1 was set after triton was imported; set it before "
                             "Python starts to run the triton kernels on CPU tensors")
        return kernels
    raise ValueError("the triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                     f"set before Python starts); logits are on {logits.device}")


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


def _lse_parts(lse, logits):
    """The forward's lse, [B, T, 2] float32 (hi, lo), contiguous."""
    if lse.dtype != torch.float32 or tuple(lse.shape) != (*logits.shape[:2], 2):
        raise ValueError(f"lse must be the forward's float32 [B, T, 2] = {(*logits.shape[:2], 2)} (hi, lo parts), "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    return lse.to(logits.device).contiguous()


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
    lse = torch.empty(batch, length, 2, dtype=torch.float32, device=logits.device)  # (hi, lo) parts
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
    lse = _lse_parts(lse, logits)
    dlogp = _per_token(dlogp, logits, torch.float32)
    entropy = _per_token(entropy, logits, torch.float32) if with_entropy_grad else dlogp
    dentropy = _per_token(dentropy, logits, torch.float32) if with_entropy_grad else dlogp
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


# Share of L2 the fused kernel's rows in flight may fill: the gradient rows it writes stream
# through L2 as well. A guess to be tuned on hardware (bench/), not a measured value.
L2_SHARE_FOR_ROWS = 0.5
INTERPRETER_PROGRAMS = 3  # on CPU: few programs, so the tests exercise the persistent row loop


@functools.lru_cache(maxsize=None)
def _device_limits(index):
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.L2_cache_size


def fused_programs(logits, cfg):
    """How many fused programs to start. Each re-reads its rows right after reading them; the
    re-read hits L2 only while L2 holds every row in flight, so start about
    L2_SHARE_FOR_ROWS * L2 / (bytes of a program's rows) programs, and at least one per SM."""
    batch, length, vocab = logits.shape
    tiles = triton.cdiv(batch * length, cfg.rows)
    if logits.device.type != "cuda":
        return max(1, min(tiles, INTERPRETER_PROGRAMS))
    sms, l2_bytes = _device_limits(logits.device.index if logits.device.index is not None
                                   else torch.cuda.current_device())
    tile_bytes = cfg.rows * vocab * logits.element_size()
    fit = int(L2_SHARE_FOR_ROWS * l2_bytes) // tile_bytes
    return max(1, min(tiles, max(sms, fit)))


def fused(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, inplace=False,
          old_logps=None, ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=GATE_WINDOW):
    _check(logits, ids)
    if gate_kind not in GATE_KINDS:
        raise ValueError(f"fused: gate_kind must be one of {GATE_KINDS}, got {gate_kind!r}")
    module = _kernels_for(logits)
    batch, length, vocab = logits.shape
    ids, mask_u8, cfg, grid = _common(logits, ids, mask)
    has_kl = kl_coef is not None
    if has_kl and ref_logps is None:
        raise ValueError("fused: kl_coef needs ref_logps")
    coef = _per_token(coef, logits, torch.float32)
    kl_coef = _per_token(kl_coef, logits, torch.float32) if has_kl else coef
    ref_logps = _per_token(ref_logps, logits, torch.float32) if has_kl else coef
    has_gate = old_logps is not None
    if has_gate != (ratio_lo is not None) or has_gate != (ratio_hi is not None):
        raise ValueError("fused: pass old_logps, ratio_lo and ratio_hi together, or none of them")
    # the bounds in float64: the kernel compares the log-ratio with them in double (torch_reference's contract)
    gate = [_per_token(old_logps, logits, torch.float32), _per_token(ratio_lo, logits, torch.float64),
            _per_token(ratio_hi, logits, torch.float64)] if has_gate else [coef] * 3
    has_entropy_grad = entropy_coef is not None
    entropy_coef = _per_token(entropy_coef, logits, torch.float32) if has_entropy_grad else coef
    with_entropy = bool(with_entropy) or has_entropy_grad  # the entropy term needs H; it is returned too
    logp = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    lse = torch.empty(batch, length, 2, dtype=torch.float32, device=logits.device)  # (hi, lo) parts
    entropy = torch.empty_like(logp) if with_entropy else None
    grad = _grad_output(logits, inplace)
    if logp.numel() == 0:
        return logp, lse, entropy, grad
    with _on_device(logits):
        module.fused_kernel[(fused_programs(logits, cfg),)](
            logits, logits.stride(0), logits.stride(1), ids, ids if mask_u8 is None else mask_u8,
            coef, kl_coef, ref_logps, *gate, entropy_coef, logp, lse, logp if entropy is None else entropy, grad,
            grad.stride(0), grad.stride(1), batch * length, length, vocab, 1.0 / float(temperature),
            HAS_MASK=mask_u8 is not None, HAS_KL=has_kl, HAS_GATE=has_gate, WITH_ENTROPY=with_entropy,
            HAS_ENTROPY_GRAD=has_entropy_grad, GATE_KIND=int(gate_kind), **cfg.meta(), **cfg.launch())
    return logp, lse, entropy, grad
