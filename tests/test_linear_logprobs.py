"""frpo_kernels/ops/linear_logprobs.py: log-probs and the fused loss gradient from hidden states and
the LM head in tiles of rows, against autograd through the materialised logits.

Exactness (float64, torch backend, 1e-10): linear_token_logprobs and linear_fused_loss vs autograd
through frpo_kernels.token_logprobs(hidden @ W.T + b): values and gradients w.r.t. hidden, weight
and bias; bias or not, trainable / frozen / tied head, temperature, entropy with its gradient,
masks (whole sequences masked, everything masked), every tile-boundary class (N < tile, N = tile,
N = k * tile + 1). The kernels (cpu; triton in Triton's interpreter, rerun in a subprocess as in
test_triton_interpreter.py) in fp32 and bf16 against the float64 truth, with the tolerances at
FP32_TOL / BF16_TOL. Peak memory of fwd+bwd in a subprocess stays far below the [N, V] logits.
"""
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import frpo_kernels
from frpo_kernels.ops import linear_logprobs as lin
from frpo_kernels.ops import tile_policy
from frpo_kernels.ops.linear_logprobs import linear_fused_loss, linear_token_logprobs
from helpers import rerun_under_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETER_RUN = os.environ.get("FRPO_LINEAR_TRITON_SUBPROCESS") == "1"


def make(batch, length, hidden_size, vocab, dtype=torch.float64, bias=True, seed=0, mask="some"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / math.sqrt(hidden_size) * 2
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    row_mask = None
    if mask == "some":  # a whole sequence and one more token masked
        row_mask = torch.ones(batch, length, dtype=torch.bool)
        row_mask[1] = False
        row_mask[0, -1] = False
    elif mask == "all":
        row_mask = torch.zeros(batch, length, dtype=torch.bool)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), ids, row_mask


def leaves(*tensors, trainable=(True, True, True)):
    return [None if t is None else t.detach().clone().requires_grad_(want)
            for t, want in zip(tensors, trainable)]


def grads_of(tensors):
    return [None if t is None or t.grad is None else t.grad.detach().clone() for t in tensors]


def materialised(hidden, weight, bias, ids, mask, temperature, entropy):
    """The reference: full logits, then frpo_kernels.token_logprobs(backend="torch")."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logits.dim() == 2:
        logits, ids = logits.unsqueeze(0), ids.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    out = frpo_kernels.token_logprobs(logits, ids, temperature=temperature, return_entropy=entropy,
                                      backend="torch", mask=mask)
    if entropy:
        return out[0].view(hidden.shape[:-1]), out[1].view(hidden.shape[:-1])
    return out.view(hidden.shape[:-1])


def k3(logp, ref):
    return torch.exp(ref - logp) - (ref - logp) - 1


def objective(logp, mask, coef, kl_coef, ref):
    """sum over unmasked tokens of coef * logp + kl_coef * k3(logp, ref)."""
    weight = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    value = coef * logp
    if kl_coef is not None:
        value = value + kl_coef * k3(logp, ref)
    return (weight * value).sum()


def assert_exact(got, want, tol=1e-10):
    assert (got is None) == (want is None)
    if got is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def active_count(mask, n):
    return n if mask is None else int(mask.sum())


def tile_for(case, active):
    """Rows per tile so that the active rows fall in the given boundary class."""
    if case == "n_lt_tile":
        return active + 5
    if case == "n_eq_tile":
        return active
    assert (active - 1) % 2 == 0, active
    return (active - 1) // 2  # active = 2 * tile + 1


TILE_CASES = ["n_lt_tile", "n_eq_tile", "n_2tile_plus_1"]


# -- float64 exactness, torch backend -------------------------------------------------------------
@pytest.mark.parametrize("tile_case", TILE_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_two_pass_float64_matches_autograd(monkeypatch, tile_case, bias, head, entropy):
    hidden, weight, b, ids, mask = make(3, 5, 12, 37, bias=bias, seed=1)  # 15 rows, 9 active (odd)
    temperature = 0.7 if entropy else 1.0
    monkeypatch.setattr(tile_policy, "TILE_ROWS", tile_for(tile_case, active_count(mask, 15)))
    trainable = (True, head == "trainable", True)
    gen = torch.Generator().manual_seed(2)
    dlogp = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    dent = torch.randn(3, 5, generator=gen, dtype=torch.float64)

    results = []
    for impl in ("linear", "materialised"):
        ins = leaves(hidden, weight, b, trainable=trainable)
        if impl == "linear":
            out = linear_token_logprobs(ins[0], ins[1], ids, bias=ins[2], temperature=temperature,
                                        return_entropy=entropy, mask=mask, backend="torch")
        else:
            out = materialised(*ins, ids, mask, temperature, entropy)
        logp, ent = out if entropy else (out, None)
        total = (dlogp * logp).sum() + ((dent * ent).sum() if entropy else 0)
        total.backward()
        results.append((logp.detach(), None if ent is None else ent.detach(), grads_of(ins)))
    (lp, ent, grads), (lp_ref, ent_ref, grads_ref) = results
    assert lp.dtype == torch.float64 and lp.shape == (3, 5)
    assert_exact(lp, lp_ref)
    assert_exact(ent, ent_ref)
    for g, w in zip(grads, grads_ref):
        assert_exact(g, w)
    assert (lp[~mask] == 0).all() and (grads[0][~mask] == 0).all()
    if head == "frozen":
        assert grads[1] is None


@pytest.mark.parametrize("tile_case", TILE_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("kl", [False, True], ids=["nokl", "kl"])
def test_fused_float64_matches_autograd(monkeypatch, tile_case, bias, head, kl):
    hidden, weight, b, ids, mask = make(3, 5, 12, 37, bias=bias, seed=3)
    temperature = 1.3
    monkeypatch.setattr(tile_policy, "TILE_ROWS", tile_for(tile_case, active_count(mask, 15)))
    trainable = (True, head == "trainable", True)
    gen = torch.Generator().manual_seed(4)
    coef = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    kl_coef = torch.rand(3, 5, generator=gen, dtype=torch.float64) if kl else None
    true_logp = materialised(hidden, weight, b, ids, None, temperature, False)
    ref = (true_logp + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)) if kl else None

    ins = leaves(hidden, weight, b, trainable=trainable)
    loss, logp, ent = linear_fused_loss(
        ins[0], ins[1], ins[2], ids, mask, temperature, coef, kl_coef, ref, True, "torch",
        lambda lp: objective(lp, mask, coef, kl_coef, ref))
    (2.5 * loss).backward()  # the upstream gradient scales the precomputed ones
    grads = grads_of(ins)

    ref_ins = leaves(hidden, weight, b, trainable=trainable)
    ref_logp, ref_ent = materialised(*ref_ins, ids, mask, temperature, True)
    ref_loss = objective(ref_logp, mask, coef, kl_coef, ref)
    (2.5 * ref_loss).backward()
    assert_exact(loss.detach(), ref_loss.detach())
    assert_exact(logp, ref_logp.detach())
    assert_exact(ent, ref_ent.detach())
    for g, w in zip(grads, grads_of(ref_ins)):
        assert_exact(g, w)


def test_fused_without_grad_returns_the_value_and_logp():
    hidden, weight, b, ids, mask = make(2, 4, 8, 19, seed=5)
    coef = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        loss, logp, ent = linear_fused_loss(hidden, weight, b, ids, mask, 1.0, coef, None, None, False,
                                            "torch", lambda lp: (coef * lp).sum())
    want = materialised(hidden, weight, b, ids, mask, 1.0, False)
    assert_exact(logp, want)
    assert ent is None and not loss.requires_grad
    assert_exact(loss, (coef * want).sum())


@pytest.mark.parametrize("path", ["two_pass", "fused"])
def test_tied_head_accumulates_embedding_and_head_gradients(path):
    """The head is the input embedding's Parameter: its gradient is the sum of both uses."""
    torch.manual_seed(6)
    vocab, size = 23, 10
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, vocab, (2, 6), generator=gen)
    ids = torch.randint(0, vocab, (2, 6), generator=gen)
    mask = torch.rand(2, 6, generator=gen) > 0.3
    mix = torch.randn(size, size, generator=gen, dtype=torch.float64)
    coef = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    results = []
    for impl in ("linear", "materialised"):
        emb = torch.nn.Embedding(vocab, size, dtype=torch.float64)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(vocab, size, generator=torch.Generator().manual_seed(7),
                                         dtype=torch.float64))
        hidden = torch.tanh(emb(tokens) @ mix)
        if impl == "materialised":
            logp = materialised(hidden, emb.weight, None, ids, mask, 0.9, False)
            loss = objective(logp, mask, coef, None, None)
        elif path == "two_pass":
            logp = linear_token_logprobs(hidden, emb.weight, ids, temperature=0.9, mask=mask, backend="torch")
            loss = objective(logp, mask, coef, None, None)
        else:
            loss, _, _ = linear_fused_loss(hidden, emb.weight, None, ids, mask, 0.9, coef, None, None, False,
                                           "torch", lambda lp: objective(lp, mask, coef, None, None))
        loss.backward()
        results.append(emb.weight.grad.clone())
    assert_exact(results[0], results[1])
    # both uses contribute: rows of tokens fed in and rows of the vocabulary scored
    assert results[0][tokens.unique()].abs().sum() > 0


@pytest.mark.parametrize("path", ["two_pass", "fused"])
def test_all_rows_masked_gives_zeros_and_runs_no_gemm(monkeypatch, path):
    hidden, weight, b, ids, mask = make(2, 3, 6, 11, seed=8, mask="all")
    calls = []
    original = lin._Sweep.logits_tile
    monkeypatch.setattr(lin._Sweep, "logits_tile", lambda self, h: calls.append(h.shape[0]) or original(self, h))
    ins = leaves(hidden, weight, b)
    if path == "two_pass":
        logp, ent = linear_token_logprobs(ins[0], ins[1], ids, bias=ins[2], mask=mask, return_entropy=True,
                                          backend="torch")
        (logp.sum() + ent.sum()).backward()
        assert (ent == 0).all()
    else:
        loss, logp, _ = linear_fused_loss(ins[0], ins[1], ins[2], ids, mask, 1.0, torch.ones(2, 3), None, None,
                                          False, "torch", lambda lp: lp.sum())
        loss.backward()
    assert (logp == 0).all()
    for g in grads_of(ins):
        assert g is not None and (g == 0).all()
    assert calls == []


@pytest.mark.parametrize("path", ["two_pass", "fused"])
def test_masked_rows_are_left_out_of_the_gemms(monkeypatch, path):
    hidden, weight, b, ids, mask = make(3, 5, 6, 11, seed=9)
    monkeypatch.setattr(tile_policy, "TILE_ROWS", 4)
    rows = []
    original = lin._Sweep.logits_tile
    monkeypatch.setattr(lin._Sweep, "logits_tile", lambda self, h: rows.append(h.shape[0]) or original(self, h))
    ins = leaves(hidden, weight, b)
    if path == "two_pass":
        linear_token_logprobs(ins[0], ins[1], ids, bias=ins[2], mask=mask, backend="torch").sum().backward()
        sweeps = 2  # forward, and the backward's recompute
    else:
        linear_fused_loss(ins[0], ins[1], ins[2], ids, mask, 1.0, torch.ones(3, 5), None, None, False, "torch",
                          lambda lp: lp.sum())[0].backward()
        sweeps = 1
    assert sum(rows) == sweeps * int(mask.sum()) and max(rows) == 4


@pytest.mark.parametrize("path", ["two_pass", "fused"])
def test_frozen_head_skips_the_weight_gradient_gemm(monkeypatch, path):
    hidden, weight, b, ids, mask = make(2, 4, 6, 13, seed=10, bias=False)
    products = []
    monkeypatch.setattr(lin, "_accumulate_product", lambda acc, a, c: products.append(acc.shape))
    h, w = leaves(hidden, weight, trainable=(True, False))
    if path == "two_pass":
        linear_token_logprobs(h, w, ids, mask=mask, backend="torch").sum().backward()
    else:
        linear_fused_loss(h, w, None, ids, mask, 1.0, torch.ones(2, 4), None, None, False, "torch",
                          lambda lp: lp.sum())[0].backward()
    assert products == [] and w.grad is None and h.grad is not None


def test_flat_inputs_and_integer_mask():
    hidden, weight, b, ids, mask = make(2, 4, 6, 13, seed=11)
    flat = linear_token_logprobs(hidden.reshape(8, 6), weight, ids.reshape(8).to(torch.int32), bias=b,
                                 mask=mask.reshape(8).to(torch.int64), backend="torch")
    assert flat.shape == (8,)
    assert_exact(flat, materialised(hidden, weight, b, ids, mask, 1.0, False).reshape(8))


# -- argument checks --------------------------------------------------------------------------------
def _bad_calls():
    hidden, weight, b, ids, mask = make(2, 3, 4, 9, dtype=torch.float32)
    ok = dict(hidden=hidden, weight=weight, ids=ids, bias=b, mask=mask)
    meta = torch.empty(9, 4, device="meta")
    return [
        ("hidden", dict(ok, hidden=hidden.double()), TypeError, "weight is torch.float32 but hidden"),
        ("hidden", dict(ok, hidden=hidden[0, 0]), ValueError, "hidden must have shape"),
        ("hidden", dict(ok, hidden=hidden.long()), TypeError, "hidden must be a floating-point"),
        ("weight", dict(ok, weight=weight[:, :3]), ValueError, "weight has H = 3"),
        ("weight", dict(ok, weight=weight[0]), ValueError, "weight must have shape [V, H]"),
        ("weight", dict(ok, weight=meta), ValueError, "weight is on meta"),
        ("bias", dict(ok, bias=b[:5]), ValueError, "bias must have shape [V] = (9,)"),
        ("bias", dict(ok, bias=b.double()), TypeError, "bias is torch.float64"),
        ("ids", dict(ok, ids=ids[:, :2]), ValueError, "ids must have shape (2, 3)"),
        ("ids", dict(ok, ids=ids.float()), TypeError, "ids must be an integer tensor"),
        ("ids", dict(ok, ids=ids + 9, mask=None), ValueError, "ids has entries outside [0, 9)"),
        ("mask", dict(ok, mask=mask[:1]), ValueError, "mask must have shape (2, 3)"),
        ("temperature", dict(ok, temperature=0.0), ValueError, "temperature must be"),
        ("backend", dict(ok, backend="gpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("name,kwargs,error,message", _bad_calls(), ids=[c[0] + str(i) for i, c in enumerate(_bad_calls())])
def test_bad_arguments_are_named(name, kwargs, error, message):
    args = dict(kwargs)
    with pytest.raises(error, match=None) as info:
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("ids"), **args)
    assert message in str(info.value), str(info.value)


def test_ids_out_of_range_under_a_mask_are_ignored():
    hidden, weight, b, ids, mask = make(2, 3, 4, 9)
    ids = ids.masked_fill(~mask, 99)  # masked rows may hold any id (e.g. padding)
    got = linear_token_logprobs(hidden, weight, ids, bias=b, mask=mask, backend="torch")
    assert (got[~mask] == 0).all() and torch.isfinite(got).all()


# -- kernels in fp32 / bf16 against the float64 truth -----------------------------------------------
# fp32: fp32 GEMMs over H and fp32 kernels: |error| <= 2e-4 (absolute + relative) in logp/entropy,
#   gradients within 2e-4 of the truth relative to their largest entry.
# bf16: inputs rounded to bf16 first (the truth uses the same rounded values). With the default
#   fp32 GEMMs on CPU, outputs are fp32-accurate and the bf16 gradients one rounding away (1e-2
#   relative). With bf16 tiles (the CUDA layout), the logits themselves are rounded to bf16
#   (|z| ~ 4: 2^-8 * 4 = 0.016 absolute), so logp within 0.05 and gradients within 3e-2 of their
#   largest entry (RMS-relative error).
FP32_TOL = 2e-4
BF16_TOL = dict(fp32_gemms=(2e-3, 1e-2), bf16_tiles=(5e-2, 3e-2))


def _rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def compare_kernels_to_truth(backend, dtype, bf16_mode, tile_case, shapes=(2, 7, 24, 301), monkeypatch=None):
    batch, length, size, vocab = shapes
    hidden, weight, b, ids, mask = make(batch, length, size, vocab, dtype=dtype, seed=12)
    active = active_count(mask, batch * length)
    if active % 2 == 0:
        mask[0, 0] = False
        active -= 1
    monkeypatch.setattr(tile_policy, "TILE_ROWS", tile_for(tile_case, active))
    monkeypatch.setattr(lin, "CPU_LOW_PRECISION_GEMMS_IN_FP32", bf16_mode != "bf16_tiles")
    temperature = 0.8
    gen = torch.Generator().manual_seed(13)
    dlogp = torch.randn(batch, length, generator=gen)
    dent = torch.randn(batch, length, generator=gen)
    coef = torch.randn(batch, length, generator=gen)
    kl_coef = torch.rand(batch, length, generator=gen)
    true_logp = materialised(hidden.double(), weight.double(), b.double(), ids, None, temperature, False)
    ref = (true_logp + 0.2 * torch.randn(batch, length, generator=gen, dtype=torch.float64)).float()
    val_tol, grad_tol = (FP32_TOL, FP32_TOL) if dtype == torch.float32 else BF16_TOL[bf16_mode]

    def check(got, want):
        assert got.dtype == torch.float32 and not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want.detach(), rtol=val_tol, atol=val_tol)

    def check_grads(got_ins, want_ins):
        for g, w, t in zip(grads_of(got_ins), grads_of(want_ins), got_ins):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert _rel_err(g, w) <= grad_tol, _rel_err(g, w)

    # two passes with entropy
    ins = leaves(hidden, weight, b)
    logp, ent = linear_token_logprobs(ins[0], ins[1], ids, bias=ins[2], temperature=temperature,
                                      return_entropy=True, mask=mask, backend=backend)
    ((dlogp * logp).sum() + (dent * ent).sum()).backward()
    truth = leaves(hidden.double(), weight.double(), b.double())
    t_logp, t_ent = materialised(*truth, ids, mask, temperature, True)
    ((dlogp.double() * t_logp).sum() + (dent.double() * t_ent).sum()).backward()
    check(logp, t_logp)
    check(ent, t_ent)
    check_grads(ins, truth)
    assert (logp[~mask] == 0).all() and (ins[0].grad[~mask] == 0).all()

    # fused with the k3-KL term
    ins = leaves(hidden, weight, b)
    loss, logp, ent = linear_fused_loss(ins[0], ins[1], ins[2], ids, mask, temperature, coef, kl_coef, ref,
                                        True, backend, lambda lp: objective(lp, mask, coef, kl_coef, ref))
    loss.backward()
    truth = leaves(hidden.double(), weight.double(), b.double())
    t_logp, t_ent = materialised(*truth, ids, mask, temperature, True)
    objective(t_logp, mask, coef.double(), kl_coef.double(), ref.double()).backward()
    check(logp, t_logp)
    check(ent, t_ent)
    check_grads(ins, truth)


BF16_MODES = [pytest.param(torch.float32, "fp32_gemms", id="fp32"),
              pytest.param(torch.bfloat16, "fp32_gemms", id="bf16-fp32_gemms"),
              pytest.param(torch.bfloat16, "bf16_tiles", id="bf16-bf16_tiles")]


@pytest.mark.parametrize("tile_case", TILE_CASES)
@pytest.mark.parametrize("dtype,bf16_mode", BF16_MODES)
def test_cpu_kernels_match_float64_truth(monkeypatch, dtype, bf16_mode, tile_case):
    compare_kernels_to_truth("cpu", dtype, bf16_mode, tile_case, monkeypatch=monkeypatch)


@pytest.mark.parametrize("vocab", [37, 1001, 4099])  # not multiples of 8 or 16; 4099: several AVX2 chunks
def test_cpu_kernels_odd_vocab(monkeypatch, vocab):
    compare_kernels_to_truth("cpu", torch.float32, "fp32_gemms", "n_2tile_plus_1", shapes=(2, 5, 16, vocab),
                             monkeypatch=monkeypatch)


triton_interpreted_only = pytest.mark.skipif(
    not INTERPRETER_RUN, reason="runs in test_triton_interpreter_subprocess (TRITON_INTERPRET=1)")


@triton_interpreted_only
@pytest.mark.parametrize("dtype,bf16_mode", BF16_MODES)
def test_triton_interp_matches_float64_truth(monkeypatch, dtype, bf16_mode):
    from frpo_kernels.backends.triton import launch
    assert launch.triton_interpreted()
    compare_kernels_to_truth("triton", dtype, bf16_mode, "n_2tile_plus_1", shapes=(3, 3, 8, 45),
                             monkeypatch=monkeypatch)


def test_triton_interpreter_subprocess():
    pytest.importorskip("triton")
    if INTERPRETER_RUN:
        pytest.skip("this process is the interpreter run")
    proc = rerun_under_interpreter(__file__, "triton_interp", timeout=600, FRPO_LINEAR_TRITON_SUBPROCESS="1")
    assert re.search(r"\b3 passed", proc.stdout), proc.stdout[-2000:]


# -- memory ----------------------------------------------------------------------------------------
PEAK_SCRIPT = textwrap.dedent(r"""
    import ctypes, resource, torch
    from frpo_kernels.ops.linear_logprobs import linear_fused_loss, linear_token_logprobs

    def vm_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    n, size, vocab = 4096, 64, 32768
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, size, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, size, generator=gen) / 8).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    coef = torch.randn(n, generator=gen)

    def run(path):
        if path == "fused":
            loss = linear_fused_loss(hidden, weight, None, ids, None, 1.0, coef, None, None, False, "cpu",
                                     lambda lp: (coef * lp).sum())[0]
        else:
            loss = (coef * linear_token_logprobs(hidden, weight, ids, backend="cpu")).sum()
        loss.backward()

    # warm-up on a few rows: loads the extension, starts the thread pools
    linear_token_logprobs(hidden[:8].detach(), weight.detach(), ids[:8], backend="cpu")
    for path in ("two_pass", "fused"):
        hidden.grad = weight.grad = None
        try:  # freed heap pages of the last run go back to the OS (glibc)
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):
            pass
        try:  # reset the high-water mark to the current RSS (Linux)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:  # ru_maxrss cannot be reset: only a process's first measurement is exact
            reset = False
        before_rss, before_max = vm_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(path)
        after_hwm, after_max = vm_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        growth = (after_hwm - before_rss) if reset else (after_max - before_max)
        ok = float(hidden.grad.abs().sum()) > 0 and float(weight.grad.abs().sum()) > 0
        print(path, growth * 1024, ok)
""")


def test_peak_memory_far_below_the_logits():
    """fwd+bwd at N=4096, H=64, V=32768 fp32 (two-pass, then fused): the logits would be N*V*4 =
    512 MiB; each call's peak RSS growth (workspace + gradients + O(N)) must stay under 25% of
    that (128 MiB). Workspace: 128 rows x V x 4 = 16 MiB (tile_rows: W = 8 MiB fits in the L3),
    grad_weight 8 MiB, grad_hidden 1 MiB."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status (Linux)")
    # a fixed mmap threshold: every large buffer is mapped on allocation and unmapped when freed, so
    # the second call's growth is not hidden by pages glibc kept from the first
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logits_bytes = 4096 * 32768 * 4
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["two_pass", "fused"], proc.stdout
    for path, growth, nonzero in lines:
        assert nonzero == "True"
        assert 0 < int(growth) < 0.25 * logits_bytes, f"{path}: peak growth {int(growth) / 2**20:.1f} MiB"
        print(f"{path}: peak RSS growth {int(growth) / 2**20:.1f} MiB vs logits {logits_bytes / 2**20:.0f} MiB")


@pytest.mark.parametrize("llc_mib,rows", [(32, 128), (480, 256)])
def test_cpu_tile_rows_when_the_head_stays_cached(monkeypatch, llc_mib, rows):
    """W (V=32768 x H=64 fp32, 8 MiB) fits in half the LLC: the workspace takes the other half, at most
    32 MiB (a VM's sysfs may report the whole socket's L3): 16 MiB / 128 KiB per row, 32 MiB / 128 KiB."""
    monkeypatch.setitem(tile_policy._CACHE, "llc", llc_mib * 2**20)
    monkeypatch.setattr(tile_policy, "TILE_ROWS", None)
    assert tile_policy.tile_rows(32768, 64, torch.float32, torch.device("cpu")) == rows
