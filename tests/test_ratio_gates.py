"""The fused kernels' importance-ratio gates (torch_reference.py's contract: window, capped, soft) on every
backend, against the float64 reference, at log-ratios where a gate's branches meet or overflow: NaN and
+-inf old log-probs, ratios far past the bounds, infinite bounds. The loss-level equality of the gates
with each loss type's own gradient is tests/test_offpolicy_fused.py's.
"""
import math

import pytest
import torch

from frpo_kernels import backends
from frpo_kernels.backends import torch_reference
from frpo_kernels.backends.torch_reference import GATE_CAPPED, GATE_KINDS, GATE_SOFT, GATE_WINDOW
from helpers import INTERPRETED, rerun_under_interpreter, use_backend

B, T, V = 3, 8, 37
# added to each token's logp to make old_logps: log-ratios -offset, across every gate's branches
OFFSETS = [0.0, 0.05, -0.05, 0.3, -0.3, 2.0, -2.0, 60.0, -60.0, 1e4, float("inf"), float("-inf"), float("nan"),
           0.18, -0.18, 0.25, -0.25, -5.0, 5.0, 0.7, -0.7, 1.0, -1.0, 0.01]


def gate_params(kind, logp):
    """Per-token (lo, hi) of `kind`, with infinite bounds on some rows."""
    shape = logp.shape
    if kind == GATE_WINDOW:
        lo = torch.full(shape, math.log(0.8))
        hi = torch.full(shape, math.log1p(0.2))
        lo[0], hi[1] = float("-inf"), float("inf")
    elif kind == GATE_CAPPED:
        lo = torch.full(shape, float("-inf"))
        hi = torch.full(shape, math.log(1.5))
        hi[1], hi[2] = float("inf"), float("-inf")  # no cap; cap 0 (cispo's epsilon_high = 0)
    else:
        lo = torch.where(torch.arange(T) % 2 == 0, 1.0, 1.05).expand(shape).clone()  # sapo's temperatures
        lo[2] = 10.0
        hi = torch.log1p(40.0 / lo)
    return lo, hi


def case(kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    offsets = torch.tensor(OFFSETS[:T], dtype=torch.float64).expand(B, T).clone()
    offsets[1] = torch.tensor(OFFSETS[T:2 * T])
    offsets[2] = torch.tensor(OFFSETS[2 * T:3 * T])
    old = (logp + offsets).float()
    coef = torch.randn(B, T, generator=gen)
    lo, hi = gate_params(kind, logp)
    return logits, ids, coef, old, lo.float(), hi.float()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_each_gate_matches_the_float64_reference(backend, kind, dtype, inplace):
    module = backends.kernels(use_backend(backend))
    logits, ids, coef, old, lo, hi = case(kind, dtype)
    want_logp, _, _, want_grad = torch_reference.fused(logits.double(), ids, None, 1.0, coef.double(), None, None,
                                                       False, False, old.double(), lo.double(), hi.double(),
                                                       gate_kind=kind)
    target = logits.clone()
    logp, _, _, grad = module.fused(target, ids, None, 1.0, coef, None, None, False, inplace, old, lo, hi,
                                    gate_kind=kind)
    if inplace:
        assert grad.data_ptr() == target.data_ptr()
    assert torch.allclose(logp.double(), want_logp, atol=1e-5)
    grad = grad.double()
    # an open gate at an infinite ratio (hi = inf, no bound or cap) gives an infinite coefficient: never a
    # finite gradient there (inf or NaN: inf * (onehot - p) at p = 1 is either, by rounding)
    finite = torch.isfinite(want_grad)
    assert (~finite).any() == (kind != GATE_SOFT)
    assert not torch.isfinite(grad[~finite]).any() and torch.isfinite(grad[finite]).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = torch.where(finite, want_grad, 0.0).abs().amax(-1, keepdim=True).clamp_min(1e-6)
    err = ((grad - want_grad).abs() / scale)[finite].max().item()
    assert err <= tol, f"gradient off by {err:.2e} of its row's scale"
    # where the log-ratio is NaN the gate is closed: those rows' gradients are exactly 0
    closed = torch.isnan(logp.double() - old.double())
    assert closed.any() and (grad[closed] == 0).all()


def test_the_reference_gates_at_their_branches():
    """The contract's values, written out: not the reference's code run twice."""
    log_ratio = torch.tensor([math.log(0.5), 0.0, math.log(1.3), float("nan"), 50.0], dtype=torch.float64)
    lo = torch.full_like(log_ratio, math.log(0.8))
    hi = torch.full_like(log_ratio, math.log(1.2))
    inside, gate = torch_reference.ratio_gate(log_ratio, lo, hi, GATE_WINDOW)
    assert inside.tolist() == [False, True, False, False, False] and gate[1] == 1.0
    inside, gate = torch_reference.ratio_gate(log_ratio, lo, hi, GATE_CAPPED)
    assert inside.tolist() == [True, True, True, False, True]
    assert torch.allclose(gate[[0, 1, 2, 4]], torch.tensor([0.5, 1.0, 1.2, 1.2], dtype=torch.float64))
    tau = torch.full_like(log_ratio, 2.0)
    inside, gate = torch_reference.ratio_gate(log_ratio, tau, torch.log1p(40.0 / tau), GATE_SOFT)
    s = torch.sigmoid(2.0 * (torch.tensor(1.3, dtype=torch.float64) - 1))
    assert inside.tolist() == [True, True, True, False, False]
    assert gate[1] == 1.0 and torch.isclose(gate[2], 4 * s * (1 - s) * 1.3)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_unknown_gate_kind_is_an_error_naming_it(backend):
    module = backends.kernels(use_backend(backend))
    logits, ids, coef, old, lo, hi = case(GATE_WINDOW, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="gate_kind"):
        module.fused(logits, ids, None, 1.0, coef, None, None, False, False, old, lo, hi, gate_kind=3)


@pytest.mark.skipif(INTERPRETED, reason="this is the rerun")
def test_triton_cases_under_interpreter():
    rerun_under_interpreter(__file__, select="triton")
