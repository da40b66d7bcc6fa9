"""Inputs that once gave a plausible but wrong value or gradient, on every backend that applies:
NaN logits, padded old/ref log-probs, TRL's scale_rewards strings, overwrite_logits under autograd,
double backward, int32 ids, overflowing ratios, rows with no completion token, small lam.

The triton cases run in a subprocess with TRITON_INTERPRET=1 (Triton reads it at import), started
by test_triton_cases_under_interpreter; here they skip with that reason.
"""
import math

import pytest
import torch

import frpo_kernels
from helpers import INTERPRETED, rerun_under_interpreter, use_backend
from spec_loss import spec_loss

KERNEL_BACKENDS = ["cpu", "triton"]
ALL_BACKENDS = ["torch"] + KERNEL_BACKENDS
B, T, V = 4, 5, 11


def test_triton_cases_under_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = rerun_under_interpreter(__file__, "triton and not under_interpreter")
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def probe_batch(dtype=torch.float32, seed=0):
    """The issue's probe: B=4, T=5, V=11, rewards [1, 0, 0, 1], groups of 2, row 1 masked from t=3."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return logits, ids, mask, torch.tensor([1.0, 0.0, 0.0, 1.0]), old, ref


def value_and_grad(logits, *args, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    value = frpo_kernels.loss(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach().double(), grad.double()


def spec_value_and_grad(logits, ids, mask, **kwargs):
    z = logits.detach().double().requires_grad_(True)
    value = spec_loss(z, ids, mask, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_close(actual, expected, rtol, atol):
    assert torch.isfinite(actual).all(), actual
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), \
        f"max abs diff {(actual - expected).abs().max().item():.3e} (|expected| max {expected.abs().max():.3e})"


# 1. A NaN logit: the loss is NaN, as torch's log_softmax gives, never a finite value.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_nan_logit_propagates(backend, with_old):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    col = (int(ids[2, 1]) + 3) % V  # a non-target entry of an unmasked row
    logits[2, 1, col] = float("nan")
    value, grad = value_and_grad(logits, ids, mask, rewards=rewards, group_size=2, backend=backend,
                                 old_logps=old.float() if with_old else None)
    assert torch.isnan(value), value
    assert torch.isnan(grad[2, 1]).all()


# 2. Padding of old/ref log-probs at masked positions (-inf, NaN) is never read.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pad", [float("-inf"), float("nan"), float("inf")])
@pytest.mark.parametrize("loss_type", ["frpo", "grpo"])
def test_padded_old_and_ref_are_not_read(backend, pad, loss_type):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, ref = probe_batch()
    kwargs = dict(rewards=rewards, group_size=2, loss_type=loss_type, beta=0.1, backend=backend)
    for with_old in (False, True):
        finite = dict(kwargs, ref_logps=ref.float(), old_logps=old.float() if with_old else None)
        padded = dict(kwargs, ref_logps=ref.float().masked_fill(mask == 0, pad),
                      old_logps=old.float().masked_fill(mask == 0, pad) if with_old else None)
        want_value, want_grad = value_and_grad(logits, ids, mask, **finite)
        got_value, got_grad = value_and_grad(logits, ids, mask, **padded)
        assert_close(got_value, want_value, 0, 0)
        assert_close(got_grad, want_grad, 0, 0)


# 3. TRL's scale_rewards strings with TRL's meaning.
@pytest.mark.parametrize("mode", ["group", "batch", "none", True, False])
def test_scale_rewards_strings_match_trl_meaning(mode):
    use_backend("torch")
    logits, ids, mask, _, old, _ = probe_batch(torch.float64)
    rewards = torch.tensor([3.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    for loss_type in ("frpo", "grpo"):
        kwargs = dict(rewards=rewards, group_size=2, loss_type=loss_type, scale_rewards=mode, old_logps=old)
        got = value_and_grad(logits, ids, mask, backend="torch", **kwargs)
        want = spec_value_and_grad(logits, ids, mask, **kwargs)
        assert_close(got[0], want[0], 1e-10, 1e-10)
        assert_close(got[1], want[1], 1e-10, 1e-10)
    batch_std = rewards.std()  # TRL: advantages / (std of all the batch's rewards + 1e-4)
    group_mean = rewards.view(2, 2).mean(1).repeat_interleave(2)
    expected = {"batch": (rewards - group_mean) / (batch_std + 1e-4), "none": rewards - group_mean,
                False: rewards - group_mean}
    if mode in expected:
        got = frpo_kernels.group_advantages(rewards, group_size=2, scale_rewards=mode)
        assert torch.allclose(got, expected[mode], rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", ["Group", "std", 1, None, "true"])
def test_unknown_scale_rewards_names_the_argument(bad):
    use_backend("torch")
    logits, ids, mask, rewards, _, _ = probe_batch()
    with pytest.raises(ValueError, match="scale_rewards"):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_size=2, scale_rewards=bad, backend="torch")
    with pytest.raises(ValueError, match="scale_rewards"):
        frpo_kernels.group_advantages(rewards, group_size=2, scale_rewards=bad)


# 4. overwrite_logits on logits that autograd saved: autograd's in-place error, not a wrong gradient.
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_overwrite_of_saved_logits_is_refused_by_autograd(backend, with_old):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    h = (logits / 4).requires_grad_(True)
    value = frpo_kernels.loss(torch.exp(h), ids, mask, rewards=rewards, group_size=2, backend=backend,
                              old_logps=old.float() if with_old else None, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_overwrite_of_unsaved_logits_still_gives_the_gradient(backend):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    h = logits.clone().requires_grad_(True)
    want = value_and_grad(h.detach(), ids, mask, rewards=rewards, group_size=2, backend="torch",
                          old_logps=old.float())[1]
    value = frpo_kernels.loss(h * 1.0, ids, mask, rewards=rewards, group_size=2, backend=backend,
                              old_logps=old.float(), overwrite_logits=True)
    value.backward()
    assert_close(h.grad.double(), want, 1e-4, 1e-6)


# 5. Two-pass with overwrite_logits: a second backward through the graph is a clear error.
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_second_backward_after_overwrite_is_refused(backend):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    z = logits.clone().requires_grad_(True)
    value = frpo_kernels.loss(z * 1.0, ids, mask, rewards=rewards, group_size=2, backend=backend,
                              old_logps=old.float(), overwrite_logits=True)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="overwrite_logits"):
        value.backward()


# 5b. The one-pass paths compute the gradient in forward and hand it over in backward. Autograd may keep
# it, or a view of it, as a leaf's .grad (the input a view of a leaf, a cat of leaves, (leaf + 0).view):
# while the loss kept it too, a second backward through a retained graph after zero_grad(set_to_none=
# False) raised "modified by an inplace operation", and after .grad.data.zero_() gave a zero gradient.
# Now the first backward gives the gradient and a second one is a clear error on the kernel backends
# (each backward gives the gradient on the torch backend).
def _retained_graph_inputs(build, entry, dtype):
    logits, ids, mask, rewards, _, _ = probe_batch(dtype)
    x = logits if entry == "logits" else logits[..., :3].contiguous()
    leaves, z = build(x)
    weight = torch.randn(V, 3, generator=torch.Generator().manual_seed(5), dtype=dtype, requires_grad=True)
    return leaves, z, weight, ids, mask, rewards


BUILDS = {
    "view": lambda x: (lambda a: ([a], a.view(B, T, -1)))(x.reshape(B * T, -1).clone().requires_grad_(True)),
    "cat": lambda x: (lambda a, b: ([a, b], torch.cat([a, b])))(x[:2].clone().requires_grad_(True),
                                                                x[2:].clone().requires_grad_(True)),
    "add_view": lambda x: (lambda a: ([a], (a + 0).view(B, T, -1)))(x.reshape(B * T, -1).clone().requires_grad_(True)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("entry", ["logits", "hidden"])
@pytest.mark.parametrize("build", list(BUILDS))
def test_backward_through_a_retained_graph(backend, entry, build):
    backend = use_backend(backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    leaves, z, weight, ids, mask, rewards = _retained_graph_inputs(BUILDS[build], entry, dtype)
    kwargs = dict(rewards=rewards, group_size=2, backend=backend)
    value = frpo_kernels.loss(z, ids, mask, **kwargs) if entry == "logits" else \
        frpo_kernels.linear_loss(z, weight, ids, mask, **kwargs)
    value.backward(retain_graph=True)
    once = [leaf.grad.clone() for leaf in leaves]
    assert all(g.abs().max() > 0 for g in once)
    for leaf in leaves:
        leaf.grad.zero_()  # optimizer.zero_grad(set_to_none=False)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            value.backward(retain_graph=True)
        return
    value.backward(retain_graph=True)
    value.backward()
    for leaf, g in zip(leaves, once):
        torch.testing.assert_close(leaf.grad, 2 * g)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_one_pass_gradient_of_a_cat_of_leaves(backend, entry):
    """The gradient the first backward gives, against the float64 torch loss of the same inputs."""
    backend = use_backend(backend)
    leaves, z, weight, ids, mask, rewards = _retained_graph_inputs(BUILDS["cat"], entry, torch.float32)
    kwargs = dict(rewards=rewards, group_size=2)
    got = frpo_kernels.loss(z, ids, mask, backend=backend, **kwargs) if entry == "logits" else \
        frpo_kernels.linear_loss(z, weight, ids, mask, backend=backend, **kwargs)
    got.backward()
    ref_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    zr = torch.cat(ref_leaves)
    want = frpo_kernels.loss(zr, ids, mask, backend="torch", **kwargs) if entry == "logits" else \
        frpo_kernels.linear_loss(zr, weight.detach().double(), ids, mask, backend="torch", **kwargs)
    want.backward()
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=2e-5, atol=2e-6)


# 5c. Precision the fused kernels once lost (found by an adversarial check): p = exp(z - lse) from an lse
# rounded to fp32 (a relative error of |lse| * 6e-8: 1e-4 at logits of 1e4, all of it at 1e30), and at
# T != 1 a certain token's logp above 0 and entropies of +-5e-8 instead of 0 (ties that
# top_entropy_quantile then split at random).
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6, 1e30])
def test_one_pass_loss_at_large_logits(backend, offset):
    backend = use_backend(backend)
    logits, ids, mask, rewards, _, _ = probe_batch()
    logits = logits + offset
    kwargs = dict(rewards=rewards, group_size=2, loss_type="grpo")
    got = value_and_grad(logits, ids, mask, backend=backend, **kwargs)
    want = value_and_grad(logits.double(), ids, mask, backend="torch", **kwargs)
    assert_close(got[0], want[0], 1e-6, 1e-6)
    assert_close(got[1], want[1], 1e-5, 1e-6 * want[1].abs().max().item())


# 5d. The two-pass backward (FRPO, sequence-level ratios, token_logprobs under autograd) took the lse saved
# in forward rounded to fp32: the same |lse| * 6e-8 relative error in p. lse is now saved as fp32 hi + lo.
TWO_PASS_LOSSES = {"frpo": dict(loss_type="frpo"),
                   "gspo": dict(loss_type="grpo", importance_sampling_level="sequence")}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e30])
@pytest.mark.parametrize("loss", list(TWO_PASS_LOSSES))
def test_two_pass_loss_at_large_logits(backend, offset, loss):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, ref = probe_batch()
    logits = logits + offset
    old, ref = old.float(), ref.float()  # log-probs do not move with the offset
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, beta=0.1, **TWO_PASS_LOSSES[loss])
    got = value_and_grad(logits, ids, mask, backend=backend, **kwargs)
    want = value_and_grad(logits.double(), ids, mask, backend="torch", **kwargs)
    assert_close(got[0], want[0], 1e-6, 1e-6)
    assert_close(got[1], want[1], 1e-5, 1e-6 * want[1].abs().max().item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e30])
def test_token_logprobs_backward_at_large_logits(backend, offset):
    backend = use_backend(backend)
    logits, ids, _, _, _, _ = probe_batch()
    logits = logits + offset
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(2, B, T, generator=gen, dtype=torch.float64)

    def grad(z, **kw):
        z = z.detach().requires_grad_(True)
        logp, entropy = frpo_kernels.token_logprobs(z, ids, return_entropy=True, **kw)
        (g,) = torch.autograd.grad((logp * weights[0].to(logp)).sum() + (entropy * weights[1].to(entropy)).sum(), z)
        return g.double()

    want = grad(logits.double(), backend="torch")
    assert_close(grad(logits, backend=backend), want, 1e-5, 1e-6 * want.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_certain_tokens_tie_exactly_at_temperature(backend):
    """Every token certain (one finite logit per row): entropies exactly 0, so top_entropy_quantile keeps
    them all, as in float64."""
    backend = use_backend(backend)
    logits, ids, mask, rewards, _, _ = probe_batch()
    certain = torch.full_like(logits, float("-inf")).scatter_(-1, ids.unsqueeze(-1), logits.gather(-1, ids.unsqueeze(-1)))
    kwargs = dict(rewards=rewards, group_size=2, temperature=0.7, top_entropy_quantile=0.5)
    value = frpo_kernels.loss(certain, ids, mask, backend=backend, **kwargs)
    want = frpo_kernels.loss(certain.double(), ids, mask, backend="torch", **kwargs)
    assert_close(value.detach().double(), want.detach(), 1e-6, 1e-7)
    logp, entropy = frpo_kernels.token_logprobs(certain, ids, temperature=0.7, return_entropy=True, backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))


# 6. Double backward: exact on the torch backend, a clear error on the kernel backends.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_double_backward(backend, with_old):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch(torch.float64 if backend == "torch" else torch.float32)
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old if with_old else None)
    vector = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3), dtype=logits.dtype)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(frpo_kernels.loss(z, ids, mask, backend=backend, **kwargs), z,
                                  create_graph=True) if backend == "torch" else (None,)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(frpo_kernels.loss(z, ids, mask, backend=backend, **kwargs), z, create_graph=True)
        return
    (hvp,) = torch.autograd.grad((grad * vector).sum(), z)

    # on-policy, old = logp.detach(): the Hessian holds old fixed at the current log-probs
    fixed_old = kwargs["old_logps"] if with_old else \
        torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def spec_grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(spec_loss(x, ids, mask, **dict(kwargs, old_logps=fixed_old)), x)[0]

    eps = 1e-6  # central difference of the spec's gradient along the vector
    fd = (spec_grad(logits + eps * vector) - spec_grad(logits - eps * vector)) / (2 * eps)
    assert hvp.abs().max() > 1e-3
    assert_close(hvp, fd, 1e-5, 1e-7)


# 7. ids of every integer dtype work on every backend (the torch backend's gather once refused all but
# int32 / int64, with a message naming no argument).
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int16, torch.uint8])
def test_small_integer_ids(backend, with_old, id_dtype):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    kwargs = dict(rewards=rewards, group_size=2, backend=backend, old_logps=old.float() if with_old else None)
    want = value_and_grad(logits, ids, mask, **kwargs)
    got = value_and_grad(logits, ids.to(id_dtype), mask, **kwargs)
    assert_close(got[0], want[0], 0, 0)
    assert_close(got[1], want[1], 0, 0)
    logp = frpo_kernels.token_logprobs(logits, ids.to(id_dtype), backend=backend)
    assert torch.equal(logp, frpo_kernels.token_logprobs(logits, ids, backend=backend))


# 8. A ratio that overflows fp32 (old 89 below logp) on a capped or clipped token: finite gradient.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss_type,delta,reward", [("grpo", 2.0, 0.0), ("grpo", None, 1.0),
                                                      ("frpo", None, 0.0), ("frpo", 2.0, 1.0),
                                                      ("dapo", 2.0, 0.0)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_overflowing_ratio_gives_the_float64_gradient(backend, loss_type, delta, reward, level):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    rewards[0] = reward  # row 0's advantage: negative (capped by delta) or positive (clipped)
    old[0, 2] -= 89.0 * (T if level == "sequence" else 1)
    kwargs = dict(rewards=rewards, group_size=2, loss_type=loss_type, delta=delta,
                  importance_sampling_level=level)
    got = value_and_grad(logits, ids, mask, backend=backend, old_logps=old.float(), **kwargs)
    want = spec_value_and_grad(logits, ids, mask, old_logps=old.float().double(), **kwargs)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)


# 8b. A log-ratio within 3e-8 of a clip bound: the kernels compared it with the bound rounded to fp32 and kept
# the token's gradient where torch (and the float64 spec) clip it (found by an adversarial check).
CLIP_BOUND_CASES = {
    # logp = -ln 2 (logits [0, 0]) and old = 2 logp in fp32: r = delta = 2 up to that rounding
    "delta": (torch.zeros(1, 1, 2), -2 * 0.6931471824645996, dict(loss_type="dapo", delta=2.0), -1.0),
    # log r from the fp32 logp is 6.6e-9 above log1p(epsilon_high = 0.2)
    "epsilon_high": (torch.tensor([[[0.0, -2.9995999336242676]]]), -0.23092785477638245, dict(loss_type="grpo"), 1.0),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(CLIP_BOUND_CASES))
def test_log_ratio_at_a_clip_bound_is_clipped_as_torch_does(backend, case):
    backend = use_backend(backend)
    logits, old, kwargs, advantage = CLIP_BOUND_CASES[case]
    ids = torch.zeros(1, 1, dtype=torch.long)
    kwargs = dict(kwargs, advantages=torch.tensor([advantage]), group_size=1, old_logps=torch.tensor([[old]]))
    got = value_and_grad(logits, ids, None, backend=backend, **kwargs)
    want = value_and_grad(logits, ids, None, backend="torch", **kwargs)
    assert torch.equal(want[1], torch.zeros_like(want[1])), want[1]  # the case is one torch clips
    assert_close(got[0], want[0], 1e-6, 1e-7)
    assert torch.equal(got[1], want[1]), got[1]


# 9. Rows with no completion token are not samples (the README's empty-row rule).
EMPTY_ROW_CASES = {
    "one_row_of_a_group": [1],
    "three_of_four": [1, 2, 3],
    "a_whole_group": [4, 5, 6, 7],
    "every_row": list(range(8)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES))
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_rows_without_tokens_are_left_out_of_frpo_groups(backend, case, with_old):
    backend = use_backend(backend)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, T, V, generator=gen)
    ids = torch.randint(0, V, (8, T), generator=gen)
    mask = (torch.rand(8, T, generator=gen) > 0.3).float()
    mask[:, 0] = 1
    mask[EMPTY_ROW_CASES[case]] = 0
    old = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) \
        + 0.3 * torch.randn(8, T, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2])
    kwargs = dict(rewards=rewards, group_size=4, old_logps=old if with_old else None, beta=0.05,
                  ref_logps=old + 0.1)
    got = value_and_grad(logits, ids, mask, backend=backend, **kwargs)
    want = spec_value_and_grad(logits, ids, mask, **kwargs)
    assert_close(got[0], want[0], 1e-5, 1e-6)
    assert_close(got[1], want[1], 1e-5, 1e-6)
    if case == "every_row":
        assert got[0] == 0 and not got[1].any()
    if case == "one_row_of_a_group":  # without KL, an empty row changes nothing: same as leaving it out
        keep = [0, 2, 3, 4, 5, 6, 7]
        sub = dict(advantages=frpo_kernels.group_advantages(rewards, group_size=4)[keep],
                   group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1]), old_logps=None if not with_old else old[keep])
        full = value_and_grad(logits, ids, mask, backend=backend, **dict(sub, group_ids=torch.tensor(
            [0, 0, 0, 0, 1, 1, 1, 1]), advantages=frpo_kernels.group_advantages(rewards, group_size=4),
            old_logps=old if with_old else None))
        part = value_and_grad(logits[keep], ids[keep], mask[keep], backend=backend, **sub)
        assert_close(full[0], part[0], 1e-6, 1e-6)
        assert_close(full[1][keep], part[1], 1e-6, 1e-7)


def test_empty_row_rule_in_closed_form():
    """Group of 4 with rows 1-3 empty, on-policy, no baseline, no KL: the group term is log(w_0) =
    -A_0 / lam (one row left: no jackknife term); the other group is the usual jackknife."""
    use_backend("torch")
    logits = torch.randn(8, 3, 5, dtype=torch.float64)
    ids = torch.zeros(8, 3, dtype=torch.long)
    mask = torch.ones(8, 3, dtype=torch.float64)
    mask[1:4] = 0
    adv = torch.tensor([0.7, -1.0, 2.0, 0.3, 0.5, -0.5, 0.25, -0.25], dtype=torch.float64)
    lam = 0.8
    got = frpo_kernels.loss(logits, ids, mask, advantages=adv, group_size=4, lam=lam, baseline=False,
                            backend="torch")
    w = torch.exp(-adv[4:] / lam)
    jack = 4 * torch.log(w.mean()) - 3 * torch.stack(
        [torch.log((w.sum() - w[i]) / 3) for i in range(4)]).mean()
    assert torch.allclose(got, (-adv[0] / lam + jack) / 2, rtol=1e-12, atol=1e-12)


# 10. Small lam: exp(-A/lam) overflows fp32 (and float64); the loss stays finite and exact.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("lam,scale", [(1e-3, 1.0), (0.1, 20.0), (2e-3, 1.0)])
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("jackknife", [True, False])
def test_small_lam_is_finite_and_matches_float64(backend, lam, scale, with_old, jackknife):
    backend = use_backend(backend)
    logits, ids, mask, _, old, ref = probe_batch(seed=7)
    logits, ids, mask = logits.repeat(2, 1, 1), ids.repeat(2, 1), mask.repeat(2, 1)
    old, ref = old.repeat(2, 1), ref.repeat(2, 1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]) * scale
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])  # groups of 2 and 4
    kwargs = dict(rewards=rewards, group_ids=group_ids, lam=lam, jackknife=jackknife, beta=0.05,
                  old_logps=old.float() if with_old else None, ref_logps=ref.float())
    got = value_and_grad(logits, ids, mask, backend=backend, **kwargs)
    want = spec_value_and_grad(logits, ids, mask, **dict(kwargs, old_logps=old.float().double()
                                                        if with_old else None, ref_logps=ref.float().double()))
    adv = frpo_kernels.group_advantages(rewards, group_ids=group_ids)
    assert (adv.abs() / lam).max() > math.log(torch.finfo(torch.float32).max)  # exp(-A/lam) overflows fp32
    assert_close(got[0], want[0], 1e-5, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5 * want[1].abs().max().item())


# Messages the probe met.
def test_messages_name_the_argument_and_say_it_once():
    use_backend("torch")
    logits, ids, mask, rewards, _, ref = probe_batch()
    kwargs = dict(rewards=rewards, group_size=2, backend="torch")
    with pytest.raises(ValueError) as err:
        frpo_kernels.loss(logits, ids, mask, beta=math.inf, ref_logps=ref, **kwargs)
    assert str(err.value) == "beta must be a finite number, got inf"
    with pytest.raises(ValueError, match="lam must be a real number or \"auto\", got '1'"):
        frpo_kernels.loss(logits, ids, mask, lam="1", **kwargs)
    expanded = logits[:, :1].expand(B, T, V)
    with pytest.raises(ValueError, match="overwrite_logits=True needs logits whose elements") as err:
        frpo_kernels.loss(expanded, ids, mask, overwrite_logits=True, **dict(kwargs, backend="auto"))
    assert "inplace" not in str(err.value)
    with pytest.raises(ValueError, match="logits is a meta tensor"):
        frpo_kernels.loss(logits.to("meta"), ids.to("meta"), mask.to("meta"), rewards=rewards.to("meta"),
                          group_size=2)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    use_backend("torch")
    logits, ids, mask, rewards, _, ref = probe_batch(torch.float64)
    want = frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_size=2, lam=0.5, beta=0.1, ref_logps=ref,
                             backend="torch")
    got = frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_size=2, lam=np.float32(0.5),
                            beta=np.float64(0.1), ref_logps=ref, backend="torch")
    assert torch.allclose(got, want, rtol=1e-7)
