"""linear_loss(hidden, weight, ...) equals loss(hidden @ weight.T + bias, ...): value and gradients
w.r.t. hidden, weight and bias, in float64 on the torch backend to 1e-10 over every option that changes
the path (loss type, old/no old, beta, temperature, bias, frozen / trainable / tied head, masks with
all-masked rows), and on the kernel backends (cpu; triton under the interpreter, in a subprocess) in
fp32 and bf16 against the float64 truth.

Tolerances: fp32 kernels 2e-5 relative to the largest gradient entry (GEMMs and exps in fp32);
bf16 inputs 2e-2 (8 mantissa bits on hidden and weight).
"""
import itertools

import pytest
import torch

import frpo_kernels
from helpers import INTERPRETED, rerun_under_interpreter, use_backend

B, T, H, V = 6, 4, 8, 37


def batch(seed=0, dtype=torch.float64, masked_rows=(2,)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.2).double()
    mask[:, 0] = 1
    mask[list(masked_rows)] = 0  # rows with no completion token
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 3, (B,), generator=gen).double()
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), ids, mask, old, ref, rewards


def run(fn, hidden, weight, bias, trainable, tied, **kwargs):
    """Value and gradients (hidden, weight, bias) of fn(hidden_leaf, weight_leaf, bias_leaf).

    tied: the weight is also an input embedding whose lookup is added to hidden, so its gradient
    accumulates from both uses."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(trainable or tied)
    b = None if bias is None else bias.detach().clone().requires_grad_(trainable)
    x = h + torch.nn.functional.embedding(torch.arange(h.shape[1]) % w.shape[0], w) if tied else h
    value = fn(x, w, b, **kwargs)
    value.backward()
    grads = [h.grad, w.grad if (trainable or tied) else None, None if b is None or not trainable else b.grad]
    return value.detach(), grads


def via_logits(x, w, b, *, ids, mask, **kwargs):
    logits = x @ w.T + (0 if b is None else b)
    return frpo_kernels.loss(logits, ids, mask, **dict(kwargs, backend="torch"))


def via_hidden(x, w, b, *, ids, mask, **kwargs):
    return frpo_kernels.linear_loss(x, w, ids, mask, bias=b, **kwargs)


def assert_matches(got, want, rtol, atol_scale):
    (gv, gg), (wv, wg) = got, want
    assert torch.isfinite(gv)
    assert torch.allclose(gv.double(), wv.double(), rtol=rtol, atol=atol_scale), (gv, wv)
    for g, w in zip(gg, wg):
        assert (g is None) == (w is None)
        if g is not None:
            scale = w.abs().max().item() * atol_scale + 1e-300
            assert torch.allclose(g.double(), w.double(), rtol=rtol, atol=scale), \
                f"max abs diff {(g.double() - w.double()).abs().max():.3e}"


CASES = list(itertools.product(["frpo", "grpo", "dr_grpo"], [False, True], [0.0, 0.1], [1.0, 0.7],
                               [True, False], ["trainable", "frozen", "tied"]))


@pytest.mark.parametrize("loss_type,with_old,beta,temperature,with_bias,head", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_float64_matches_loss_on_materialised_logits(loss_type, with_old, beta, temperature, with_bias, head):
    if INTERPRETED:
        pytest.skip("float64 torch-backend cases run in the main process")
    hidden, weight, bias, ids, mask, old, ref, rewards = batch(seed=len(loss_type) + int(with_old))
    bias = bias if with_bias else None
    kwargs = dict(ids=ids, mask=mask, rewards=rewards, group_size=3, loss_type=loss_type, beta=beta,
                  ref_logps=ref, old_logps=old if with_old else None, temperature=temperature, lam=0.7)
    trainable, tied = head == "trainable", head == "tied"
    want = run(via_logits, hidden, weight, bias, trainable, tied, **kwargs)
    got = run(via_hidden, hidden, weight, bias, trainable, tied, backend="torch", **kwargs)
    assert_matches(got, want, 1e-10, 1e-10)


def test_everything_masked_gives_zero_and_zero_gradients():
    if INTERPRETED:
        pytest.skip("runs in the main process")
    hidden, weight, bias, ids, mask, _, _, rewards = batch(masked_rows=range(B))
    value, grads = run(via_hidden, hidden, weight, bias, True, False, ids=ids, mask=mask, rewards=rewards,
                       group_size=3, backend="torch")
    assert value == 0 and all(not g.any() for g in grads)


def test_triton_cases_under_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = rerun_under_interpreter(__file__, "kernel_backends and triton", timeout=900)
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_kernel_backends_match_float64(backend, dtype, rtol, with_old, head):
    backend = use_backend(backend)
    hidden, weight, bias, ids, mask, old, ref, rewards = batch(seed=3)
    kwargs = dict(ids=ids, mask=mask, rewards=rewards, group_size=3, beta=0.1, ref_logps=ref,
                  old_logps=old if with_old else None, lam=0.5)
    trainable = head == "trainable"
    # the truth: float64 on the inputs as the kernels see them (rounded to dtype)
    rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
    want = run(via_logits, *rounded, trainable, False, **kwargs)
    got = run(via_hidden, hidden.to(dtype), weight.to(dtype), bias.to(dtype), trainable, False,
              backend=backend, **dict(kwargs, ref_logps=ref.float(), old_logps=old.float() if with_old else None))
    assert_matches(got, want, rtol, rtol)
