"""Per-token log-probs and the fused loss gradient straight from hidden states and the LM head.

The logits `hidden @ weight.T (+ bias)` are never held as [N, V]: rows go through in tiles. Each
tile's logits are written by one GEMM into a single reused workspace [rows, V], the backend's
per-row kernel (forward / backward / fused of the contract in torch_reference.py) runs in place on it,
and the gradient it leaves there feeds two more GEMMs:

    grad_hidden[rows]  = dtile @ weight
    grad_weight       += dtile.T @ hidden[rows]      (only when the head trains: not under LoRA)
    grad_bias         += dtile.sum(0)

Memory beyond inputs and gradients: the workspace plus O(N) statistics. Two autograd paths:

* `LinearTokenLogprobs` (two passes): the forward sweep keeps logp, lse (and entropy); the backward
  recomputes each tile and turns it into its gradient with the saved lse.
* `linear_fused_loss` (one pass): when dloss/dlogp is known once a row's logp is (on-policy, or a
  token-local loss off-policy), one sweep computes logp and every gradient; backward only scales
  them by the upstream gradient.

Rows per tile: tile_policy.py. Input checks: checks.check_linear_inputs.

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

from frpo_kernels import checks
from frpo_kernels.backends import kernels, resolve, torch_reference
from frpo_kernels.backends.torch_reference import RatioGate, gate_arguments
from frpo_kernels.ops import tile_policy
from frpo_kernels.ops.token_logprobs import _hand_over, _refuse_double_backward

# On CPU, bf16/fp16 GEMMs run in fp32: torch 2.13's CPU bf16 matmul on this AVX2 EPYC (no native
# bf16 dot products) ran at 4.0 GFLOP/s for [256, 576] x [576, 49152] and 0.5 GFLOP/s for the
# [256, 49152] x [49152, 576] gradient GEMM, against 19.7 and 21.6 for fp32 on the same loaded
# machine. The cost is an fp32 copy of the weight per sweep (V*H*4 bytes). False: tiles of the
# input dtype, as on CUDA (tests use it to run the bf16-tile path of the kernels on CPU).
CPU_LOW_PRECISION_GEMMS_IN_FP32 = True

_LOW_PRECISION = (torch.bfloat16, torch.float16)

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
            tile_policy.sweep_rows(self.active, self.vocab, self.hidden_size, self.compute, self.device)
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
        """A per-token [N, ...] vector's entries for the tile, as [1, rows, ...]."""
        if self.index is None:
            return vector[start:stop].unsqueeze(0)
        return vector.index_select(0, self._positions(start, stop)).unsqueeze(0)

    def put(self, out, start, stop, values):
        """Writes a tile's [1, rows, ...] values into the per-token [N, ...] vector out."""
        values = values.reshape(-1, *out.shape[1:])
        if self.index is None:
            out[start:stop].copy_(values)
        else:
            out.index_copy_(0, self._positions(start, stop), values.to(out.dtype))

    def token_vector(self, *trailing):
        """A new per-token [N, *trailing] vector, zero where rows are masked."""
        make = torch.empty if self.index is None else torch.zeros
        return make(self.n, *trailing, dtype=self.token_dtype, device=self.device)

    def per_token(self, vector, dtype=None):
        """A caller's per-token [N] tensor as the kernels take it, in dtype (default: token_dtype; None stays None)."""
        if vector is None:
            return None
        return vector.reshape(-1).to(self.token_dtype if dtype is None else dtype).contiguous()

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
    """(logp [N], lse [N, 2], entropy [N] or None) from one sweep of kernel forwards."""
    run = kernels(backend).forward
    logp, lse = sweep.token_vector(), sweep.token_vector(2)  # lse: the contract's (hi, lo) parts
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
            dlogp = lse.new_zeros(lse.shape[:1])
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
    logp, _, entropy = torch_reference.forward(torch.nn.functional.linear(rows, weight, bias).unsqueeze(0),
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
        ctx.grads = (grad_hidden, grad_weight, grad_bias)  # not saved_tensors: handed over (_hand_over)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        return (*_hand_over(ctx, grad_out), None, None, None, None)


def linear_fused_loss(hidden, weight, bias, ids, mask, temperature, coef, kl_coef, ref_logps,
                      with_entropy, backend, value_from_logp, rows=None, gate=None, entropy_coef=None):
    """The loss whose per-token gradient dloss/dlogp is coef * gate + kl_coef * (1 - exp(ref_logps - logp)),
    from hidden [..., H] and the head weight [V, H] (+ bias [V]), in one sweep over the tiles.

    ids, mask (bool or None), coef, kl_coef and ref_logps (both or neither None) have hidden's
    leading shape; gate: None, or a RatioGate of tensors of that shape (torch_reference.py's
    importance-ratio gate); entropy_coef: None, or dloss/dH of each token's entropy, of that shape (the
    entropy term's gradient joins each tile's, so it reaches hidden, weight and bias; the entropy is
    then computed and returned, as with with_entropy=True, and the value of that term is the caller's to
    add); backend is a resolved name. value_from_logp(logp) -> the scalar loss value (no
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
    with_entropy = bool(with_entropy) or entropy_coef is not None
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
    if gate is not None:  # the bounds stay float64 (loss_types' gates)
        gate = RatioGate(sweep.per_token(gate.old_logps), sweep.per_token(gate.lo, torch.float64),
                         sweep.per_token(gate.hi, torch.float64), gate.kind)
    entropy_coef = None if entropy_coef is None else sweep.per_token(
        entropy_coef if isinstance(entropy_coef, torch.Tensor) else torch.full(shape, float(entropy_coef),
                                                                               device=hidden.device))
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
                            with_entropy, True,
                            entropy_coef=None if entropy_coef is None else sweep.take(entropy_coef, start, stop),
                            **gate_arguments(gate, lambda t: sweep.take(t, start, stop)))
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


def linear_token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, return_entropy=False,
                          mask=None, backend="auto"):
    """log_softmax((hidden @ weight.T + bias) / temperature)[ids] without the [N, V] logits.

    hidden [B, T, H] with ids [B, T] (or [N, H] with [N]); weight [V, H] (the LM head, trainable,
    frozen or tied to the input embedding); bias [V] or None; mask of ids' shape (False: the row is
    skipped: logp = entropy = 0, no gradient, no GEMM work). Returns logp of ids' shape, float32
    (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias; with
    return_entropy also the per-token entropy (differentiable too).
    """
    checks.check_linear_inputs(hidden, weight, bias, ids, mask)
    checks.check_token_weights("mask", mask)
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
