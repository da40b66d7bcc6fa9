"""The Triton kernels run by Triton's interpreter on CPU tensors, against frpo_kernels/backends/torch_reference.py:
values and gradients for fp32/bf16, masks, -inf, odd V, strides, temperature, entropy, in-place;
and frpo_kernels.loss(backend="triton") against backend="torch" on the fused and two-phase paths.

Triton reads TRITON_INTERPRET when it is imported (its own tl.* helpers are @jit functions), so
unless pytest itself was started with TRITON_INTERPRET=1, test_interpreter_suite reruns this file
in a subprocess with it set and the other tests skip here.
"""

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("hypothesis")

import frpo_kernels  # noqa: E402
from frpo_kernels.backends import torch_reference  # noqa: E402
from frpo_kernels.backends.triton import launch  # noqa: E402
from helpers import make_batch, rerun_under_interpreter  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

INTERPRETED = launch.triton_interpreted()
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in test_interpreter_suite's subprocess (TRITON_INTERPRET=1)")


def test_interpreter_suite():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    proc = rerun_under_interpreter(__file__)
    print(proc.stdout.strip().splitlines()[-1])


def make_inputs(batch, length, vocab, dtype, seed=0, strided=False, neg_inf=True, mask=True):
    gen = torch.Generator().manual_seed(seed)
    if strided:
        # [T, B, V + 3] storage seen as [B, T, V]: padded rows, batch stride smaller than time's.
        base = torch.randn(length, batch, vocab + 3, generator=gen) * 3
        logits = base.transpose(0, 1)[..., :vocab]
    else:
        logits = torch.randn(batch, length, vocab, generator=gen) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    if neg_inf and vocab > 1:
        # -inf logits (e.g. a sampling mask) in every row except at the target.
        drop = torch.rand(batch, length, vocab, generator=gen) < 0.3
        drop.scatter_(-1, ids.unsqueeze(-1), False)
        logits.masked_fill_(drop, float("-inf"))
    logits = logits.to(dtype)
    row_mask = None
    if mask:
        row_mask = torch.rand(batch, length, generator=gen) > 0.3
        row_mask[0, 0] = True
    return logits, ids, row_mask


def assert_close(actual, expected, dtype=torch.float32):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not torch.isnan(actual).any()
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-5, atol=2e-5)
    else:  # bf16/fp16 gradients: both round an fp32 value; at most one ulp apart
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-5)


CASES = [  # (vocab, config it selects): odd V, several tiles with a ragged tail
    pytest.param(37, id="V37-rows8"),
    pytest.param(300, id="V300-rows4"),
    pytest.param(2500, id="V2500-row_v2048"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@interpreted_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", CASES)
def test_forward(vocab, dtype):
    logits, ids, mask = make_inputs(2, 5, vocab, dtype, seed=vocab, strided=vocab != 300)
    got = launch.forward(logits, ids, mask, 0.7, True)
    want = torch_reference.forward(logits, ids, mask, 0.7, True)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert (got[0][~mask] == 0).all() and (got[2][~mask] == 0).all()
    logp, lse, entropy = launch.forward(logits, ids, None, 1.0, False)
    assert entropy is None
    assert_close(logp, torch_reference.forward(logits, ids, None, 1.0, False)[0])


@interpreted_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", CASES)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["plain", "entropy"])
def test_backward(vocab, dtype, with_entropy):
    logits, ids, mask = make_inputs(2, 4, vocab, dtype, seed=vocab + 1, strided=vocab == 37)
    temperature = 1.3
    _, lse, entropy = torch_reference.forward(logits, ids, mask, temperature, True)
    gen = torch.Generator().manual_seed(5)
    dlogp = torch.randn(2, 4, generator=gen)
    dentropy = torch.randn(2, 4, generator=gen) if with_entropy else None
    entropy = entropy if with_entropy else None
    want = torch_reference.backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature)
    got = launch.backward(logits, ids, mask, lse, dlogp, entropy, dentropy, temperature)
    assert got.is_contiguous()
    assert_close(got, want, dtype)
    assert (got[~mask] == 0).all()


@interpreted_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", CASES)
@pytest.mark.parametrize("with_kl", [False, True], ids=["no_kl", "kl"])
def test_fused(vocab, dtype, with_kl):
    logits, ids, mask = make_inputs(3, 3, vocab, dtype, seed=vocab + 2, strided=vocab == 2500)
    gen = torch.Generator().manual_seed(6)
    coef = torch.randn(3, 3, generator=gen)
    logp_true = torch_reference.forward(logits, ids, None, 0.8, False)[0]
    kl_coef = torch.rand(3, 3, generator=gen) if with_kl else None
    ref = logp_true + 0.3 * torch.randn(3, 3, generator=gen) if with_kl else None
    want = torch_reference.fused(logits, ids, mask, 0.8, coef, kl_coef, ref, True)
    got = launch.fused(logits, ids, mask, 0.8, coef, kl_coef, ref, True)
    for g, w in zip(got[:3], want[:3]):
        assert_close(g, w)
    assert_close(got[3], want[3], dtype)
    assert (got[3][~mask] == 0).all()


@interpreted_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_writes_into_the_logits_storage(dtype):
    logits, ids, mask = make_inputs(2, 3, 300, dtype, seed=9, strided=True)
    _, lse, entropy = torch_reference.forward(logits, ids, mask, 1.0, True)
    dlogp, dentropy = torch.randn(2, 3), torch.randn(2, 3)
    want = torch_reference.backward(logits, ids, mask, lse, dlogp, entropy, dentropy, 1.0)
    # A non-contiguous [B, T, V] (time-major storage): the gradient keeps the logits' strides.
    work = torch.empty_like(logits.transpose(0, 1)).transpose(0, 1).copy_(logits)
    got = launch.backward(work, ids, mask, lse, dlogp, entropy, dentropy, 1.0, inplace=True)
    assert got.data_ptr() == work.data_ptr() and got.stride() == work.stride()
    assert_close(got, want, dtype)

    coef = torch.randn(2, 3)
    want_fused = torch_reference.fused(logits, ids, mask, 1.0, coef, None, None, False)
    work = logits.clone()
    got_fused = launch.fused(work, ids, mask, 1.0, coef, None, None, False, inplace=True)
    assert got_fused[3].data_ptr() == work.data_ptr()
    assert_close(got_fused[0], want_fused[0])
    assert_close(got_fused[3], want_fused[3], dtype)


@interpreted_only
def test_large_vocab_many_tiles_bf16():
    # V >= 256k: 33 tiles of 8192 with a ragged tail; rows stay exact in fp32 accumulation.
    vocab = 262_147
    logits, ids, mask = make_inputs(1, 2, vocab, torch.bfloat16, seed=1, neg_inf=False, mask=False)
    logits[0, 1, -1] = 40.0  # the max sits in the tail tile
    got = launch.forward(logits, ids, None, 1.0, True)
    want = torch_reference.forward(logits, ids, None, 1.0, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=5e-5)
    coef = torch.tensor([[0.5, -1.0]])
    got_grad = launch.fused(logits, ids, None, 1.0, coef, None, None, False)[3]
    assert_close(got_grad, torch_reference.fused(logits, ids, None, 1.0, coef, None, None, False)[3],
                 torch.bfloat16)


@interpreted_only
def test_all_masked_and_all_but_target_neg_inf():
    logits, ids, _ = make_inputs(2, 2, 50, torch.float32, seed=4, neg_inf=False, mask=False)
    logits[0, 1] = float("-inf")
    logits[0, 1, ids[0, 1]] = 2.0  # softmax is one-hot: logp = 0, entropy = 0, grad = 0
    mask = torch.tensor([[True, True], [False, False]])
    logp, lse, entropy = launch.forward(logits, ids, mask, 1.0, True)
    assert logp[0, 1] == 0 and entropy[0, 1] == 0 and lse[0, 1].tolist() == [2.0, 0.0]
    assert (logp[1] == 0).all() and (lse[1] == 0).all() and (entropy[1] == 0).all()
    grad = launch.backward(logits, ids, mask, lse, torch.ones(2, 2), entropy, torch.ones(2, 2), 1.0)
    assert not torch.isnan(grad).any() and (grad[1] == 0).all() and (grad[0, 1] == 0).all()


@interpreted_only
@settings(max_examples=6, deadline=None, database=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 3), vocab=st.integers(1, 1100),
       temperature=st.floats(0.25, 4.0), bf16=st.booleans(), seed=st.integers(0, 99))
def test_forward_backward_random_shapes(batch, length, vocab, temperature, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    logits, ids, mask = make_inputs(batch, length, vocab, dtype, seed=seed, strided=seed % 2 == 0)
    got = launch.forward(logits, ids, mask, temperature, True)
    want = torch_reference.forward(logits, ids, mask, temperature, True)
    for g, w in zip(got, want):
        assert_close(g, w)
    dlogp = torch.randn(batch, length)
    got_grad = launch.backward(logits, ids, mask, want[1], dlogp, want[2], dlogp.flip(0), temperature)
    want_grad = torch_reference.backward(logits, ids, mask, want[1], dlogp, want[2], dlogp.flip(0),
                                         temperature)
    assert_close(got_grad, want_grad, dtype)


def _loss_and_grad(data, backend, **kwargs):
    logits = data["logits"].detach().clone().requires_grad_(True)
    value = frpo_kernels.loss(logits, data["ids"], data["mask"], rewards=data["rewards"],
                              group_size=data["group_size"], backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


@interpreted_only
@pytest.mark.parametrize("loss_type", ["frpo", "grpo"])
@pytest.mark.parametrize("two_phase", [False, True], ids=["fused", "two_phase"])
def test_loss_triton_matches_torch(loss_type, two_phase):
    data = make_batch(batch=6, length=4, vocab=40, dtype=torch.float32, seed=11)
    kwargs = dict(loss_type=loss_type, beta=0.05, ref_logps=data["ref"], temperature=0.9,
                  old_logps=data["old"] if two_phase else None)
    got_value, got_grad = _loss_and_grad(data, "triton", **kwargs)
    want_value, want_grad = _loss_and_grad(data, "torch", **kwargs)
    torch.testing.assert_close(got_value, want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_without_gpu_or_interpreter_triton_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    data = make_batch(batch=3, length=2, vocab=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        frpo_kernels.loss(data["logits"], data["ids"], data["mask"], rewards=data["rewards"],
                          group_size=3, backend="triton")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        launch.forward(data["logits"], data["ids"], None, 1.0, False)
