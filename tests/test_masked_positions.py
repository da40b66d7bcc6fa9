"""No silent wrong answers, round 2, rows 6 and 8: what sits at masked positions (mask 0) is never read.

6. NaN logits (or NaN hidden states) at masked positions: the value is that of finite logits there,
   and the gradient is finite, zero at the masked positions and the float64 reference's elsewhere, on
   every backend, through loss(), token_logprobs(mask=), linear_loss() and linear_token_logprobs(mask=).
8. HF's ignore index -100 in completion_ids where the mask is 0: accepted by every entry point and
   backend, with the value and gradient of a valid id there; an out-of-range id where the mask is not 0
   (or with no mask) stays a ValueError naming completion_ids (ids for the log-prob functions).

References are float64 and independent of the backends: spec_loss (plain loops) for the losses, the
plain log_softmax formula for the log-probs, each on finite logits and valid ids at masked positions.
The triton cases run in a subprocess with TRITON_INTERPRET=1, started by
test_triton_cases_under_interpreter; here they skip with that reason.
"""
import pytest
import torch

import frpo_kernels
from helpers import INTERPRETED, rerun_under_interpreter, use_backend
from spec_loss import spec_loss

B, T, H, V = 4, 5, 6, 11
ALL_BACKENDS = ["torch", "cpu", "triton"]
IGNORE_INDEX = -100


def test_triton_cases_under_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = rerun_under_interpreter(__file__, "triton and not under_interpreter", timeout=900)
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def dtype_of(backend):
    return torch.float64 if backend == "torch" else torch.float32


def tolerance(backend):
    return 1e-10 if backend == "torch" else 2e-5


def masked_batch(seed=0):
    """float64 logits [4, 5, 11], hidden [4, 5, 6], head [11, 6] + bias, ids and a mask (row 1 masked
    from t=2, [3, 0] masked, row 2's weight 2 at t=4), rewards for groups of 2, old log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 2:] = 0
    mask[3, 0] = 0
    mask[2, 4] = 2.0
    old = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) \
        + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    return dict(logits=logits, hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, old=old,
                rewards=rewards)


def with_nan_where_masked(x, mask):
    """x with NaN in every masked row but one, where a single entry is NaN and one is inf."""
    x = x.clone()
    rows = (mask == 0).nonzero().tolist()
    for b, t in rows[1:]:
        x[b, t] = float("nan")
    b, t = rows[0]
    x[b, t, 0], x[b, t, -1] = float("nan"), float("inf")
    return x


def with_ignore_index_where_masked(ids, mask):
    return ids.masked_fill(mask == 0, IGNORE_INDEX)


def loss_options(data, backend, with_old):
    return dict(rewards=data["rewards"], group_size=2, temperature=0.9, backend=backend,
                old_logps=data["old"] if with_old else None)


def spec_value_and_grad(logits, ids, mask, options):
    """spec_loss's float64 value and gradient (the backend option is not the spec's)."""
    z = logits.detach().double().clone().requires_grad_(True)
    value = spec_loss(z, ids, mask, **{k: v for k, v in options.items() if k != "backend"})
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def spec_linear_value_and_grads(hidden, weight, bias, ids, mask, options):
    leaves = [x.detach().double().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    value = spec_loss(leaves[0] @ leaves[1].T + leaves[2], ids, mask,
                      **{k: v for k, v in options.items() if k != "backend"})
    return value.detach(), torch.autograd.grad(value, leaves)


def plain_token_objective(logits, ids, mask, temperature=0.9):
    """sum(c * logp + d * entropy) over the rows where mask != 0, by the plain float64 formula."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    logp = log_p.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return token_objective(logp, entropy, mask)


def token_objective(logp, entropy, mask):
    c = torch.linspace(-1.0, 2.0, B * T, dtype=torch.float64).view(B, T)
    keep = mask != 0
    return torch.where(keep, c * logp.double() + 0.5 * c.flip(1) * entropy.double(), 0).sum()


def value_and_grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    return value.detach().double(), [g.double() for g in torch.autograd.grad(value, leaves)]


def assert_close(actual, expected, tol):
    assert torch.isfinite(actual).all(), actual
    scale = expected.abs().max().clamp_min(1.0)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol * scale), \
        f"max abs diff {(actual - expected).abs().max().item():.3e}"


def assert_zero_where_masked(grad, mask):
    assert torch.isfinite(grad).all(), grad
    assert (grad[mask == 0] == 0).all(), grad[mask == 0]


# 6. NaN at masked positions never reaches the value or the gradient.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old_logps"])
@pytest.mark.parametrize("loss_type", ["frpo", "grpo"])
def test_loss_nan_logits_at_masked_positions(backend, with_old, loss_type):
    backend = use_backend(backend)
    data = masked_batch()
    options = dict(loss_options(data, backend, with_old), loss_type=loss_type)
    logits = with_nan_where_masked(data["logits"], data["mask"]).to(dtype_of(backend))
    value, (grad,) = value_and_grads(lambda z: frpo_kernels.loss(z, data["ids"], data["mask"], **options), [logits])
    want_value, want_grad = spec_value_and_grad(data["logits"], data["ids"], data["mask"], options)
    assert_close(value, want_value, tolerance(backend))
    assert_zero_where_masked(grad, data["mask"])
    assert_close(grad, want_grad, tolerance(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bool_mask", [False, True], ids=["weights", "bool"])
def test_token_logprobs_nan_logits_at_masked_positions(backend, bool_mask):
    backend = use_backend(backend)
    data = masked_batch()
    mask = data["mask"] != 0 if bool_mask else data["mask"]
    logits = with_nan_where_masked(data["logits"], data["mask"]).to(dtype_of(backend))

    def objective(z):
        logp, entropy = frpo_kernels.token_logprobs(z, data["ids"], temperature=0.9, return_entropy=True,
                                                    backend=backend, mask=mask)
        assert (logp[data["mask"] == 0] == 0).all() and (entropy[data["mask"] == 0] == 0).all()
        return token_objective(logp, entropy, data["mask"])

    value, (grad,) = value_and_grads(objective, [logits])
    want_value, (want_grad,) = value_and_grads(lambda z: plain_token_objective(z, data["ids"], data["mask"]),
                                               [data["logits"]])
    assert_close(value, want_value, tolerance(backend))
    assert_zero_where_masked(grad, data["mask"])
    assert_close(grad, want_grad.masked_fill((data["mask"] == 0).unsqueeze(-1), 0), tolerance(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old_logps"])
def test_linear_loss_nan_hidden_at_masked_positions(backend, with_old):
    backend = use_backend(backend)
    data = masked_batch()
    options = loss_options(data, backend, with_old)
    hidden = with_nan_where_masked(data["hidden"], data["mask"])
    leaves = [x.to(dtype_of(backend)) for x in (hidden, data["weight"], data["bias"])]
    value, grads = value_and_grads(
        lambda h, w, b: frpo_kernels.linear_loss(h, w, data["ids"], data["mask"], bias=b, **options), leaves)
    want_value, want_grads = spec_linear_value_and_grads(data["hidden"], data["weight"], data["bias"],
                                                         data["ids"], data["mask"], options)
    assert_close(value, want_value, tolerance(backend))
    assert_zero_where_masked(grads[0], data["mask"])
    for got, want in zip(grads, want_grads):
        assert_close(got, want, tolerance(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_token_logprobs_nan_hidden_at_masked_positions(backend):
    backend = use_backend(backend)
    data = masked_batch()
    hidden = with_nan_where_masked(data["hidden"], data["mask"])
    leaves = [x.to(dtype_of(backend)) for x in (hidden, data["weight"], data["bias"])]

    def objective(h, w, b):
        logp, entropy = frpo_kernels.linear_token_logprobs(h, w, data["ids"], bias=b, temperature=0.9,
                                                           return_entropy=True, mask=data["mask"], backend=backend)
        return token_objective(logp, entropy, data["mask"])

    value, grads = value_and_grads(objective, leaves)
    want_value, want_grads = value_and_grads(
        lambda h, w, b: plain_token_objective(h @ w.T + b, data["ids"], data["mask"]),
        [data["hidden"].masked_fill((data["mask"] == 0).unsqueeze(-1), 0), data["weight"], data["bias"]])
    assert_close(value, want_value, tolerance(backend))
    assert_zero_where_masked(grads[0], data["mask"])
    for got, want in zip(grads, want_grads):
        assert_close(got, want, tolerance(backend))


# 8. HF's -100 where the mask is 0: the value and gradient of a valid id there; a ValueError elsewhere.
def entry_points(data, backend, with_old=False):
    """Each public entry point as (the name of its ids argument, run(ids, mask, dtype) -> (value, grads)
    on `backend`, reference(ids, mask) -> the float64 (value, grads))."""
    options = loss_options(data, backend, with_old)
    logits, head = data["logits"], [data["hidden"], data["weight"], data["bias"]]

    def loss(ids, mask, dtype):
        return value_and_grads(lambda z: frpo_kernels.loss(z, ids, mask, **options), [logits.to(dtype)])

    def loss_reference(ids, mask):
        value, grad = spec_value_and_grad(logits, ids, mask, options)
        return value, [grad]

    def linear_loss(ids, mask, dtype):
        return value_and_grads(lambda h, w, b: frpo_kernels.linear_loss(h, w, ids, mask, bias=b, **options),
                               [x.to(dtype) for x in head])

    def linear_loss_reference(ids, mask):
        return spec_linear_value_and_grads(*head, ids, mask, options)

    def token_logprobs(ids, mask, dtype):
        def objective(z):
            logp, entropy = frpo_kernels.token_logprobs(z, ids, temperature=0.9, return_entropy=True,
                                                        backend=backend, mask=mask)
            return token_objective(logp, entropy, data["mask"])
        return value_and_grads(objective, [logits.to(dtype)])

    def token_logprobs_reference(ids, mask):
        return value_and_grads(lambda z: plain_token_objective(z, ids, mask), [logits])

    def linear_token_logprobs(ids, mask, dtype):
        def objective(h, w, b):
            logp, entropy = frpo_kernels.linear_token_logprobs(h, w, ids, bias=b, temperature=0.9,
                                                               return_entropy=True, mask=mask, backend=backend)
            return token_objective(logp, entropy, data["mask"])
        return value_and_grads(objective, [x.to(dtype) for x in head])

    def linear_token_logprobs_reference(ids, mask):
        return value_and_grads(lambda h, w, b: plain_token_objective(h @ w.T + b, ids, mask), head)

    return {"loss": ("completion_ids", loss, loss_reference),
            "linear_loss": ("completion_ids", linear_loss, linear_loss_reference),
            "token_logprobs": ("ids", token_logprobs, token_logprobs_reference),
            "linear_token_logprobs": ("ids", linear_token_logprobs, linear_token_logprobs_reference)}


ENTRY_POINTS = ["loss", "linear_loss", "token_logprobs", "linear_token_logprobs"]


ENTRY_POINTS_AND_OLD = [(entry, False) for entry in ENTRY_POINTS] + [("loss", True), ("linear_loss", True)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("entry,with_old", ENTRY_POINTS_AND_OLD,
                         ids=[entry + ("-old_logps" if old else "") for entry, old in ENTRY_POINTS_AND_OLD])
@pytest.mark.parametrize("bool_mask", [False, True], ids=["weights", "bool"])
def test_ignore_index_where_masked_is_never_read(backend, entry, with_old, bool_mask):
    backend = use_backend(backend)
    data = masked_batch()
    mask = data["mask"] != 0 if bool_mask else data["mask"]
    _, run, reference = entry_points(data, backend, with_old)[entry]
    padded = with_ignore_index_where_masked(data["ids"], data["mask"])
    value, grads = run(padded, mask, dtype_of(backend))
    want_value, want_grads = reference(data["ids"], mask)
    assert_close(value, want_value, tolerance(backend))
    for got, want in zip(grads, want_grads):
        assert_close(got, want, tolerance(backend))
    # the same as this backend with a valid id there, to the last bit
    same_value, same_grads = run(data["ids"], mask, dtype_of(backend))
    assert torch.equal(value, same_value)
    assert all(torch.equal(g, s) for g, s in zip(grads, same_grads))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", [IGNORE_INDEX, -1, V], ids=["ignore_index", "negative", "V"])
@pytest.mark.parametrize("where", ["unmasked", "no_mask"])
def test_out_of_range_id_that_is_read_names_the_argument(backend, entry, bad, where):
    backend = use_backend(backend)
    data = masked_batch()
    name, run, _ = entry_points(data, backend)[entry]
    ids = with_ignore_index_where_masked(data["ids"], data["mask"])
    ids[2, 3] = bad  # mask 1 there
    mask = None if where == "no_mask" else data["mask"]
    if where == "no_mask":
        ids = data["ids"].clone()
        ids[0, 1] = bad
    with pytest.raises(ValueError, match=rf"^{name} has entries outside \[0, {V}\)"):
        run(ids, mask, dtype_of(backend))
