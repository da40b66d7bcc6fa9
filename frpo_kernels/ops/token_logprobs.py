"""Per-token log-probabilities through a kernel backend, as autograd.Functions.

Two paths: `token_logprobs` (forward kernel now, backward kernel in backward: two passes) and
`fused_loss` (forward and gradient in one pass, when dloss/dlogp is known once a row is read).
"""
from __future__ import annotations

import torch

from frpo_kernels.backends import kernels, torch_reference
from frpo_kernels.backends.torch_reference import gate_arguments


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, with_entropy, backend, overwrite_logits):
        logp, lse, entropy = kernels(backend).forward(logits, ids, mask, temperature, with_entropy)
        ctx.save_for_backward(logits, ids, mask, lse, entropy)
        ctx.temperature, ctx.backend, ctx.overwrite_logits = temperature, backend, overwrite_logits
        ctx.mark_non_differentiable(lse)
        if entropy is None:
            entropy = lse.new_zeros(())
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, dlogp, _dlse, dentropy):
        _refuse_double_backward()
        if ctx.overwrite_logits:
            if getattr(ctx, "logits_overwritten", False):
                raise RuntimeError("frpo_kernels: overwrite_logits=True wrote the logits' gradient into their "
                                   "storage on the first backward, so a second backward (retain_graph=True) "
                                   "cannot recompute it; use overwrite_logits=False to backward twice")
            ctx.logits_overwritten = True
        logits, ids, mask, lse, entropy = ctx.saved_tensors
        if dlogp is None:
            dlogp = lse.new_zeros(lse.shape[:2])
        if entropy is None or dentropy is None or not bool(dentropy.any()):
            entropy = dentropy = None
        grad = kernels(ctx.backend).backward(
            logits, ids, mask, lse, dlogp.float().contiguous(), entropy,
            None if dentropy is None else dentropy.float().contiguous(), ctx.temperature,
            ctx.overwrite_logits)
        if ctx.overwrite_logits:
            _mark_overwritten(logits)
        return grad, None, None, None, None, None, None


def _refuse_double_backward():
    """The kernels' backward is not itself differentiable: with create_graph=True autograd would take
    the returned gradient for a constant and give zero higher-order derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError("frpo_kernels: double backward (create_graph=True, e.g. a Hessian-vector product) "
                           "is not supported by the cpu/triton kernels; use backend='torch'")


def _hand_over(ctx, grad_out):
    """The gradients a one-pass loss computed in forward (ctx.grads), for the one backward they serve:
    scaled by grad_out (themselves when it is 1: no copy), and ctx's references dropped. Autograd may
    keep a returned tensor, or a view of it (through cat, view, ...), as a leaf's .grad; nothing kept
    here may share memory with that, or accumulating into .grad would change a later backward's gradient.
    So a second backward through a retained graph has nothing to give, and says so."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError("frpo_kernels: the cpu/triton one-pass loss computes its gradient in forward and "
                           "hands it over on the first backward; a second backward through the same graph "
                           "(retain_graph=True) is not supported: compute the loss again, or use "
                           "backend='torch'")
    ctx.grads = None
    if grad_out.numel() == 1 and bool(grad_out == 1):
        return grads
    return tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads)


def _mark_overwritten(logits):
    """Bumps the version counter the kernels bypassed, so autograd refuses any function that saved the
    logits (e.g. torch.exp saves its output) instead of differentiating through the gradient."""
    torch.autograd.graph.increment_version(logits)


def token_logprobs(logits, ids, mask, temperature, with_entropy, backend, overwrite_logits=False):
    """(logp, entropy or None) [B, T]; differentiable w.r.t. logits on every backend.
    overwrite_logits: the backward kernel writes the gradient into the logits' own storage."""
    if backend == "torch":
        logp, _, entropy = torch_reference.forward(logits, ids, mask, temperature, with_entropy)
        return logp, entropy
    logp, _, entropy = TokenLogprobs.apply(_unit_stride_rows(logits), ids.long(), mask, temperature,
                                            with_entropy, backend, overwrite_logits)
    return logp, (entropy if with_entropy else None)


def _unit_stride_rows(logits):
    """The kernels read each vocab row as one contiguous run; other strides of [B, T] are fine."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


class _PrecomputedGradient(torch.autograd.Function):
    """Returns `value`; its gradient w.r.t. logits is `grad_logits` scaled by the upstream grad."""

    @staticmethod
    def forward(ctx, logits, value, grad_logits):
        ctx.grads = (grad_logits,)  # not saved_tensors: handed over, see _hand_over
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        return (*_hand_over(ctx, grad_out), None, None)


def fused_loss(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, backend,
               value_from_logp, overwrite_logits=False, gate=None, entropy_coef=None):
    """Loss whose token gradient is coef * gate + kl_coef * (1 - exp(ref - logp)), in one pass over V.

    value_from_logp(logp) -> scalar loss value (no gradient needed); returns (loss, logp, entropy).
    overwrite_logits: the gradient is written into the logits' own storage (no [B, T, V] buffer).
    gate: None, or a RatioGate of [B, T] tensors (torch_reference.py's importance-ratio gate).
    entropy_coef: None, or dloss/dH [B, T] of each token's entropy: its gradient is added in the same
    pass, and the entropy is computed and returned (as with with_entropy=True). The loss value stays
    value_from_logp(logp): the caller adds the entropy part's value from the returned entropy (detached:
    its gradient is already in this pass).
    """
    unit_stride = _unit_stride_rows(logits)
    copied = unit_stride is not logits  # a copy of our own is free to hold the gradient
    token_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the kernels' [B, T] dtype

    def per_token(t):
        return None if t is None else t.to(token_dtype).contiguous()
    if gate is not None:  # the bounds stay float64 (loss_types' gates)
        gate = gate._replace(old_logps=per_token(gate.old_logps))
    logp, _, entropy, grad_logits = kernels(backend).fused(
        unit_stride.detach(), ids.long(), mask, temperature, per_token(coef), per_token(kl_coef),
        per_token(ref_logps), with_entropy, overwrite_logits or copied, entropy_coef=per_token(entropy_coef),
        **gate_arguments(gate))
    if overwrite_logits and not copied:
        _mark_overwritten(logits)
    value = value_from_logp(logp)
    loss = _PrecomputedGradient.apply(logits, value, grad_logits)
    return loss, logp, entropy
