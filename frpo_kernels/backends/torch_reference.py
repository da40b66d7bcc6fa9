"""The "torch" backend and the pure-torch specification of the per-token kernels: what every backend
must compute. The O(B*T*V) contract shared by cpu.py (csrc/) and triton/; tests compare them with this.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Kernel contract (every backend module exposes these three functions with these signatures):
#   logits  [B, T, V] float32/bfloat16/float16, stride(-1) == 1, any other strides
#   ids     [B, T] int64 in [0, V) where mask is True (any value where it is False: never read)
#   mask    [B, T] bool or None; rows with mask False are skipped: logp = lse = entropy = 0, grad = 0
#           (whatever their logits hold, NaN included)
#   every per-token output ([B, T], lse [B, T, 2]) is float32 (float64 for float64 logits in the torch reference)
#
#   forward(logits, ids, mask, temperature, with_entropy) -> (logp, lse, entropy or None)
#       lse [B, T, 2]: the log-sum-exp of logits / temperature in two parts, hi + lo, hi rounded to the
#       output dtype and lo the rest (0 where lse is not finite): the backward's log p = (z - hi) - lo is
#       as exact as the forward's, where z - hi alone would lose |lse| * 6e-8 relative in fp32 (1e-4 at
#       logits of 1e4; at 1e30 even a float64 lse has lost log sum exp(z - max)).
#       logp = logits[id] / temperature - lse.
#   backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature, inplace) -> grad_logits
#       grad = dlogp * (onehot(id) - p) / T  -  dentropy * p * (log p + H) / T,  p = softmax(logits / T)
#       (entropy and dentropy may be None: no entropy term). inplace=True writes grad into the
#       logits' own storage and returns that tensor; otherwise a new [B, T, V] tensor of the
#       logits' dtype (contiguous).
#   fused(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, inplace,
#         old_logps=None, ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=GATE_WINDOW)
#         -> (logp, lse, entropy or None, grad_logits)
#       forward and backward in one pass over each row, with the token's loss gradient
#       dlogp = coef * gate + kl_coef * (1 - exp(ref_logps - logp))   (kl_coef / ref_logps may be None)
#       known once the row's logp is known. gate = 1 without old_logps; with them (and ratio_lo/hi, all
#       three or none; the bounds float64, l and the comparisons in float64) a function of the log-ratio
#       l = logp - old_logps chosen by gate_kind (0 where l is NaN):
#         GATE_WINDOW (0)  exp(l) where ratio_lo <= l <= ratio_hi, else 0: the clipped-ratio (GRPO-family)
#                          losses' token gradient off-policy
#         GATE_CAPPED (1)  exp(min(l, ratio_hi)) = min(r, e^ratio_hi) (ratio_lo unread): cispo's sg[min(r, cap)]
#         GATE_SOFT   (2)  4 s (1 - s) exp(l), s = sigmoid(ratio_lo * (exp(l) - 1)), where l <= ratio_hi, else 0:
#                          sapo's soft gate, ratio_lo its temperature tau, ratio_hi the log-ratio past which
#                          the loss holds it constant
#       entropy_coef [B, T] (None: no entropy term) is dloss/dH of each token's entropy H (of
#       softmax(logits / T)): grad gains -entropy_coef * p * (log p + H) / T, backward's dentropy term
#       (p log p = 0 where p = 0). The row's H is then computed in the same pass and returned, as if
#       with_entropy were True.


GATE_WINDOW, GATE_CAPPED, GATE_SOFT = 0, 1, 2
GATE_KINDS = (GATE_WINDOW, GATE_CAPPED, GATE_SOFT)


class RatioGate(NamedTuple):
    """fused()'s importance-ratio gate: its per-token tensors and its kind (the contract above)."""
    old_logps: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    kind: int = GATE_WINDOW


def gate_arguments(gate: RatioGate | None, convert=lambda t: t) -> dict:
    """fused()'s keyword arguments for a gate (none for None), each tensor passed through convert."""
    if gate is None:
        return {}
    return dict(old_logps=convert(gate.old_logps), ratio_lo=convert(gate.lo), ratio_hi=convert(gate.hi),
                gate_kind=gate.kind)


def forward(logits, ids, mask, temperature, with_entropy):
    z, ids = _masked_rows_unread(_compute(logits), ids, mask)
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    lse = _lse_parts(z / temperature)
    logp = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        p = log_probs.exp()
        entropy = -(p * torch.where(p > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    if mask is not None:
        logp, lse = _zero_where_masked(logp, mask), _zero_where_masked(lse, mask.unsqueeze(-1))
        entropy = _zero_where_masked(entropy, mask) if entropy is not None else None
    return logp, lse, entropy


def _lse_parts(z):
    """logsumexp over the last dim as the contract's [..., 2] (hi, lo): max + log sum exp(z - max) for
    rows of finite max, split in float64 (max - hi is exact there); other rows (NaN, +inf, all -inf) as
    torch.logsumexp gives them, lo = 0."""
    shift = z.amax(-1)
    finite = torch.isfinite(shift)
    log_sum = torch.logsumexp(torch.where(finite.unsqueeze(-1), z - torch.where(finite, shift, 0).unsqueeze(-1), 0), -1)
    hi = torch.where(finite, shift + log_sum, torch.logsumexp(z, -1))
    lo = (shift.double() - hi.double()) + log_sum.double()
    lo = torch.where(finite, lo, 0).to(z.dtype)
    return torch.stack((hi, lo), -1)


def lse_value(lse):
    """The contract's [..., 2] (hi, lo) lse as one float64 [...] value, hi + lo."""
    return lse[..., 0].double() + lse[..., 1].double()


def _zero_where_masked(x, mask):
    return torch.where(mask, x, torch.zeros_like(x))


def _compute(logits):
    return logits.float() if logits.dtype != torch.float64 else logits


def _masked_rows_unread(z, ids, mask):
    """Masked rows as logits 0 and id 0 before any op reads them: zeroing only the results would let
    a NaN there into the gradient (log_softmax's backward mixes a row's entries: 0 * NaN), and an
    out-of-range id there (HF's -100) into gather / scatter. The ids come back int64, which gather and
    scatter need (the checks accept every integer dtype, as the kernels do)."""
    ids = ids.long()
    if mask is None:
        return z, ids
    return torch.where(mask.unsqueeze(-1), z, 0), torch.where(mask, ids, 0)


def _log_probs(z, lse):
    """z - lse per row, for rows of finite lse as (z - max) - log sum exp(z - max): z - lse itself loses
    log-sum to lse's rounding once |lse| is large (in float64 from ~1e15, in float32 from ~1e4).
    Other rows (NaN, +inf, all -inf) keep z - lse, whose NaN / inf pattern is the contract's."""
    hi = lse[..., :1]  # lse: the contract's (hi, lo) parts; lo = 0 where hi is not finite
    finite = torch.isfinite(hi)
    shift = torch.where(finite, z.amax(-1, keepdim=True), 0)
    shifted = z - shift
    log_sum = torch.logsumexp(torch.where(finite, shifted, 0), -1, keepdim=True)
    return torch.where(finite, shifted - log_sum, z - hi.to(z.dtype))


def backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature, inplace=False):
    if tuple(lse.shape) != (*logits.shape[:2], 2):
        raise ValueError(f"lse must be the forward's [B, T, 2] = {(*logits.shape[:2], 2)} (hi, lo parts), "
                         f"got {tuple(lse.shape)}")
    z, ids = _masked_rows_unread(_compute(logits), ids, mask)
    log_probs = _log_probs(z / temperature, lse)
    p = log_probs.exp()
    onehot = torch.zeros_like(p).scatter_(-1, ids.unsqueeze(-1), 1.0)
    grad = dlogp.unsqueeze(-1) * (onehot - p)
    if dentropy is not None:
        safe_log_probs = torch.where(p > 0, log_probs, torch.zeros_like(log_probs))
        grad = grad - dentropy.unsqueeze(-1) * p * (safe_log_probs + entropy.unsqueeze(-1))
    grad = grad / temperature
    if mask is not None:
        grad = _zero_where_masked(grad, mask.unsqueeze(-1))
    grad = grad.to(logits.dtype)
    if inplace:
        return logits.copy_(grad)
    return grad


def fused(logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy, inplace=False,
          old_logps=None, ratio_lo=None, ratio_hi=None, entropy_coef=None, gate_kind=GATE_WINDOW):
    with_entropy = with_entropy or entropy_coef is not None
    logp, lse, entropy = forward(logits, ids, mask, temperature, with_entropy)
    dlogp = token_loss_gradient(logp, coef, kl_coef, ref_logps, old_logps, ratio_lo, ratio_hi, gate_kind)
    dentropy = None
    if entropy_coef is not None:
        dentropy = torch.as_tensor(entropy_coef, dtype=entropy.dtype, device=entropy.device).expand_as(entropy)
    grad = backward(logits, ids, mask, lse, dlogp, entropy if dentropy is not None else None, dentropy, temperature,
                    inplace)
    return logp, lse, entropy, grad


def token_loss_gradient(logp, coef, kl_coef, ref_logps, old_logps=None, ratio_lo=None, ratio_hi=None,
                        gate_kind=GATE_WINDOW):
    """dloss/dlogp of a token in the fused path: coef (gated by the importance ratio when old_logps are
    given) plus the k3-KL derivative."""
    if old_logps is not None:  # in float64, as the kernels compare with the float64 bounds
        inside, gate = ratio_gate(logp.double() - old_logps.double(), ratio_lo.double(), ratio_hi.double(), gate_kind)
        coef = torch.where(inside, coef.double() * gate, 0.0).to(coef.dtype)
    if kl_coef is None:
        return coef
    return coef + kl_coef * (1.0 - torch.exp(ref_logps - logp))


def ratio_gate(log_ratio, lo, hi, gate_kind):
    """The fused path's importance-ratio gate of the log-ratio (the contract above): (where it is open,
    its value there); closed where the log-ratio is NaN."""
    if gate_kind == GATE_CAPPED:
        inside = ~torch.isnan(log_ratio)
        return inside, torch.exp(torch.where(inside, torch.minimum(log_ratio, torch.as_tensor(hi)), 0.0))
    inside = log_ratio <= hi
    if gate_kind == GATE_WINDOW:
        inside = inside & (log_ratio >= lo)
    elif gate_kind != GATE_SOFT:
        raise ValueError(f"gate_kind must be one of {GATE_KINDS}, got {gate_kind!r}")
    ratio = torch.exp(torch.where(inside, log_ratio, 0.0))
    if gate_kind == GATE_SOFT:
        s = torch.sigmoid(lo * (ratio - 1))
        ratio = 4 * s * (1 - s) * ratio
    return inside, ratio
