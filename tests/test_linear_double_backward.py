"""No silent wrong answers, round 2, row 2: Hessian-vector products through linear_loss and
linear_token_logprobs. backend="torch" gives the second derivative of the plain formula
(logits = hidden @ weight.T + bias through loss() / token_logprobs() on the torch backend, whose own
double backward test_no_silent_wrong_answers.py checks against the spec by finite differences); the
cpu and triton kernels raise a RuntimeError naming backend="torch", on every entry point, never a
zero or missing second derivative.

The triton cases run in a subprocess with TRITON_INTERPRET=1, started by
test_triton_cases_under_interpreter; here they skip with that reason.
"""
import pytest
import torch

import frpo_kernels
from helpers import INTERPRETED, rerun_under_interpreter, use_backend

B, T, H, V = 4, 3, 5, 9
KERNEL_BACKENDS = ["cpu", "triton"]
REFUSAL = "double backward.*backend=.torch."


def test_triton_cases_under_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = rerun_under_interpreter(__file__, "triton and not under_interpreter", timeout=600)
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def head_batch(dtype=torch.float64, seed=0):
    """hidden [4, 3, 5], weight [9, 5], bias [9], ids, a mask with row 1 masked from t=1 and a zero
    weight at [3, 2], rewards for groups of 2, and old log-probs 0.3 from the current ones."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 1:] = 0
    mask[3, 2] = 0
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), ids, mask, old, rewards


def directions(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,))]


def hvp(fn, leaves, vectors):
    """(gradient, Hessian-vector product) of the scalar fn(*leaves) w.r.t. all leaves, by double backward."""
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    grads = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    assert all(g.requires_grad for g in grads), "the gradient does not depend on the inputs"
    product = sum((g * v).sum() for g, v in zip(grads, vectors))
    second = torch.autograd.grad(product, leaves, allow_unused=True)
    return [g.detach() for g in grads], [torch.zeros_like(x) if s is None else s for x, s in zip(leaves, second)]


def assert_same(got, want, tol=1e-10):
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert w.abs().max() > 1e-3, "a vanishing reference proves nothing"
        assert torch.allclose(g, w, rtol=tol, atol=tol), f"max abs diff {(g - w).abs().max().item():.3e}"


def token_objective(logp, entropy):
    """A nonlinear function of logp and entropy, so the Hessian has cross terms between tokens."""
    weights = torch.linspace(-1.0, 1.5, logp.numel(), dtype=logp.dtype).view(logp.shape)
    return (weights * logp).sum() + 0.5 * logp.sum() ** 2 + 0.7 * (entropy * weights.flip(0)).sum()


# linear_token_logprobs: exact Hessian-vector products on the torch backend
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_linear_token_logprobs_hvp_matches_plain_formula(temperature, masked):
    use_backend("torch")
    hidden, weight, bias, ids, mask, _, _ = head_batch()
    mask = mask if masked else None

    def through_head(h, w, b):
        return token_objective(*frpo_kernels.linear_token_logprobs(
            h, w, ids, bias=b, temperature=temperature, return_entropy=True, mask=mask, backend="torch"))

    def through_logits(h, w, b):
        return token_objective(*frpo_kernels.token_logprobs(
            h @ w.T + b, ids, temperature=temperature, return_entropy=True, mask=mask, backend="torch"))

    vectors = directions()
    got_grad, got = hvp(through_head, (hidden, weight, bias), vectors)
    want_grad, want = hvp(through_logits, (hidden, weight, bias), vectors)
    assert_same(got_grad, want_grad)
    assert_same(got, want)


def test_linear_token_logprobs_hvp_matches_finite_differences():
    """Independently of token_logprobs: the central difference of the (first-order) gradient."""
    use_backend("torch")
    hidden, weight, bias, ids, mask, _, _ = head_batch()
    vectors = directions()

    def gradient(h, w, b):
        leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
        logp, entropy = frpo_kernels.linear_token_logprobs(*leaves[:2], ids, bias=leaves[2], return_entropy=True,
                                                           mask=mask, backend="torch")
        return torch.autograd.grad(token_objective(logp, entropy), leaves)

    eps = 1e-5
    plus = gradient(*(x + eps * v for x, v in zip((hidden, weight, bias), vectors)))
    minus = gradient(*(x - eps * v for x, v in zip((hidden, weight, bias), vectors)))
    fd = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    _, got = hvp(lambda h, w, b: token_objective(*frpo_kernels.linear_token_logprobs(
        h, w, ids, bias=b, return_entropy=True, mask=mask, backend="torch")), (hidden, weight, bias), vectors)
    assert_same(got, fd, tol=1e-6)


# linear_loss: exact Hessian-vector products on the torch backend
@pytest.mark.parametrize("loss_type", ["frpo", "grpo"])
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old_logps"])
def test_linear_loss_hvp_matches_plain_formula(loss_type, with_old):
    use_backend("torch")
    hidden, weight, bias, ids, mask, old, rewards = head_batch()
    kwargs = dict(rewards=rewards, group_size=2, loss_type=loss_type, old_logps=old if with_old else None,
                  temperature=0.8, backend="torch")
    vectors = directions()
    got_grad, got = hvp(lambda h, w, b: frpo_kernels.linear_loss(h, w, ids, mask, bias=b, **kwargs),
                        (hidden, weight, bias), vectors)
    want_grad, want = hvp(lambda h, w, b: frpo_kernels.loss(h @ w.T + b, ids, mask, **kwargs),
                          (hidden, weight, bias), vectors)
    assert_same(got_grad, want_grad)
    assert_same(got, want)


def test_linear_loss_hvp_with_frozen_head():
    """Only hidden requires grad (a frozen LM head, as under LoRA): the product w.r.t. hidden alone."""
    use_backend("torch")
    hidden, weight, bias, ids, mask, old, rewards = head_batch()
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, backend="torch")
    vector = directions()[0]
    got = hvp(lambda h: frpo_kernels.linear_loss(h, weight, ids, mask, bias=bias, **kwargs), (hidden,), (vector,))
    want = hvp(lambda h: frpo_kernels.loss(h @ weight.T + bias, ids, mask, **kwargs), (hidden,), (vector,))
    assert_same(got[1], want[1])


def test_auto_backend_for_float64_is_exact_too():
    use_backend("torch")
    hidden, weight, bias, ids, mask, old, rewards = head_batch()
    vectors = directions()
    got = hvp(lambda h, w, b: frpo_kernels.linear_loss(h, w, ids, mask, bias=b, rewards=rewards, group_size=2,
                                                         old_logps=old), (hidden, weight, bias), vectors)
    want = hvp(lambda h, w, b: frpo_kernels.loss(h @ w.T + b, ids, mask, rewards=rewards, group_size=2,
                                                   old_logps=old, backend="torch"), (hidden, weight, bias), vectors)
    assert_same(got[1], want[1])


# The kernel backends: a RuntimeError naming backend="torch", on every entry point
def kernel_entry_points(hidden, weight, bias, ids, mask, old, rewards, backend):
    kw = dict(rewards=rewards.float(), group_size=2, backend=backend)
    return {
        "linear_loss on_policy": lambda h, w, b: frpo_kernels.linear_loss(h, w, ids, mask, bias=b, **kw),
        "linear_loss old_logps": lambda h, w, b: frpo_kernels.linear_loss(h, w, ids, mask, bias=b,
                                                                         old_logps=old.float(), **kw),
        "linear_token_logprobs": lambda h, w, b: token_objective(*frpo_kernels.linear_token_logprobs(
            h, w, ids, bias=b, return_entropy=True, mask=mask, backend=backend)),
        "loss on_policy": lambda h, w, b: frpo_kernels.loss(h @ w.T + b, ids, mask, **kw),
        "loss old_logps": lambda h, w, b: frpo_kernels.loss(h @ w.T + b, ids, mask, old_logps=old.float(), **kw),
        "token_logprobs": lambda h, w, b: token_objective(*frpo_kernels.token_logprobs(
            h @ w.T + b, ids, return_entropy=True, mask=mask, backend=backend)),
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["linear_loss on_policy", "linear_loss old_logps", "linear_token_logprobs",
                                   "loss on_policy", "loss old_logps", "token_logprobs"])
@pytest.mark.parametrize("wrt", ["all", "hidden"])
def test_kernel_backends_refuse_double_backward(backend, entry, wrt):
    backend = use_backend(backend)
    hidden, weight, bias, ids, mask, old, rewards = head_batch(torch.float32)
    fn = kernel_entry_points(hidden, weight, bias, ids, mask, old, rewards, backend)[entry]
    h = hidden.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(wrt == "all"), bias.clone().requires_grad_(wrt == "all")
    with pytest.raises(RuntimeError, match=REFUSAL):
        torch.autograd.grad(fn(h, w, b), [h, w, b] if wrt == "all" else [h], create_graph=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["linear_loss on_policy", "linear_loss old_logps", "linear_token_logprobs"])
def test_kernel_backends_first_order_gradient_unchanged(backend, entry):
    """The refusal is for create_graph=True only: a plain backward still matches float64 torch."""
    backend = use_backend(backend)
    hidden, weight, bias, ids, mask, old, rewards = head_batch(torch.float32)
    got = kernel_entry_points(hidden, weight, bias, ids, mask, old, rewards, backend)[entry]
    want = kernel_entry_points(hidden.double(), weight.double(), bias.double(), ids, mask, old, rewards.double(),
                               "torch")[entry]
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    exact = [x.double().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    got_grads = torch.autograd.grad(got(*leaves), leaves)
    want_grads = torch.autograd.grad(want(*exact), exact)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-5 * w.abs().max())
