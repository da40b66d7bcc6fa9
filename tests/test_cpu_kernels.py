"""The C++ CPU backend (frpo_kernels.backends.cpu, csrc/) against torch_reference.py: forward, backward
(with and without the entropy term), fused (with and without k3-KL), in place; dtypes, strides, -inf, masks,
temperature; a hypothesis sweep; bad inputs; opcheck; and loss(backend="cpu") end to end.

Tolerances: fp32 outputs within 1e-5 relative of the float64 reference (plus 1e-5 nats absolute for
logp/lse/entropy, and 2e-6 x the largest |gradient| for gradients); bf16/fp16 logits are exact in fp32,
so the per-token outputs keep the fp32 tolerance, and only the gradient (stored in the logits' dtype)
is compared at one rounding of that dtype (bf16 8e-3, fp16 1e-3 relative).
"""
import itertools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import frpo_kernels
from frpo_kernels import backends
from frpo_kernels.backends import torch_reference
from helpers import expected_isa, make_batch, require_cpu_kernels, rerun_under_isa, runnable_isas

cpu = pytest.importorskip("frpo_kernels.backends.cpu")
AVAILABLE, WHY = cpu.availability()
needs_cpu = pytest.mark.skipif(not AVAILABLE, reason=f"cpu backend unavailable: {WHY}")
OPS = torch.ops.frpo_kernels if AVAILABLE else None
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_extension_loads():
    assert AVAILABLE, WHY
    assert cpu.isa() == expected_isa()


@pytest.mark.skipif(bool(os.environ.get("FRPO_CPU_ISA")), reason="a rerun on one chosen path")
@pytest.mark.parametrize("isa", runnable_isas()[1:])
def test_every_other_path_this_cpu_runs(isa):
    """The file's cases ran above on the fastest path (auto); here again on each slower one."""
    require_cpu_kernels()
    rerun_under_isa(__file__, isa)


def _logits(batch, length, vocab, dtype, seed=0, ninf=0.0, pad=0, scale=3.0):
    """[B, T, V] logits, optionally a slice [:, 1:-1, pad:pad+V] of a bigger tensor (row strides != V)."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(batch, length + 2 * bool(pad), vocab + 2 * pad, generator=gen) * scale
    if ninf:
        big[torch.rand(big.shape, generator=gen) < ninf] = float("-inf")
    big = big.to(dtype)
    return big[:, 1:-1, pad:pad + vocab] if pad else big


def _ids(logits, seed=0):
    """Random targets; a -inf target logit is made finite (logp = -inf is outside the tested contract)."""
    batch, length, vocab = logits.shape
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 1))
    target = logits.gather(-1, ids.unsqueeze(-1))
    logits.scatter_(-1, ids.unsqueeze(-1), torch.where(torch.isinf(target), torch.zeros_like(target), target))
    return ids


def _mask(batch, length, seed=0):
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed + 2)) > 0.3
    mask[0, 0] = True
    return mask


def _close(got, want, rtol, atol, what):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), (f"{what}: max abs err {err.max().item():.3e}, worst excess "
                                        f"{(err - bound).max().item():.3e} (rtol {rtol}, atol {atol:.2e})")


def _check_tokens(got, want, mask=None):
    for name, g, w in zip(("logp", "lse", "entropy"), got, want):
        if w is None:
            assert g is None, f"{name} should be None"
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape
        if name == "lse":  # compared as hi + lo: the parts alone differ by how hi was rounded
            g, w = torch_reference.lse_value(g), torch_reference.lse_value(w)
        _close(g, w, 1e-5, 1e-5, name)


def _check_grad(got, want, dtype, dscale=0.0):
    """dscale: max |dlogp| / T, the gradient's natural scale (fp32 rounding of 1 - p is relative to it)."""
    assert got.dtype == dtype and got.shape == want.shape
    scale = max(want.double().abs().max().item(), dscale)
    atol = 2e-6 * scale + (6e-8 if dtype == torch.float16 else 0.0)
    _close(got, want, GRAD_RTOL[dtype], atol, f"grad ({dtype})")


def _ref64(logits):
    return logits.double()


@needs_cpu
@pytest.mark.parametrize("dtype,vocab,pad,ninf,temperature,masked", [
    (torch.float32, 1000, 0, 0.0, 1.0, False),
    (torch.float32, 4097, 3, 0.2, 0.7, True),
    (torch.float32, 9001, 0, 0.0, 1.3, True),
    (torch.float32, 1, 0, 0.0, 1.0, False),
    (torch.bfloat16, 777, 2, 0.1, 1.0, True),
    (torch.bfloat16, 8192, 0, 0.0, 0.5, False),
    (torch.float16, 333, 1, 0.3, 0.9, True),
    (torch.float16, 5000, 0, 0.0, 1.0, False),
])
def test_forward_backward_fused_match_reference(dtype, vocab, pad, ninf, temperature, masked):
    logits = _logits(2, 3, vocab, dtype, seed=vocab, ninf=ninf, pad=pad)
    ids = _ids(logits, seed=vocab)
    mask = _mask(2, 3, seed=vocab) if masked else None
    z = _ref64(logits)
    gen = torch.Generator().manual_seed(7)
    dlogp, dent, coef, kl = (torch.randn(2, 3, generator=gen) for _ in range(4))
    kl = kl.abs()

    for with_entropy in (False, True):
        got = cpu.forward(logits, ids, mask, temperature, with_entropy)
        want = torch_reference.forward(z, ids, mask, temperature, with_entropy)
        _check_tokens(got, want)

    logp, lse, ent = cpu.forward(logits, ids, mask, temperature, True)
    _, lse64, ent64 = torch_reference.forward(z, ids, mask, temperature, True)
    for entropy_term in (False, True):
        e, de = (ent, dent) if entropy_term else (None, None)
        e64, de64 = (ent64, dent.double()) if entropy_term else (None, None)
        got = cpu.backward(logits, ids, mask, lse, dlogp, e, de, temperature)
        want = torch_reference.backward(z, ids, mask, lse64, dlogp.double(), e64, de64, temperature)
        _check_grad(got, want, dtype)

    ref_logps = (logp + 0.2 * torch.randn(2, 3, generator=gen)).double()
    for with_kl in (False, True):
        klc, ref = (kl, ref_logps.float()) if with_kl else (None, None)
        got = cpu.fused(logits, ids, mask, temperature, coef, klc, ref, True)
        want = torch_reference.fused(z, ids, mask, temperature, coef.double(),
                                     None if klc is None else kl.double(), None if ref is None else ref.double(), True)
        _check_tokens(got[:3], want[:3])
        _check_grad(got[3], want[3], dtype)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_writes_into_logits_storage(dtype):
    base = _logits(2, 4, 300, dtype, seed=3, pad=2, ninf=0.1)
    logits = base  # a strided view: the gradient must land in the same (strided) places
    ids, mask = _ids(logits, 3), _mask(2, 4, 3)
    coef = torch.randn(2, 4)
    want = cpu.fused(logits, ids, mask, 0.8, coef, None, None, False)
    snapshot = logits.clone()
    got = cpu.fused(logits, ids, mask, 0.8, coef, None, None, False, inplace=True)
    assert got[3].data_ptr() == logits.data_ptr()
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g, w)
    assert torch.equal(logits, want[3])

    logp, lse, _ = cpu.forward(snapshot, ids, mask, 0.8, False)
    dlogp = torch.randn(2, 4)
    want = cpu.backward(snapshot, ids, mask, lse, dlogp, None, None, 0.8)
    out = cpu.backward(snapshot, ids, mask, lse, dlogp, None, None, 0.8, inplace=True)
    assert out is snapshot and torch.equal(snapshot, want)


@needs_cpu
def test_masked_rows_all_inf_and_zero_gradient():
    logits = _logits(2, 3, 50, torch.float32, seed=1)
    logits[1, 2] = float("-inf")          # a whole row of -inf, masked out
    logits[0, 1, :40] = float("-inf")     # -inf entries in a live row
    ids = torch.full((2, 3), 45)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    logp, lse, ent, grad = cpu.fused(logits, ids, mask, 1.0, torch.ones(2, 3), None, None, True)
    for t in (logp, lse, ent, grad):
        assert torch.isfinite(t).all()
    assert logp[1, 2] == 0 and (lse[1, 2] == 0).all() and ent[1, 2] == 0 and (grad[1, 2] == 0).all()
    assert (grad[0, 1, :40] == 0).all()
    want = torch_reference.fused(logits.double(), ids, mask, 1.0, torch.ones(2, 3).double(), None, None, True)
    _check_tokens((logp, lse, ent), want[:3])
    _check_grad(grad, want[3], torch.float32)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 40, 5000])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_a_certain_token_is_exact_at_any_temperature(dtype, vocab, temperature):
    """A row whose only finite logit is the target: logp = entropy = 0 exactly, and so is the gradient.
    At T != 1 the sweeps subtracted the max from the exact product x * (1/T) (an FMA: written, or made by
    the compiler) while the max was the rounded product: the target got exp(residual), logp up to +4e-7
    and entropies of +-5e-8, which top_entropy_quantile's ties turned into O(1) changes of the loss."""
    gen = torch.Generator().manual_seed(vocab)
    ids = torch.randint(0, vocab, (3, 4), generator=gen)
    logits = torch.full((3, 4, vocab), float("-inf"))
    logits.scatter_(-1, ids.unsqueeze(-1), 3 * torch.randn(3, 4, 1, generator=gen))
    logits = logits.to(dtype)
    logp, _, ent, grad = cpu.fused(logits, ids, None, temperature, torch.ones(3, 4), None, None, True)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent))
    assert torch.equal(grad.float(), torch.zeros_like(grad.float()))
    logp, _, ent = cpu.forward(logits, ids, None, temperature, True)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent))


@needs_cpu
@pytest.mark.parametrize("offset", [1e4, 1e6, 1e30, 3e38])
def test_fused_gradient_at_large_logits(offset):
    """The fused gradient takes p = exp((z - m) - log s), not exp(z - lse) with lse rounded to fp32 (off by
    |lse| * 6e-8 relative: 1e-4 at logits of 1e4, everything at 3e38, even with lse in double). T = 1:
    at other T, x/T itself rounds (by |x/T| * 6e-8) before any of this."""
    logits = _logits(2, 3, 300, torch.float32, seed=2) * 3 + offset
    ids = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(3))
    coef = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    logp, _, ent, grad = cpu.fused(logits, ids, None, 1.0, coef, None, None, True)
    want = torch_reference.fused(logits.double(), ids, None, 1.0, coef.double(), None, None, True)
    assert torch.isfinite(grad).all()
    _check_grad(grad, want[3], torch.float32)
    torch.testing.assert_close(logp.double(), want[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent.double(), want[2], rtol=1e-5, atol=1e-5)


@needs_cpu
def test_masked_rows_may_hold_out_of_range_ids():
    logits = _logits(1, 3, 20, torch.float32)
    ids = torch.tensor([[1, -100, 5]])
    mask = torch.tensor([[True, False, True]])
    logp, lse, _ = cpu.forward(logits, ids, mask, 1.0, False)
    assert logp[0, 1] == 0 and (lse[0, 1] == 0).all()


@needs_cpu
def test_large_vocab_multi_chunk_and_many_rows_parallel():
    logits = _logits(4, 33, 20011, torch.float32, seed=11, scale=8.0)
    ids = _ids(logits, 11)
    want = torch_reference.forward(_ref64(logits), ids, None, 1.0, True)
    _check_tokens(cpu.forward(logits, ids, None, 1.0, True), want)


# ---------------------------------------------------------------------------------------------
@st.composite
def _problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(41, 5000)))
    pad = draw(st.integers(0, 3))
    ninf = draw(st.sampled_from([0.0, 0.0, 0.2, 0.9]))
    temperature = draw(st.sampled_from([1.0, 0.6, 1.7]))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    mode = draw(st.sampled_from(["forward", "backward", "backward_entropy", "fused", "fused_kl", "fused_inplace"]))
    return dtype, batch, length, vocab, pad, ninf, temperature, masked, seed, mode


@needs_cpu
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_hypothesis_against_reference(problem):
    dtype, batch, length, vocab, pad, ninf, temperature, masked, seed, mode = problem
    logits = _logits(batch, length, vocab, dtype, seed=seed, ninf=ninf, pad=pad)
    ids = _ids(logits, seed)
    mask = _mask(batch, length, seed) if masked else None
    z = _ref64(logits)
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = torch.randn(batch, length, generator=gen), torch.randn(batch, length, generator=gen)
    if mode == "forward":
        _check_tokens(cpu.forward(logits, ids, mask, temperature, True),
                      torch_reference.forward(z, ids, mask, temperature, True))
    elif mode.startswith("backward"):
        _, lse, ent = cpu.forward(logits, ids, mask, temperature, True)
        _, lse64, ent64 = torch_reference.forward(z, ids, mask, temperature, True)
        e = mode == "backward_entropy"
        got = cpu.backward(logits, ids, mask, lse, d1, ent if e else None, d2 if e else None, temperature)
        want = torch_reference.backward(z, ids, mask, lse64, d1.double(), ent64 if e else None,
                                        d2.double() if e else None, temperature)
        _check_grad(got, want, dtype, (d1.abs().max() + d2.abs().max()).item() / temperature)
    else:
        kl = mode == "fused_kl"
        ref = torch_reference.forward(z, ids, mask, temperature, False)[0] + 0.1 * d2.double()
        want = torch_reference.fused(z, ids, mask, temperature, d1.double(), d2.abs().double() if kl else None,
                                     ref if kl else None, False)
        target = logits.clone() if mode == "fused_inplace" else logits
        got = cpu.fused(target, ids, mask, temperature, d1, d2.abs() if kl else None, ref.float() if kl else None,
                        False, inplace=mode == "fused_inplace")
        _check_tokens(got[:3], want[:3])
        _check_grad(got[3], want[3], dtype, (d1.abs().max() + d2.abs().max()).item() / temperature)


# ---------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("bad,match", [
    (dict(logits=torch.zeros(2, 3, 5, dtype=torch.float64)), "float32, bfloat16 or float16"),
    (dict(logits=torch.zeros(2, 5, 3).transpose(1, 2)), "stride 1 in the last dimension"),
    (dict(logits=torch.zeros(2, 3)), r"shape \[B, T, V\]"),
    (dict(logits=torch.zeros(2, 3, 0)), "V = 0"),
    (dict(ids=torch.full((2, 3), 5)), r"ids has entries outside \[0, 5\)"),
    (dict(ids=torch.full((2, 3), -1)), "outside"),
    (dict(ids=torch.zeros(3, 2, dtype=torch.long)), "ids must have shape"),
    (dict(ids=torch.zeros(2, 3, dtype=torch.int32)), "ids must be int64"),
    (dict(mask=torch.ones(2, 2, dtype=torch.bool)), "mask must have shape"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    args = dict(logits=torch.zeros(2, 3, 5), ids=torch.zeros(2, 3, dtype=torch.long), mask=None, temperature=1.0)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        OPS.token_logprobs_fwd(args["logits"], args["ids"], args["mask"], args["temperature"], False)


@needs_cpu
def test_bad_token_inputs_raise_clear_errors():
    logits, ids, lse = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 2)
    with pytest.raises(RuntimeError, match=r"dlogp must have shape \[2, 3\]"):
        OPS.token_logprobs_bwd(logits, ids, None, lse, torch.zeros(3), None, None, 1.0)
    with pytest.raises(RuntimeError, match="both entropy and dentropy"):
        OPS.token_logprobs_bwd(logits, ids, None, lse, torch.zeros(2, 3), torch.zeros(2, 3), None, 1.0)
    for bad_lse in (torch.zeros(2, 3), torch.zeros(2, 3, 2, dtype=torch.float64)):  # not the forward's lse
        with pytest.raises(RuntimeError, match=r"lse must be the forward's float32 \[2, 3, 2\]"):
            OPS.token_logprobs_bwd(logits, ids, None, bad_lse, torch.zeros(2, 3), None, None, 1.0)
    with pytest.raises(RuntimeError, match="kl_coef needs ref_logps"):
        OPS.token_logprobs_fused(logits, ids, None, 1.0, torch.zeros(2, 3), torch.zeros(2, 3), None, False)
    with pytest.raises(RuntimeError, match="coef must be a floating-point"):
        OPS.token_logprobs_fused(logits, ids, None, 1.0, torch.zeros(2, 3, dtype=torch.long), None, None, False)
    expanded = torch.zeros(1, 3, 5).expand(2, 3, 5)
    with pytest.raises(RuntimeError, match="do not overlap"):
        OPS.token_logprobs_fused_inplace(expanded, ids, None, 1.0, torch.zeros(2, 3), None, None, False)


@needs_cpu
def test_opcheck():
    logits = _logits(2, 3, 37, torch.float32, seed=5, pad=1)
    ids, mask = _ids(logits, 5), _mask(2, 3, 5)
    lse = cpu.forward(logits, ids, mask, 1.0, False)[1]
    t = torch.randn(2, 3)
    cases = [
        (OPS.token_logprobs_fwd.default, (logits, ids, mask, 0.9, True)),
        (OPS.token_logprobs_fwd.default, (logits, ids, None, 1.0, False)),
        (OPS.token_logprobs_bwd.default, (logits, ids, mask, lse, t, t.abs(), t, 1.0)),
        (OPS.token_logprobs_bwd.default, (logits, ids, None, lse, t, None, None, 1.0)),
        (OPS.token_logprobs_fused.default, (logits, ids, mask, 1.0, t, t.abs(), t - 3, True)),
        (OPS.token_logprobs_fused_inplace.default, (logits.clone(), ids, mask, 1.0, t, None, None, False)),
        (OPS.token_logprobs_bwd_inplace.default, (logits.clone(), ids, mask, lse, t, None, None, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
def _loss_value_and_grad(data, backend, logits, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    value = frpo_kernels.loss(z, data["ids"], data["mask"], rewards=data["rewards"], group_size=data["group_size"],
                              backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@needs_cpu
@pytest.mark.parametrize("loss_type,with_old,beta,temperature", [
    (lt, old, beta, temp) for lt, old, beta, temp in itertools.product(
        ["frpo", "grpo", "bnpo", "dr_grpo", "dapo"], [False, True], [0.0, 0.05], [1.0])
] + [("frpo", False, 0.05, 0.7), ("grpo", True, 0.0, 1.3)])
def test_loss_cpu_backend_matches_torch(loss_type, with_old, beta, temperature):
    data = make_batch(batch=6, length=5, vocab=301, dtype=torch.float32, seed=13)
    kwargs = dict(loss_type=loss_type, old_logps=data["old"].float() if with_old else None,
                  ref_logps=data["ref"].float() if beta else None, beta=beta, temperature=temperature)
    v_cpu, g_cpu = _loss_value_and_grad(data, "cpu", data["logits"], **kwargs)
    v_ref, g_ref = _loss_value_and_grad(data, "torch", data["logits"], **kwargs)
    _close(v_cpu, v_ref, 1e-5, 1e-6, "loss value")
    _close(g_cpu, g_ref, 1e-4, 1e-6 * g_ref.abs().max().item() + 1e-9, "loss gradient")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_cpu_backend_low_precision(dtype):
    data = make_batch(batch=6, length=5, vocab=301, dtype=dtype, seed=17)
    v_cpu, g_cpu = _loss_value_and_grad(data, "cpu", data["logits"], beta=0.05, ref_logps=data["ref"].float())
    v_ref, g_ref = _loss_value_and_grad(data, "torch", data["logits"], beta=0.05, ref_logps=data["ref"].float())
    _close(v_cpu, v_ref, 1e-4, 1e-6, "loss value")
    assert g_cpu.dtype == dtype
    _close(g_cpu, g_ref, GRAD_RTOL[dtype] * 2, 1e-3 * g_ref.float().abs().max().item(), "loss gradient")


@needs_cpu
def test_token_logprobs_cpu_backend_with_entropy_gradient():
    logits = _logits(2, 4, 500, torch.float32, seed=21)
    ids = _ids(logits, 21)
    outs = {}
    for backend in ("cpu", "torch"):
        z = logits.clone().requires_grad_(True)
        logp, ent = frpo_kernels.token_logprobs(z, ids, temperature=0.8, return_entropy=True, backend=backend)
        (logp.sum() + 0.3 * ent.sum()).backward()
        outs[backend] = (logp.detach(), ent.detach(), z.grad)
    _check_tokens(outs["cpu"][:2] + (None,), outs["torch"][:2] + (None,))
    _close(outs["cpu"][2], outs["torch"][2], 1e-4, 1e-6, "token_logprobs gradient")


@needs_cpu
def test_auto_picks_cpu_for_cpu_float_tensors():
    for dtype in DTYPES:
        assert backends.resolve("auto", torch.zeros(1, 1, 4, dtype=dtype)) == "cpu"
    assert backends.resolve("auto", torch.zeros(1, 1, 4, dtype=torch.float64)) == "torch"
