"""The entropy gradient in the kernels: the fused contract's entropy_coef (torch_reference.fused), which adds
-entropy_coef * p * (log p + H) / T to the gradient in the same pass, and the two-pass path's entropy
output, whose gradient is the same term.

- float64: torch_reference.fused against autograd of the plain formula loss = sum(coef * logp) + sum(ecoef * H);
- every kernel backend (cpu on each ISA this CPU runs, triton in its interpreter), fp32 and bf16, against
  torch_reference.fused in float64 on the same rounded logits: masked rows, temperature != 1, -inf logits (p = 0:
  no NaN), KL and the ratio gate alongside, in place, rows longer than one CPU chunk;
- the entry points: LogitsSource.fused / HiddenSource.fused (hidden, weight and bias gradients, tiles of a
  few rows) and two_pass(with_entropy=True) of both sources, against autograd of the plain formula.
"""
import os

import pytest
import torch

from frpo_kernels import backends
from frpo_kernels.backends import torch_reference
from frpo_kernels.backends.torch_reference import lse_value
from frpo_kernels.logprob_sources import HiddenSource, LogitsSource
from frpo_kernels.ops import tile_policy
from helpers import INTERPRETED, rerun_under_interpreter, rerun_under_isa, runnable_isas, use_backend

KERNEL_BACKENDS = ["cpu", "triton"]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def make_logits(batch, length, vocab, seed, ninf=0.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    if ninf:  # -inf logits (not at the target): p = 0 there, p log p = 0
        drop = torch.rand(batch, length, vocab, generator=gen) < ninf
        drop.scatter_(-1, ids.unsqueeze(-1), False)
        logits = logits.masked_fill(drop, float("-inf"))
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0, 0] = True
    coef = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ecoef = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    return logits.to(dtype), ids, mask, coef, ecoef


def plain_logp_entropy(z, ids, temperature):
    """log-prob at ids and entropy of softmax(z / T), written out (autograd differentiates it)."""
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    p = log_probs.exp()
    entropy = -(p * torch.where(p > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    return log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy


def plain_loss(logp, entropy, mask, coef, ecoef):
    keep = mask.to(logp.dtype) if mask is not None else torch.ones_like(logp)
    return (keep * coef * logp).sum() + (keep * ecoef * entropy).sum()


def plain_grad(logits, ids, mask, temperature, coef, ecoef):
    z = logits.detach().double().requires_grad_(True)
    logp, entropy = plain_logp_entropy(z, ids, temperature)
    plain_loss(logp, entropy, mask, coef.double(), ecoef.double()).backward()
    return logp.detach(), entropy.detach(), z.grad


# ---------------------------------------------------------------------------------------------
# the contract in float64
@pytest.mark.parametrize("temperature, ninf, masked", [(1.0, 0.0, False), (0.7, 0.3, True), (1.6, 0.5, True)])
def test_reference_fused_is_the_gradient_of_the_plain_formula(temperature, ninf, masked):
    logits, ids, mask, coef, ecoef = make_logits(3, 4, 29, seed=1, ninf=ninf)
    mask = mask if masked else None
    logp, _, entropy, grad = torch_reference.fused(logits, ids, mask, temperature, coef, None, None, False,
                                                   entropy_coef=ecoef)
    want_logp, want_entropy, want_grad = plain_grad(logits, ids, mask, temperature, coef, ecoef)
    live = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    assert entropy is not None  # computed for the entropy term even though with_entropy=False
    assert torch.allclose(logp[live], want_logp[live], rtol=1e-12, atol=1e-12)
    assert torch.allclose(entropy[live], want_entropy[live], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    if ninf:
        assert (grad[logits == float("-inf")] == 0).all()


def test_reference_fused_entropy_term_is_backwards_dentropy_term():
    """With kl and the gate too: the fused gradient is backward's with dlogp and dentropy = entropy_coef."""
    logits, ids, mask, coef, ecoef = make_logits(3, 4, 29, seed=2, ninf=0.2)
    gen = torch.Generator().manual_seed(3)
    kl, ref, old = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    lo, hi = torch.full((3, 4), -0.5, dtype=torch.float64), torch.full((3, 4), 0.5, dtype=torch.float64)
    logp, lse, entropy, grad = torch_reference.fused(logits, ids, mask, 0.8, coef, kl, ref - 3, True, False,
                                                     old - 3, lo, hi, entropy_coef=ecoef)
    dlogp = torch_reference.token_loss_gradient(logp, coef, kl, ref - 3, old - 3, lo, hi)
    want = torch_reference.backward(logits, ids, mask, lse, dlogp, entropy, ecoef, 0.8)
    assert torch.equal(grad, want)
    without = torch_reference.fused(logits, ids, mask, 0.8, coef, kl, ref - 3, True, False, old - 3, lo, hi)[3]
    assert not torch.allclose(grad, without)


# ---------------------------------------------------------------------------------------------
# every kernel backend against torch_reference.fused
def assert_close(got, want, rtol, atol, what):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern"
    err = (got - want).abs().nan_to_num(0.0)
    bound = rtol * want.abs().nan_to_num(0.0) + atol
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (bound at worst {bound.min().item():.3g})"


CASES = [  # (dtype, batch, length, vocab, temperature, ninf, masked, extras, inplace)
    (torch.float32, 2, 3, 37, 1.0, 0.0, False, "", False),
    (torch.float32, 2, 3, 37, 0.7, 0.3, True, "", True),
    (torch.float32, 2, 3, 301, 1.3, 0.0, True, "kl+gate", False),
    (torch.float32, 1, 3, 5000, 0.9, 0.2, True, "kl", False),  # several CPU chunks, one of them all -inf
    (torch.bfloat16, 2, 3, 37, 1.0, 0.0, True, "", False),
    (torch.bfloat16, 2, 3, 301, 0.7, 0.3, False, "gate", True),
    (torch.bfloat16, 1, 3, 4097, 1.0, 0.1, True, "", False),  # odd V: the bf16 pair loops' last logit
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype, batch, length, vocab, temperature, ninf, masked, extras, inplace", CASES)
def test_kernel_fused_with_entropy_coef_matches_reference(backend, dtype, batch, length, vocab, temperature, ninf,
                                                          masked, extras, inplace):
    backend = use_backend(backend)
    logits, ids, mask, coef, ecoef = make_logits(batch, length, vocab, seed=vocab + batch, ninf=ninf, dtype=dtype)
    if vocab == 5000:  # a whole chunk (2048 logits) of -inf at the start of row 0, but not its target
        logits[0, 0, :2100] = float("-inf")
        ids[0, 0] = 3000
        logits[0, 0, 3000] = 1.0
    mask = mask if masked else None
    coef, ecoef = coef.float(), ecoef.float()  # the kernels' per-token dtype; the reference gets the same values
    gen = torch.Generator().manual_seed(7)
    kl = ref = old = lo = hi = None
    if "kl" in extras:
        kl = torch.rand(batch, length, generator=gen)
        ref = -3 + torch.randn(batch, length, generator=gen)
    if "gate" in extras:
        old = -3 - 2 * torch.rand(batch, length, generator=gen)
        lo, hi = torch.full((batch, length), -1.0), torch.full((batch, length), 1.0)
    gate = (old, lo, hi)

    def as64(t):
        return None if t is None else t.double()
    want = torch_reference.fused(logits.double(), ids, mask, temperature, as64(coef), as64(kl), as64(ref), False,
                                 False, *map(as64, gate), entropy_coef=as64(ecoef))
    work = logits.clone()
    logp, lse, entropy, grad = backends.kernels(backend).fused(work, ids, mask, temperature, coef, kl, ref, False,
                                                               inplace, *gate, entropy_coef=ecoef)
    if inplace:
        assert grad.data_ptr() == work.data_ptr()
    assert entropy is not None and entropy.dtype == torch.float32
    for name, got, ref_value in zip(("logp", "lse", "entropy"), (logp, lse_value(lse), entropy),
                                    (want[0], lse_value(want[1]), want[2])):
        assert_close(got, ref_value, 1e-5, 1e-5, name)
    assert not torch.isnan(grad).any()
    assert_close(grad, want[3], GRAD_RTOL[dtype], 2e-6 * want[3].abs().max().item(), "grad")
    if ninf:
        assert (grad[logits == float("-inf")] == 0).all()
    if mask is not None:
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_fused_without_entropy_coef_is_unchanged(backend):
    """entropy_coef=None is the old call: same gradient, entropy only when asked for."""
    backend = use_backend(backend)
    logits, ids, mask, coef, _ = make_logits(2, 3, 301, seed=4, dtype=torch.float32)
    run = backends.kernels(backend).fused
    old_call = run(logits, ids, mask, 0.9, coef.float(), None, None, False)
    new_call = run(logits, ids, mask, 0.9, coef.float(), None, None, False, entropy_coef=None)
    assert old_call[2] is None and new_call[2] is None
    for a, b in zip(old_call, new_call):
        assert a is None or torch.equal(a, b)
    zero = run(logits, ids, mask, 0.9, coef.float(), None, None, False, entropy_coef=torch.zeros(2, 3))
    assert zero[2] is not None
    assert_close(zero[3], old_call[3], 1e-6, 1e-7, "entropy_coef = 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_nonfinite_rows_with_entropy_coef_as_reference(dtype):
    """Rows with a NaN or a +inf logit: H is NaN, so p * (log p + H) makes the whole gradient row NaN, as
    torch gives it; other rows and masked rows are untouched."""
    use_backend("cpu")
    logits, ids, mask, coef, ecoef = make_logits(2, 4, 4200, seed=9, dtype=dtype)
    mask[:] = True
    mask[1, 3] = False
    logits[0, 1, 17] = float("nan")
    logits[0, 2, 3000] = float("inf")
    logits[1, 3, 5] = float("nan")  # masked: never read
    coef, ecoef = coef.float(), ecoef.float()
    want = torch_reference.fused(logits.double(), ids, mask, 0.9, coef.double(), None, None, True,
                                 entropy_coef=ecoef.double())
    got = backends.kernels("cpu").fused(logits, ids, mask, 0.9, coef, None, None, True, entropy_coef=ecoef)
    for name, g, w in zip(("logp", "lse", "entropy"), (got[0], lse_value(got[1]), got[2]),
                          (want[0], lse_value(want[1]), want[2])):
        assert_close(g, w, 1e-5, 1e-5, name)
    assert torch.isnan(got[3][0, 1]).all() and torch.isnan(got[3][0, 2]).all()
    assert_close(got[3], want[3], GRAD_RTOL[dtype], 2e-6 * want[3].nan_to_num(0.0).abs().max().item(), "grad")
    assert (got[3][1, 3] == 0).all()


@pytest.mark.skipif(INTERPRETED, reason="the cpu op's schema")
def test_cpu_op_schema_takes_entropy_coef():
    use_backend("cpu")
    ops = torch.ops.frpo_kernels
    logits, ids, mask, coef, ecoef = make_logits(2, 3, 37, seed=5, dtype=torch.float32)
    t = coef.float()
    torch.library.opcheck(ops.token_logprobs_fused.default,
                          (logits, ids, mask, 0.8, t, None, None, False, None, None, None, ecoef.float()))
    torch.library.opcheck(ops.token_logprobs_fused_inplace.default,
                          (logits.clone(), ids, mask, 1.0, t, t.abs(), t - 3, True, None, None, None, ecoef.float()))
    # the entropy output comes back whatever with_entropy says
    assert ops.token_logprobs_fused(logits, ids, mask, 1.0, t, None, None, False, entropy_coef=t)[2].shape == (2, 3)
    with pytest.raises(RuntimeError, match="entropy_coef must have shape"):
        ops.token_logprobs_fused(logits, ids, mask, 1.0, t, None, None, False, entropy_coef=torch.ones(3))


# ---------------------------------------------------------------------------------------------
# the entry points: fused and two-pass, logits and hidden states
SOURCE_BACKENDS = ["torch", "cpu", "triton"]


def hidden_batch(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, V = 3, 4, 8, 37
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    bias[5] = float("-inf")  # a vocab entry never predicted: p = 0 in every row
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[ids == 5] = 6
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0, 0] = True
    coef = torch.randn(B, T, generator=gen, dtype=torch.float64)
    ecoef = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), ids, mask, coef, ecoef


def input_dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def tolerance(backend):
    return (1e-10, 1e-12) if backend == "torch" else (2e-4, 2e-5)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def plain_hidden_grads(hidden, weight, bias, ids, mask, temperature, coef, ecoef):
    h, w, b = leaves(hidden.double(), weight.double(), bias.double())
    logp, entropy = plain_logp_entropy(torch.nn.functional.linear(h, w, b), ids, temperature)
    plain_loss(logp, entropy, mask, coef.double(), ecoef.double()).backward()
    return h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", SOURCE_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_source_fused_and_two_pass_entropy_gradients(backend, temperature):
    backend = use_backend(backend)
    dtype = input_dtype(backend)
    logits, ids, mask, coef, ecoef = make_logits(3, 4, 37, seed=11, ninf=0.2, dtype=dtype)
    _, _, want = plain_grad(logits, ids, mask, temperature, coef, ecoef)
    rtol, atol = tolerance(backend)
    scale = want.abs().max().item()
    token = coef.to(dtype if backend == "torch" else torch.float32)
    etoken = ecoef.to(token.dtype)

    (z,) = leaves(logits)
    source = LogitsSource(z, ids, temperature, backend)
    loss, logp, entropy = source.fused(mask, token * mask, None, None, False,
                                       lambda lp: (token * mask * lp).sum(), entropy_coef=etoken * mask)
    assert entropy is not None
    loss.backward()
    assert_close(z.grad, want, rtol, atol * scale, "fused grad_logits")

    (z,) = leaves(logits)
    logp, entropy = LogitsSource(z, ids, temperature, backend).two_pass(mask, with_entropy=True)
    plain_loss(logp, entropy, mask, token, etoken).backward()
    assert_close(z.grad, want, rtol, atol * scale, "two-pass grad_logits")


@pytest.mark.parametrize("backend", SOURCE_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_source_fused_and_two_pass_entropy_gradients(monkeypatch, backend, temperature):
    backend = use_backend(backend)
    monkeypatch.setattr(tile_policy, "TILE_ROWS", 4)  # several tiles, the last one ragged
    dtype = input_dtype(backend)
    hidden, weight, bias, ids, mask, coef, ecoef = hidden_batch(seed=12, dtype=dtype)
    want = plain_hidden_grads(hidden, weight, bias, ids, mask, temperature, coef, ecoef)
    rtol, atol = tolerance(backend)
    token = coef.to(dtype if backend == "torch" else torch.float32)
    etoken = ecoef.to(token.dtype)

    def check(grads, what):
        for name, got, w in zip(("hidden", "weight", "bias"), grads, want):
            assert got is not None, f"{what}: no {name} gradient"
            assert_close(got, w, rtol, atol * w.abs().max().item(), f"{what} grad_{name}")

    h, w, b = leaves(hidden, weight, bias)
    source = HiddenSource(h, w, b, ids, temperature, backend)
    loss, logp, entropy = source.fused(mask, token * mask, None, None, False,
                                       lambda lp: (token * mask * lp).sum(), entropy_coef=etoken * mask)
    assert entropy is not None and entropy.shape == ids.shape
    loss.backward()
    check((h.grad, w.grad, b.grad), "fused")

    h, w, b = leaves(hidden, weight, bias)
    logp, entropy = HiddenSource(h, w, b, ids, temperature, backend).two_pass(mask, with_entropy=True)
    plain_loss(logp, entropy, mask, token, etoken).backward()
    check((h.grad, w.grad, b.grad), "two-pass")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_hidden_source_fused_bf16(backend):
    """bf16 hidden states and head (on CPU the tiles are fp32: linear_logprobs.CPU_LOW_PRECISION_GEMMS_IN_FP32),
    bf16 gradients, against the float64 formula on the same values."""
    backend = use_backend(backend)
    hidden, weight, bias, ids, mask, coef, ecoef = hidden_batch(seed=13, dtype=torch.bfloat16)
    want = plain_hidden_grads(hidden, weight, bias, ids, mask, 1.0, coef, ecoef)
    h, w, b = leaves(hidden, weight, bias)
    loss, _, _ = HiddenSource(h, w, b, ids, 1.0, backend).fused(
        mask, coef.float() * mask, None, None, False, lambda lp: lp.sum() * 0, entropy_coef=ecoef.float() * mask)
    loss.backward()
    for name, got, want_grad in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), want):
        assert_close(got, want_grad, 3e-2, 3e-2 * want_grad.abs().max().item(), f"bf16 grad_{name}")


# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(bool(os.environ.get("FRPO_CPU_ISA")) or INTERPRETED, reason="a rerun on one chosen path")
@pytest.mark.parametrize("isa", runnable_isas()[1:])
def test_every_other_cpu_path(isa):
    """The cpu cases ran above on the fastest path (auto); here again on each slower one."""
    use_backend("cpu")
    rerun_under_isa(__file__, isa)


@pytest.mark.skipif(INTERPRETED or bool(os.environ.get("FRPO_CPU_ISA")), reason="this is a rerun")
def test_triton_cases_under_interpreter():
    rerun_under_interpreter(__file__, select="triton")

