"""Non-finite logits through the C++ CPU kernels (backends/cpu.py) against torch_reference.py: NaN and +-inf
at the target, elsewhere, first, last, in the tail past the last full vector, in a chunk of -inf; for
forward, backward (with and without the entropy term), fused (with and without k3-KL), in place; every
dtype and every ISA this CPU runs. The NaN / inf pattern of every output must equal the reference's
exactly (a NaN anywhere in a row makes the row's logp, lse, entropy and gradient NaN, as torch does; a
+inf gives lse = inf), and the finite values must match it as in test_cpu_kernels.py.
"""
import pytest
import torch

from frpo_kernels.backends import torch_reference
from helpers import runnable_isas

cpu = pytest.importorskip("frpo_kernels.backends.cpu")
AVAILABLE, WHY = cpu.availability()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"cpu backend unavailable: {WHY}")

NAN, INF = float("nan"), float("inf")
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
TEMPERATURE = 0.9
CHUNK = 2048  # the kernels' max/sum-exp chunk (csrc/core/detail.h): a NaN in an all -inf chunk is a case


@pytest.fixture(params=runnable_isas())
def isa(request):
    previous = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(previous)


def _rows(vocab):
    """(name, {position: value} or a callable filling the row, target id, masked) per row."""
    mid, tgt, tail = vocab // 2, vocab // 3, vocab - 3  # vocab % 8 == 5: vocab - 3 is past the last full vector
    later = CHUNK + 1 if vocab > CHUNK + 1 else 1
    lead = min(vocab, CHUNK)

    def lead_ninf_nan(row):  # the first chunk all -inf but one NaN: that chunk's max is -inf
        row[:lead] = -INF
        row[lead // 4] = NAN
        row[tgt] = 1.0 if tgt >= lead else row[tgt]

    return [
        ("clean", {}, tgt, False),
        ("nan_target", {tgt: NAN}, tgt, False),
        ("nan_middle", {mid: NAN}, tgt, False),
        ("nan_first", {0: NAN}, tgt, False),
        ("nan_last", {vocab - 1: NAN}, tgt, False),
        ("nan_tail", {tail: NAN}, tgt, False),
        ("nan_later_chunk", {later: NAN}, tgt, False),
        ("two_nans", {0: NAN, vocab - 1: NAN}, tgt, False),
        ("pinf_middle", {mid: INF}, tgt, False),
        ("pinf_target", {tgt: INF}, tgt, False),
        ("pinf_first_last", {0: INF, vocab - 1: INF}, tgt, False),
        ("pinf_tail", {tail: INF}, tgt, False),
        ("pinf_and_nan", {mid: INF, tail: NAN}, tgt, False),
        ("ninf_target", {tgt: -INF}, tgt, False),
        ("ninf_tail", {tail: -INF, 0: -INF}, tgt, False),
        ("all_ninf", lambda row: row.fill_(-INF), tgt, False),
        ("all_ninf_but_nan", lambda row: (row.fill_(-INF), row.__setitem__(mid, NAN)), tgt, False),
        ("lead_ninf_chunk_nan", lead_ninf_nan, tgt, False),
        ("masked_nan", {mid: NAN, tgt: NAN}, tgt, True),
        ("masked_pinf", {mid: INF}, tgt, True),
        ("masked_all_ninf", lambda row: row.fill_(-INF), tgt, True),
    ]


def _problem(vocab, dtype, seed=0):
    rows = _rows(vocab)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, len(rows), vocab, generator=gen) * 3
    ids = torch.empty(1, len(rows), dtype=torch.long)
    mask = torch.ones(1, len(rows), dtype=torch.bool)
    for r, (_, fill, target, masked) in enumerate(rows):
        row = logits[0, r]
        if callable(fill):
            fill(row)
        else:
            for pos, value in fill.items():
                row[pos] = value
        ids[0, r], mask[0, r] = target, not masked
    names = [name for name, *_ in rows]
    per_token = [torch.randn(1, len(rows), generator=gen) for _ in range(4)]
    return logits.to(dtype), ids, mask, names, per_token


def _same_pattern(got, want, names, what, rtol, atol=0.0):
    """Equal NaN positions, equal infinities (with sign), finite values within atol + rtol*|want|."""
    got, want = got.double(), want.double()
    for r, name in enumerate(names):
        g, w = got[0, r], want[0, r]
        where = f"{what}, row {name!r}"
        assert torch.equal(torch.isnan(g), torch.isnan(w)), (
            f"{where}: NaN pattern differs: got {_show(g)}, reference {_show(w)}")
        inf_g, inf_w = torch.isinf(g), torch.isinf(w)
        assert torch.equal(inf_g, inf_w) and torch.equal(g[inf_g], w[inf_w]), (
            f"{where}: infinities differ: got {g[inf_g | inf_w].tolist()}, reference {w[inf_g | inf_w].tolist()}")
        fin = torch.isfinite(w)
        err = (g[fin] - w[fin]).abs()
        bound = atol + rtol * w[fin].abs()
        assert bool((err <= bound).all()), f"{where}: max abs err {err.max().item():.3e}"


def _show(t):
    if t.dim() == 0:
        return repr(t.item())
    return f"NaN at {torch.isnan(t).nonzero().flatten()[:6].tolist()}, first values {t[:3].tolist()}"


def _check_tokens(got, want, names):
    for what, g, w in zip(("logp", "lse", "entropy"), got, want):
        if w is None:
            assert g is None
            continue
        if what == "lse":  # compared as hi + lo: the parts alone differ by how hi was rounded
            g, w = torch_reference.lse_value(g), torch_reference.lse_value(w)
        _same_pattern(g, w, names, what, 1e-5, 1e-5)


def _check_grad(got, want, names, dtype):
    assert got.dtype == dtype
    finite = want[torch.isfinite(want)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    _same_pattern(got, want, names, f"grad ({dtype})", GRAD_RTOL[dtype],
                  2e-6 * max(scale, 1.0) + (6e-8 if dtype == torch.float16 else 0.0))


VOCABS = [4 * CHUNK // 2 + 45, 13]  # two full chunks + a 45-element one (32 + 8 + 5: every loop), one short row
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_nonfinite_matches_reference(isa, dtype, vocab):
    logits, ids, mask, names, _ = _problem(vocab, dtype)
    z = logits.double()
    for with_entropy in (False, True):
        got = cpu.forward(logits, ids, mask, TEMPERATURE, with_entropy)
        want = torch_reference.forward(z, ids, mask, TEMPERATURE, with_entropy)
        _check_tokens(got, want, names)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("entropy_term", [False, True])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_nonfinite_matches_reference(isa, dtype, vocab, entropy_term, inplace):
    logits, ids, mask, names, (dlogp, dent, _, _) = _problem(vocab, dtype, seed=1)
    z = logits.double()
    _, lse, ent = torch_reference.forward(z, ids, mask, TEMPERATURE, True)  # lse = inf / NaN where the spec has it
    e, de = (ent, dent) if entropy_term else (None, None)
    want = torch_reference.backward(z, ids, mask, lse, dlogp.double(), e, None if de is None else de.double(),
                                    TEMPERATURE)
    target = logits.clone() if inplace else logits
    got = cpu.backward(target, ids, mask, lse.float(), dlogp, None if e is None else e.float(), de, TEMPERATURE,
                       inplace=inplace)
    _check_grad(got, want, names, dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_nonfinite_matches_reference(isa, dtype, vocab, with_kl, inplace):
    logits, ids, mask, names, (coef, kl, ref_shift, _) = _problem(vocab, dtype, seed=2)
    z = logits.double()
    kl = kl.abs() if with_kl else None
    ref = -3.0 + 0.1 * ref_shift if with_kl else None
    want = torch_reference.fused(z, ids, mask, TEMPERATURE, coef.double(), None if kl is None else kl.double(),
                                 None if ref is None else ref.double(), True)
    target = logits.clone() if inplace else logits
    got = cpu.fused(target, ids, mask, TEMPERATURE, coef, kl, ref, True, inplace=inplace)
    _check_tokens(got[:3], want[:3], names)
    _check_grad(got[3], want[3], names, dtype)


def test_masked_nonfinite_rows_stay_zero(isa):
    logits, ids, mask, names, (coef, *_) = _problem(VOCABS[0], torch.float32, seed=3)
    logp, lse, ent, grad = cpu.fused(logits, ids, mask, TEMPERATURE, coef, None, None, True)
    for r in (~mask[0]).nonzero().flatten().tolist():
        assert logp[0, r] == 0 and (lse[0, r] == 0).all() and ent[0, r] == 0, names[r]
        assert (grad[0, r] == 0).all(), names[r]
