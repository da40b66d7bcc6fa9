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
            dlogp = torch.zeros_like(lse)
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


# Backward nodes that pass their incoming gradient on as a view of it (the first group) or as itself.
_VIEW_NODES = {"ViewBackward", "ReshapeAliasBackward", "TBackward", "TransposeBackward", "PermuteBackward",
               "UnsqueezeBackward", "SqueezeBackward", "AliasBackward", "ExpandBackward"}
_SAME_NODES = {"CloneBackward", "ToCopyBackward"}


def _view_of_leaf(t):
    """Whether the gradient returned for t may become, as a view of it, a leaf's .grad (t = leaf.view(...),
    leaf.t(), leaf.clone().view(...)): autograd steals a view it is handed (a new tensor object), so that
    .grad would share the storage of a gradient saved for a second backward through a retained graph, and
    accumulating into it would change that. (The gradient itself is never stolen while it is saved.)"""
    node, viewed = None if t is None else t.grad_fn, False
    while node is not None:
        name = type(node).__name__.rstrip("0123456789")
        if name == "AccumulateGrad":
            return viewed
        if name not in _VIEW_NODES | _SAME_NODES:
            return False
        viewed = viewed or name in _VIEW_NODES
        following = [n for n, _ in node.next_functions if n is not None]
        node = following[0] if len(following) == 1 else None
    return False


def _hand_out(grad, grad_out, private):
    """A precomputed gradient for backward: scaled by grad_out, or itself when grad_out is 1 (no copy),
    unless `private` (_view_of_leaf): then a copy, so that the saved one stays intact for a second
    backward through a retained graph."""
    if grad is None:
        return None
    if grad_out.numel() == 1 and bool(grad_out == 1):
        return grad.clone() if private else grad
    return grad * grad_out.to(grad.dtype)


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
        ctx.save_for_backward(grad_logits)
        ctx.private = _view_of_leaf(logits)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        (grad_logits,) = ctx.saved_tensors
        return _hand_out(grad_logits, grad_out, ctx.private), None, None


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
    logp, _, entropy, grad_logits = kernels(backend).fused(
        unit_stride.detach(), ids.long(), mask, temperature, per_token(coef), per_token(kl_coef),
        per_token(ref_logps), with_entropy, overwrite_logits or copied, entropy_coef=per_token(entropy_coef),
        **gate_arguments(gate, per_token))
    if overwrite_logits and not copied:
        _mark_overwritten(logits)
    value = value_from_logp(logp)
    loss = _PrecomputedGradient.apply(logits, value, grad_logits)
    return loss, logp, entropy
