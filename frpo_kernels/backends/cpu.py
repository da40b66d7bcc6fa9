"""CPU kernel backend: loads the compiled csrc/ extension (frpo_kernels._C) and exposes
forward / backward / fused with the contract of torch_reference.py, plus fake kernels for torch.compile.
"""
from __future__ import annotations

import os
import sys
import threading

import torch

from frpo_kernels.backends.torch_reference import GATE_WINDOW

_BUILD_HINT = "build it with: pip install --no-build-isolation -e ."
ISAS = ("auto", "avx512", "avx2", "portable")  # FRPO_CPU_ISA's values; see isa() / set_isa()
_lock = threading.Lock()
_state = {"loaded": False, "error": None, "isa_error": None, "slow": None}


def _jit_compile():
    """Compiles csrc/ with torch.utils.cpp_extension.load when running from a source checkout."""
    from torch.utils import cpp_extension

    from frpo_kernels import _build

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the checkout holding csrc/
    sources = [os.path.join(root, p) for p in _build.EXTENSION_SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"frpo_kernels._C is not built and the sources are not here ({missing[0]})")
    print("frpo_kernels: compiling the CPU kernels (csrc/) on first use, about a minute ...", file=sys.stderr,
          flush=True)
    cpp_extension.load(name="frpo_kernels_cpu", sources=sources,
                       extra_include_paths=[os.path.join(root, d) for d in _build.INCLUDE_DIRS],
                       extra_cflags=list(_build.CXX_FLAGS + _build.OPENMP_FLAGS),
                       extra_ldflags=list(_build.OPENMP_FLAGS), is_python_module=False, verbose=False)


def _load():
    if _state["loaded"]:  # checked before the lock: torch.compile traces this path and cannot enter a lock
        return
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return
        try:
            try:
                from frpo_kernels import _C  # noqa: F401  (registers torch.ops.frpo_kernels.*)
            except ImportError:
                if os.environ.get("FRPO_NO_JIT", "0") not in ("", "0"):
                    raise RuntimeError("frpo_kernels._C is not built and FRPO_NO_JIT is set") from None
                _jit_compile()
            _register_fakes()
            _state["isa_error"] = _apply_isa_env()
            _state["slow"] = _auto_slow_reason()
            _state["loaded"] = True
        except Exception as exc:  # any build or load failure: report it, the caller falls back
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def availability():
    """(True, "") once the extension is loaded (compiling it if needed), else (False, reason).
    Raises ValueError when FRPO_CPU_ISA names a path that cannot run here: a configuration error,
    not a reason to fall back quietly."""
    _load()
    if _state["isa_error"]:
        raise ValueError(_state["isa_error"])
    if _state["slow"]:  # auto never picks kernels slower than torch eager: the caller falls back to torch
        return False, (f"{_state['slow']}, so they would be slower than torch eager; "
                       "FRPO_CPU_ISA=portable runs them anyway")
    if _state["loaded"]:
        return True, ""
    return False, f"the C++ extension could not be loaded ({_state['error']}); {_BUILD_HINT}"


def _apply_isa_env():
    """Applies FRPO_CPU_ISA (unset or empty: auto); returns the error message, or None."""
    name = os.environ.get("FRPO_CPU_ISA", "").strip() or "auto"
    try:
        torch.ops.frpo_kernels.cpu_set_isa(name)
    except RuntimeError as exc:
        return f"FRPO_CPU_ISA={name!r} cannot be used: {_first_line(exc)}"
    return None


def _auto_slow_reason():
    """Why auto's kernels would be slower than torch eager (None when they are not, or when FRPO_CPU_ISA
    forces a path: then that is the user's choice)."""
    if (os.environ.get("FRPO_CPU_ISA", "").strip() or "auto") != "auto":
        return None
    return torch.ops.frpo_kernels.cpu_auto_slow_reason() or None


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def isa():
    """Which inner loops run: "avx512", "avx2" or "portable" (chosen by FRPO_CPU_ISA, default auto: the
    fastest one this CPU has; see set_isa)."""
    _require()
    return torch.ops.frpo_kernels.cpu_isa()


def set_isa(name):
    """Runs the inner loops of `name` from now on ("auto", "avx512", "avx2" or "portable"; process-wide,
    like FRPO_CPU_ISA) and returns the name now running. ValueError, naming the choices, when this CPU
    or build cannot run it."""
    _require()
    try:
        return torch.ops.frpo_kernels.cpu_set_isa(str(name))
    except RuntimeError as exc:
        raise ValueError(_first_line(exc)) from None


def _require():
    ok, why = availability()
    if not ok:
        raise RuntimeError(f"frpo_kernels cpu backend unavailable: {why}")


def _token_like(logits):
    return logits.new_empty(logits.shape[:2], dtype=torch.float32)


def _lse_like(logits):
    return logits.new_empty((*logits.shape[:2], 2), dtype=torch.float32)  # the contract's (hi, lo) lse


def _entropy_like(logits, with_entropy):
    return _token_like(logits) if with_entropy else logits.new_empty((0,), dtype=torch.float32)


def _register_fakes():
    ops = "frpo_kernels::"

    @torch.library.register_fake(ops + "token_logprobs_fwd")
    def _fwd_fake(logits, ids, mask, temperature, with_entropy):
        return _token_like(logits), _lse_like(logits), _entropy_like(logits, with_entropy)

    @torch.library.register_fake(ops + "token_logprobs_bwd")
    def _bwd_fake(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake(ops + "token_logprobs_bwd_inplace")
    def _bwd_inplace_fake(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature):
        return None

    # with an entropy_coef the fused ops compute and return the entropy whatever with_entropy says
    @torch.library.register_fake(ops + "token_logprobs_fused")
    def _fused_fake(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, old_logps=None,
                    ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=0):
        return (_token_like(logits), _lse_like(logits),
                _entropy_like(logits, with_entropy or entropy_coef is not None),
                torch.empty(logits.shape, dtype=logits.dtype, device=logits.device))

    @torch.library.register_fake(ops + "token_logprobs_fused_inplace")
    def _fused_inplace_fake(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, old_logps=None,
                            ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=0):
        return (_token_like(logits), _lse_like(logits),
                _entropy_like(logits, with_entropy or entropy_coef is not None))


def forward(logits, ids, mask, temperature, with_entropy):
    _require()
    logp, lse, entropy = torch.ops.frpo_kernels.token_logprobs_fwd(logits, ids, mask, float(temperature),
                                                                   bool(with_entropy))
    return logp, lse, (entropy if with_entropy else None)


def backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature, inplace=False):
    _require()
    if entropy is None or dentropy is None:
        entropy = dentropy = None
    if inplace:
        torch.ops.frpo_kernels.token_logprobs_bwd_inplace(logits, ids, mask, lse, dlogp, entropy, dentropy,
                                                          float(temperature))
        return logits
    return torch.ops.frpo_kernels.token_logprobs_bwd(logits, ids, mask, lse, dlogp, entropy, dentropy,
                                                     float(temperature))


def fused(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, inplace=False,
          old_logps=None, ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=GATE_WINDOW):
    _require()
    if kl_coef is None:
        ref_logps = None
    coef = _per_token(coef, logits)
    with_entropy = bool(with_entropy) or entropy_coef is not None  # the entropy term computes (and returns) H
    extra = (old_logps, ratio_lo, ratio_hi, None if entropy_coef is None else _per_token(entropy_coef, logits),
             int(gate_kind))
    if inplace:
        logp, lse, entropy = torch.ops.frpo_kernels.token_logprobs_fused_inplace(
            logits, ids, mask, float(temperature), coef, kl_coef, ref_logps, with_entropy, *extra)
        grad = logits
    else:
        logp, lse, entropy, grad = torch.ops.frpo_kernels.token_logprobs_fused(
            logits, ids, mask, float(temperature), coef, kl_coef, ref_logps, with_entropy, *extra)
    return logp, lse, (entropy if with_entropy else None), grad


def _per_token(coef, logits):
    """coef may be a number or broadcastable tensor in the reference; the kernel takes [B, T] float32."""
    if not isinstance(coef, torch.Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32, device=logits.device)
    if tuple(coef.shape) != tuple(logits.shape[:2]):
        coef = coef.expand(logits.shape[:2])
    return coef
