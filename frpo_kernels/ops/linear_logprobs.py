"""Per-token log-probs and the fused loss gradient straight from hidden states and the LM head.

The logits `hidden @ weight.T (+ bias)` are never held as [N, V]: rows go through in tiles. Each
tile's logits are written by one GEMM into a single reused workspace [rows, V], the backend's
per-row kernel (forward / backward / fused of the contract in reference.py) runs in place on it,
and the gradient it leaves there feeds two more GEMMs:

    grad_hidden[rows]  = dtile @ weight
    grad_weight       += dtile.T @ hidden[rows]      (only when the head trains: not under LoRA)
    grad_bias         += dtile.sum(0)

Memory beyond inputs and gradients: the workspace plus O(N) statistics. Two autograd paths:

* `LinearTokenLogprobs` (two passes): the forward sweep keeps logp, lse (and entropy); the backward
  recomputes each tile and turns it into its gradient with the saved lse.
* `linear_fused_loss` (one pass): when dloss/dlogp is known once a row's logp is (on-policy), one
  sweep computes logp and every gradient; backward only scales them by the upstream gradient.

Double backward (create_graph=True): the torch backend's backward then recomputes the gradients with
autograd through the plain formula, so they are differentiable; the cpu/triton kernels raise.

Masked rows (mask False) are left out of the tiles altogether: no GEMM rows, logp = lse = entropy
= 0 and zero gradient. Precision: fp32 inputs run fp32 GEMMs and kernels; float64 inputs (torch
backend only) run in float64; bf16/fp16 inputs keep a tile of their own dtype on CUDA (cuBLAS
accumulates in fp32, the kernels read the tile and compute in fp32, grad_weight/grad_bias sum in
fp32), while on CPU their GEMMs run in fp32 on an fp32 copy of the weight (see
CPU_LOW_PRECISION_GEMMS_IN_FP32).
"""
from __future__ import annotations

import torch

from frpo_kernels import reference
from frpo_kernels.backends import kernels, resolve
from frpo_kernels.ops.token_logprobs import _refuse_double_backward

# Rows per tile for every sweep when set (tests, benchmarks); None: tile_rows() chooses.
TILE_ROWS = None

# On CPU, bf16/fp16 GEMMs run in fp32: torch 2.13's CPU bf16 matmul on this AVX2 EPYC (no native
# bf16 dot products) ran at 4.0 GFLOP/s for [256, 576] x [576, 49152] and 0.5 GFLOP/s for the
# [256, 49152] x [49152, 576] gradient GEMM, against 19.7 and 21.6 for fp32 on the same loaded
# machine. The cost is an fp32 copy of the weight per sweep (V*H*4 bytes). False: tiles of the
# input dtype, as on CUDA (tests use it to run the bf16-tile path of the kernels on CPU).
CPU_LOW_PRECISION_GEMMS_IN_FP32 = True

_LOW_PRECISION = (torch.bfloat16, torch.float16)
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
            rows = cache // 2 // row_bytes
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
# a workspace of half the LLC (H=64, V=32768: 128 rows, 16 MiB).
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


def _compute_dtype(dtype, device):
    if dtype in _LOW_PRECISION and device.type == "cpu" and CPU_LOW_PRECISION_GEMMS_IN_FP32:
        return torch.float32
    return dtype


def _token_dtype(compute):
    """dtype of per-token statistics and coefficients: float64 for float64 GEMMs, else float32."""
    return torch.float64 if compute == torch.float64 else torch.float32


try:  # fp32 accumulation of a bf16/fp16 product without a rounded intermediate (CUDA, torch >= 2.8)
    _ADDMM_OUT_DTYPE = "out_dtype" in str(torch.ops.aten.addmm.dtype_out._schema)
except (AttributeError, RuntimeError):
    _ADDMM_OUT_DTYPE = False


def _accumulate_product(acc, a, b):
    """acc += a @ b, acc possibly of a wider dtype than a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _ADDMM_OUT_DTYPE and acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Sweep:
    """One pass over the active rows of hidden [N, H] in tiles: the tile GEMMs, the reused buffers,
    and moving per-token vectors between [N] and a tile's [1, rows]."""

    def __init__(self, hidden, weight, bias, ids, mask, rows=None):
        self.n, self.hidden_size = hidden.shape
        self.vocab = weight.shape[0]
        self.device = hidden.device
        self.compute = _compute_dtype(hidden.dtype, hidden.device)
        self.token_dtype = _token_dtype(self.compute)
        self.hidden = hidden
        # one conversion per sweep where the GEMMs run in another dtype than the inputs (CPU bf16)
        self.weight = weight if weight.dtype == self.compute else weight.to(self.compute)
        self.bias = None if bias is None else (bias if bias.dtype == self.compute else bias.to(self.compute))
        self.ids = ids
        self.index = None
        if mask is not None and not bool(mask.all()):
            self.index = mask.nonzero().squeeze(1)
        self.active = self.n if self.index is None else self.index.numel()
        self.rows = max(1, min(rows, self.active)) if rows else \
            sweep_rows(self.active, self.vocab, self.hidden_size, self.compute, self.device)
        self.workspace = torch.empty(self.rows, self.vocab, dtype=self.compute, device=self.device) \
            if self.active else None
        self._gather = self.index is not None or hidden.dtype != self.compute
        self._hidden_buf = torch.empty(self.rows, self.hidden_size, dtype=self.compute, device=self.device) \
            if self._gather and self.active else None
        self._grad_buf = None

    def tiles(self):
        for start in range(0, self.active, self.rows):
            yield start, min(start + self.rows, self.active)

    def _positions(self, start, stop):
        return self.index[start:stop]

    def hidden_tile(self, start, stop):
        """hidden's rows of the tile in the GEMMs' dtype: a view, or a copy in the reused buffer."""
        if not self._gather:
            return self.hidden[start:stop]
        buf = self._hidden_buf[:stop - start]
        if self.index is None:
            buf.copy_(self.hidden[start:stop])
        elif self.hidden.dtype == self.compute:
            torch.index_select(self.hidden, 0, self._positions(start, stop), out=buf)
        else:
            buf.copy_(self.hidden.index_select(0, self._positions(start, stop)))
        return buf

    def logits_tile(self, hidden_rows):
        """The tile's logits [1, rows, V] (in the workspace), as the kernels take them."""
        out = self.workspace[:hidden_rows.shape[0]]
        if self.bias is None:
            torch.mm(hidden_rows, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, hidden_rows, self.weight.t(), out=out)
        return out.unsqueeze(0)

    def take(self, vector, start, stop):
        """A per-token [N] vector's entries for the tile, as [1, rows]."""
        if self.index is None:
            return vector[start:stop].unsqueeze(0)
        return vector.index_select(0, self._positions(start, stop)).unsqueeze(0)

    def put(self, out, start, stop, values):
        """Writes a tile's [1, rows] values into the per-token [N] vector out."""
        values = values.reshape(-1)
        if self.index is None:
            out[start:stop].copy_(values)
        else:
            out.index_copy_(0, self._positions(start, stop), values.to(out.dtype))

    def token_vector(self):
        """A new per-token [N] vector, zero where rows are masked."""
        make = torch.empty if self.index is None else torch.zeros
        return make(self.n, dtype=self.token_dtype, device=self.device)

    def per_token(self, vector):
        """A caller's per-token [N] tensor as the kernels take it (None stays None)."""
        if vector is None:
            return None
        return vector.reshape(-1).to(self.token_dtype).contiguous()

    # -- gradients ---------------------------------------------------------------------------
    def gradient_buffers(self, want_hidden, want_weight, want_bias):
        """The gradients to fill (None where not wanted): grad_hidden [N, H] in hidden's dtype (zero
        on masked rows, every other row written once), grad_weight [V, H] and grad_bias [V] zeroed
        accumulators, fp32 when the inputs are bf16/fp16 (sums over tiles), else the GEMMs' dtype."""
        acc = torch.float32 if self.compute in _LOW_PRECISION or self.hidden.dtype in _LOW_PRECISION \
            else self.compute
        make_hidden = torch.empty if self.index is None else torch.zeros
        grad_hidden = make_hidden(self.n, self.hidden_size, dtype=self.hidden.dtype, device=self.device) \
            if want_hidden else None
        grad_weight = torch.zeros(self.vocab, self.hidden_size, dtype=acc, device=self.device) \
            if want_weight else None
        grad_bias = torch.zeros(self.vocab, dtype=acc, device=self.device) if want_bias else None
        return grad_hidden, grad_weight, grad_bias

    def accumulate(self, dtile, hidden_rows, start, stop, grad_hidden, grad_weight, grad_bias):
        """Adds a tile's contribution: dtile [1, rows, V] holds dloss/dlogits of the tile's rows."""
        dtile = dtile[0]
        if grad_hidden is not None:
            if self.index is None and grad_hidden.dtype == self.compute:
                torch.mm(dtile, self.weight, out=grad_hidden[start:stop])
            else:
                if self._grad_buf is None:
                    self._grad_buf = torch.empty(self.rows, self.hidden_size, dtype=self.compute,
                                                 device=self.device)
                buf = self._grad_buf[:stop - start]
                torch.mm(dtile, self.weight, out=buf)
                if self.index is None:
                    grad_hidden[start:stop].copy_(buf)
                else:
                    grad_hidden.index_copy_(0, self._positions(start, stop), buf.to(grad_hidden.dtype))
        if grad_weight is not None:
            _accumulate_product(grad_weight, dtile.t(), hidden_rows)
        if grad_bias is not None:
            grad_bias.add_(dtile.sum(0, dtype=grad_bias.dtype))


def _forward_sweep(sweep, backend, temperature, with_entropy):
    """(logp, lse, entropy or None) [N] from one sweep of kernel forwards."""
    run = kernels(backend).forward
    logp, lse = sweep.token_vector(), sweep.token_vector()
    entropy = sweep.token_vector() if with_entropy else None
    for start, stop in sweep.tiles():
        tile = sweep.logits_tile(sweep.hidden_tile(start, stop))
        lp, ls, ent = run(tile, sweep.take(sweep.ids, start, stop), None, temperature, with_entropy)
        sweep.put(logp, start, stop, lp)
        sweep.put(lse, start, stop, ls)
        if with_entropy:
            sweep.put(entropy, start, stop, ent)
    return logp, lse, entropy


def _as_param_grad(grad, like):
    return None if grad is None else (grad if grad.dtype == like.dtype else grad.to(like.dtype))


class LinearTokenLogprobs(torch.autograd.Function):
    """(logp [N], entropy [N] or a 0-dim placeholder) of log_softmax((hidden @ weight.T + bias) / T)
    at ids, differentiable w.r.t. hidden [N, H], weight [V, H] and bias [V]. ids [N] int64, mask [N]
    bool or None; backend a resolved name ("torch", "cpu", "triton")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask, temperature, with_entropy, backend, rows):
        sweep = _Sweep(hidden, weight, bias, ids, mask, rows)
        logp, lse, entropy = _forward_sweep(sweep, backend, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, ids, mask, lse, entropy)
        ctx.temperature, ctx.backend, ctx.rows = temperature, backend, rows
        if entropy is None:
            entropy = lse.new_zeros(())
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        hidden, weight, bias, ids, mask, lse, entropy = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        if not (want_hidden or want_weight or want_bias):
            return (None,) * 9
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable itself
            if ctx.backend != "torch":
                _refuse_double_backward()
            grads = _differentiable_gradients(hidden, weight, bias, ids, mask, ctx.temperature, dlogp,
                                              None if entropy is None else dentropy, ctx.needs_input_grad[:3])
            return (*grads, None, None, None, None, None, None)
        sweep = _Sweep(hidden, weight, bias, ids, mask, ctx.rows)
        if dlogp is None:
            dlogp = torch.zeros_like(lse)
        if entropy is None or dentropy is None or not bool(dentropy.any()):
            entropy = dentropy = None
        dlogp, dentropy = sweep.per_token(dlogp), sweep.per_token(dentropy)
        grad_hidden, grad_weight, grad_bias = sweep.gradient_buffers(want_hidden, want_weight, want_bias)
        run = kernels(ctx.backend).backward
        for start, stop in sweep.tiles():
            hidden_rows = sweep.hidden_tile(start, stop)
            tile = sweep.logits_tile(hidden_rows)
            run(tile, sweep.take(ids, start, stop), None, sweep.take(lse, start, stop),
                sweep.take(dlogp, start, stop),
                None if entropy is None else sweep.take(entropy, start, stop),
                None if dentropy is None else sweep.take(dentropy, start, stop),
                ctx.temperature, inplace=True)
            sweep.accumulate(tile, hidden_rows, start, stop, grad_hidden, grad_weight, grad_bias)
        return (grad_hidden, _as_param_grad(grad_weight, weight), _as_param_grad(grad_bias, bias),
                None, None, None, None, None, None)


def _differentiable_gradients(hidden, weight, bias, ids, mask, temperature, dlogp, dentropy, wanted):
    """The gradients w.r.t. (hidden, weight, bias) (None where not wanted) of the torch backend under
    create_graph=True: autograd's, through the plain formula on the unmasked rows, so that autograd can
    differentiate them again (a Hessian-vector product). This holds the [rows, V] logits and their
    softmax, as double backward of any torch formula must."""
    rows = hidden if mask is None else hidden[mask]
    ids = ids if mask is None else ids[mask]
    with_entropy = dentropy is not None
    logp, _, entropy = reference.forward(torch.nn.functional.linear(rows, weight, bias).unsqueeze(0),
                                         ids.unsqueeze(0), None, temperature, with_entropy)
    outputs, upstream = [logp[0]], [_unmasked(dlogp, mask).to(logp.dtype)]
    if with_entropy:
        outputs.append(entropy[0])
        upstream.append(_unmasked(dentropy, mask).to(entropy.dtype))
    inputs = [t for t, want in zip((hidden, weight, bias), wanted) if want]
    grads = iter(torch.autograd.grad(outputs, inputs, upstream, create_graph=True, allow_unused=True))
    return [next(grads) if want else None for want in wanted]


def _unmasked(vector, mask):
    return vector if mask is None else vector[mask]


class _PrecomputedLinearGradient(torch.autograd.Function):
    """Returns `value`; its gradients w.r.t. hidden, weight and bias are the given tensors scaled
    by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, value, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        grads = ctx.saved_tensors
        if not (grad_out.numel() == 1 and bool(grad_out == 1)):
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads)
        return (*grads, None, None, None, None)


def linear_fused_loss(hidden, weight, bias, ids, mask, temperature, coef, kl_coef, ref_logps,
                      with_entropy, backend, value_from_logp, rows=None, gate=None):
    """The loss whose per-token gradient dloss/dlogp is coef * gate + kl_coef * (1 - exp(ref_logps - logp)),
    from hidden [..., H] and the head weight [V, H] (+ bias [V]), in one sweep over the tiles.

    ids, mask (bool or None), coef, kl_coef and ref_logps (both or neither None) have hidden's
    leading shape; gate: None, or (old_logps, ratio_lo, ratio_hi) of that shape (reference.py's
    importance-ratio gate); backend is a resolved name. value_from_logp(logp) -> the scalar loss value (no
    gradient needed). Returns (loss, logp, entropy or None); logp and entropy have ids' shape, are
    float32 (float64 for float64 inputs) and carry no gradient. The gradients w.r.t. hidden, weight
    and bias (each only if it requires grad) are computed here and scaled by the upstream
    gradient in backward; a weight shared with an input embedding accumulates both through autograd.
    """
    shape = ids.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)
    sweep = _Sweep(flat_hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                   ids.reshape(-1).to(torch.int64), flat_mask, rows)
    grad_on = torch.is_grad_enabled()
    want = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    if not any(want):
        logp, _, entropy = _forward_sweep(sweep, backend, temperature, with_entropy)
        logp = logp.view(shape)
        entropy = None if entropy is None else entropy.view(shape)
        return value_from_logp(logp), logp, entropy
    coef = sweep.per_token(coef if isinstance(coef, torch.Tensor)
                           else torch.full(shape, float(coef), device=hidden.device))
    if kl_coef is not None and ref_logps is None:
        raise ValueError("linear_fused_loss: kl_coef needs ref_logps")
    kl_coef = sweep.per_token(kl_coef)
    ref_logps = None if kl_coef is None else sweep.per_token(ref_logps)
    gate = () if gate is None else tuple(sweep.per_token(t) for t in gate)
    logp = sweep.token_vector()
    entropy = sweep.token_vector() if with_entropy else None
    grad_hidden, grad_weight, grad_bias = sweep.gradient_buffers(*want)
    run = kernels(backend).fused
    for start, stop in sweep.tiles():
        hidden_rows = sweep.hidden_tile(start, stop)
        tile = sweep.logits_tile(hidden_rows)
        lp, _, ent, _ = run(tile, sweep.take(sweep.ids, start, stop), None, temperature,
                            sweep.take(coef, start, stop),
                            None if kl_coef is None else sweep.take(kl_coef, start, stop),
                            None if ref_logps is None else sweep.take(ref_logps, start, stop),
                            with_entropy, True, *(sweep.take(t, start, stop) for t in gate))
        sweep.put(logp, start, stop, lp)
        if with_entropy:
            sweep.put(entropy, start, stop, ent)
        sweep.accumulate(tile, hidden_rows, start, stop, grad_hidden, grad_weight, grad_bias)
    logp = logp.view(shape)
    entropy = None if entropy is None else entropy.view(shape)
    value = value_from_logp(logp)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    loss = _PrecomputedLinearGradient.apply(hidden, weight, bias, value, grad_hidden,
                                            _as_param_grad(grad_weight, weight),
                                            _as_param_grad(grad_bias, bias))
    return loss, logp, entropy


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def check_linear_inputs(hidden, weight, bias, ids, mask, ids_name="ids"):
    """ValueError/TypeError naming the bad argument, before any GEMM runs: types, shapes and devices
    (the ids' range is checks.check_ids_in_range's, once the mask is checked)."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {_describe(hidden)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape [B, T, H] or [N, H], got {tuple(hidden.shape)}")
    if any(s == 0 for s in hidden.shape):
        raise ValueError(f"hidden has a zero-size dimension (shape {tuple(hidden.shape)}); nothing to compute")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor [V, H], got {_describe(weight)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has H = {weight.shape[1]} (shape {tuple(weight.shape)}) but hidden has "
                         f"H = {hidden.shape[-1]} (shape {tuple(hidden.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; pass both in one dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be None or a floating-point tensor [V], got {_describe(bias)}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape [V] = ({vocab},) (weight's rows), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}; pass both in one dtype")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    lead = tuple(hidden.shape[:-1])
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or ids.is_complex():
        raise TypeError(f"{ids_name} must be an integer tensor, got {_describe(ids)}")
    if tuple(ids.shape) != lead:
        raise ValueError(f"{ids_name} must have shape {lead} (hidden's leading dimensions), got {tuple(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"{ids_name} is on {ids.device} but hidden is on {hidden.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be None or a tensor of shape {lead}, got {_describe(mask)}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {lead} (hidden's leading dimensions), got {tuple(mask.shape)}")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def linear_token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, return_entropy=False,
                          mask=None, backend="auto"):
    """log_softmax((hidden @ weight.T + bias) / temperature)[ids] without the [N, V] logits.

    hidden [B, T, H] with ids [B, T] (or [N, H] with [N]); weight [V, H] (the LM head, trainable,
    frozen or tied to the input embedding); bias [V] or None; mask of ids' shape (False: the row is
    skipped: logp = entropy = 0, no gradient, no GEMM work). Returns logp of ids' shape, float32
    (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias; with
    return_entropy also the per-token entropy (differentiable too).
    """
    from frpo_kernels import checks

    check_linear_inputs(hidden, weight, bias, ids, mask)
    checks.check_ids_in_range("ids", ids, weight.shape[0], mask, "weight.shape[0]")
    checks.check_temperature(temperature)
    name = resolve(backend, hidden)
    shape = ids.shape
    flat_mask = None if mask is None else (mask != 0).reshape(-1)
    logp, entropy = LinearTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids.reshape(-1).to(torch.int64),
        flat_mask, float(temperature), bool(return_entropy), name, None)
    logp = logp.view(shape)
    if return_entropy:
        return logp, entropy.view(shape)
    return logp
