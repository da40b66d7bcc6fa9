"""Off-policy in one pass: with old_logps, a token-local loss (at token-level IS: the clipped GRPO family,
cispo, sapo) takes the fused sweep, its token gradient its kernel gate (objective.fused_ratio_gate); FRPO,
vespo and sequence-level IS keep the two-pass path.

- float64: the fused path on the reference kernels equals the two-pass path to 1e-10 (value, metrics,
  gradient) for loss() and linear_loss(), every token-local type, delta, KL, masks, group_stats;
- cpu (fp32, bf16) and triton (interpreter) against the float64 torch loss, and which path ran.
"""
import importlib
import itertools

import pytest
import torch

import frpo_kernels
from frpo_kernels import loss_types
from helpers import INTERPRETED, count_kernel_calls, rerun_under_interpreter, use_backend

loss_module = importlib.import_module("frpo_kernels.loss")  # the module (frpo_kernels.loss is the function)
B, T, H, V = 6, 5, 8, 41
TOKEN_LOCAL = [name for name in loss_types.NAMES if loss_types.get(name).token_local]
# where each type's gate has two branches, the metric that proves the batch reaches both (sapo: none)
BOTH_BRANCHES = {"cispo": "cispo_clip_ratio", "sapo": None}


def batch(seed=0, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.25).double()
    mask[:, 0] = 1
    mask[2] = 0  # a row with no completion token
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # spread 0.3: a good share of the ratios fall outside [0.8, 1.2] on either side
    old = logp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.randn(B, generator=gen, dtype=torch.float64)
    return hidden, weight, ids, mask, old, ref, rewards


def options(loss_type, delta, beta, ref):
    # cispo's epsilon_high is an absolute cap on the ratio: 1.1 caps some of the batch's ratios, not all
    return dict(loss_type=loss_type, delta=delta, beta=beta, ref_logps=ref if beta else None, group_size=3,
                max_completion_length=7 if loss_type == "dr_grpo" else None, return_metrics=True,
                epsilon_high=1.1 if loss_type == "cispo" else 0.2)


def value_grad_metrics(fn, leaf):
    leaf = leaf.detach().clone().requires_grad_(True)
    value, metrics = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad, metrics


def assert_metrics_equal(got, want, tol):
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(got[name].double(), value.double(), rtol=tol, atol=tol), name


@pytest.mark.parametrize("loss_type, delta, beta, entry",
                         itertools.product(TOKEN_LOCAL, [None, 1.1, 3.0], [0.0, 0.1], ["logits", "hidden"]))
def test_fused_equals_two_pass_in_float64(monkeypatch, loss_type, delta, beta, entry):
    """The reference kernels run the fused path when _loss is made to take it for backend="torch"."""
    hidden, weight, ids, mask, old, ref, rewards = batch()
    opts = options(loss_type, delta, beta, ref)

    def call(x):
        if entry == "logits":
            return frpo_kernels.loss(x @ weight.T, ids, mask, rewards=rewards, old_logps=old, backend="torch", **opts)
        return frpo_kernels.linear_loss(x, weight, ids, mask, rewards=rewards, old_logps=old, backend="torch", **opts)

    two_pass = value_grad_metrics(call, hidden)
    fused_ran = []

    def fused_instead(*args):
        fused_ran.append(True)
        return loss_module._fused_path(*args)
    monkeypatch.setattr(loss_module, "_two_pass_path", fused_instead)
    fused = value_grad_metrics(call, hidden)
    assert fused_ran
    assert torch.allclose(fused[0], two_pass[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(fused[1], two_pass[1], rtol=1e-10, atol=1e-10 * two_pass[1].abs().max())
    assert_metrics_equal(fused[2], two_pass[2], 1e-10)
    both = BOTH_BRANCHES.get(loss_type, "clip_ratio/region_mean")
    if both is not None:  # the gate was exercised on both sides
        assert 0 < two_pass[2][both] < 1


def test_micro_batches_with_group_stats_in_one_pass_each(monkeypatch):
    """Micro-batches of a batch (bnpo normalises by the whole batch's tokens) on the fused path."""
    hidden, weight, ids, mask, old, ref, rewards = batch(seed=3)
    gids = torch.arange(B) // 3
    logits = hidden @ weight.T
    whole = value_grad_metrics(lambda z: (frpo_kernels.loss(z, ids, mask, rewards=rewards, group_ids=gids,
                                                            old_logps=old, loss_type="bnpo", backend="torch"), {}),
                               logits)
    monkeypatch.setattr(loss_module, "_two_pass_path", loss_module._fused_path)
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_ids=gids, loss_type="bnpo")
    grad = torch.zeros_like(logits)
    total = 0.0
    for rows in ([0, 4], [1, 2, 3, 5]):
        z = logits[rows].clone().requires_grad_(True)
        part = frpo_kernels.loss(z, ids[rows], mask[rows], rewards=rewards[rows], group_ids=gids[rows],
                                 old_logps=old[rows], loss_type="bnpo", group_stats=stats, backend="torch")
        part.backward()
        total, grad[rows] = total + part.detach(), z.grad
    assert torch.allclose(total, whole[0], rtol=1e-10)
    assert torch.allclose(grad, whole[1], rtol=1e-10, atol=1e-12)


KERNEL_CASES = list(itertools.product(["cpu", "triton"], ["grpo", "dapo", "dr_grpo", "cispo", "sapo"],
                                      [torch.float32, torch.bfloat16], ["logits", "hidden"]))


@pytest.mark.parametrize("backend, loss_type, dtype, entry", KERNEL_CASES)
def test_kernels_take_one_pass_and_match_float64(monkeypatch, backend, loss_type, dtype, entry):
    """Against the float64 loss of the same (rounded) inputs: the logits, or hidden and weight."""
    backend = use_backend(backend)
    hidden, weight, ids, mask, old, ref, rewards = batch(seed=1)
    opts = options(loss_type, 1.1, 0.1, ref.float())
    opts.pop("return_metrics")
    weight = weight.to(dtype)
    leaf = (hidden.to(dtype) @ weight.T if entry == "logits" else hidden.to(dtype)).detach()

    def call(x, be):
        if entry == "logits":
            return frpo_kernels.loss(x, ids, mask, rewards=rewards, old_logps=old.float(), backend=be, **opts)
        w = weight.double() if be == "torch" else weight
        return frpo_kernels.linear_loss(x, w, ids, mask, rewards=rewards, old_logps=old.float(), backend=be, **opts)

    want_leaf = leaf.double().requires_grad_(True)
    want = call(want_leaf, "torch")
    want.backward()
    calls = count_kernel_calls(monkeypatch, backend)
    got_leaf = leaf.clone().requires_grad_(True)
    got = call(got_leaf, backend)
    got.backward()
    assert calls == {"fused": 1, "backward": 0}, calls
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    assert (got_leaf.grad.double() - want_leaf.grad).abs().max() <= tol * want_leaf.grad.abs().max()


def zero_probability_target(entry, dtype, seed=4):
    """A batch in which token (0, 1)'s completion token has a -inf logit (a vocabulary mask the sampler did
    not apply): as logits, or as hidden states with a bias of -inf at that vocabulary entry."""
    hidden, weight, ids, mask, old, ref, rewards = batch(seed=seed)
    mask[0, 1] = 1
    bias = torch.zeros(V, dtype=torch.float64)
    bias[ids[0, 1]] = -float("inf")
    leaf = (hidden @ weight.T + bias if entry == "logits" else hidden).to(dtype).detach()

    def call(x, be, **opts):
        if entry == "logits":
            return frpo_kernels.loss(x, ids, mask, rewards=rewards, group_size=3, backend=be, **opts)
        w, b = (weight, bias) if be == "torch" else (weight.to(dtype), bias.to(dtype))
        return frpo_kernels.linear_loss(x, w, ids, mask, bias=b, rewards=rewards, group_size=3, backend=be,
                                        **opts)
    return leaf, old, call


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss_type", TOKEN_LOCAL)
@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_zero_probability_target_off_policy(monkeypatch, backend, loss_type, entry):
    """Off-policy such a token's ratio is 0: the one-pass value and gradient are the float64 reference's
    (finite, but for cispo, whose loss weights logp itself: NaN there too). The value was NaN on the
    fused path before, where a `logp * 0` meant to spread NaN logits met logp = -inf."""
    backend = use_backend(backend)
    leaf, old, call = zero_probability_target(entry, torch.float32)
    want_leaf = leaf.double().requires_grad_(True)
    want = call(want_leaf, "torch", old_logps=old, loss_type=loss_type)
    want.backward()
    calls = count_kernel_calls(monkeypatch, backend)
    got_leaf = leaf.clone().requires_grad_(True)
    got = call(got_leaf, backend, old_logps=old.float(), loss_type=loss_type)
    got.backward()
    assert calls == {"fused": 1, "backward": 0}, calls
    assert want.isfinite() or loss_type == "cispo", want
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-5, equal_nan=True)
    assert got_leaf.grad.isfinite().all()
    torch.testing.assert_close(got_leaf.grad.double(), want_leaf.grad, rtol=2e-5,
                               atol=2e-5 * want_leaf.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_zero_probability_target_on_policy_is_nan(backend, entry):
    """On-policy (no old_logps) the ratio exp(logp - logp.detach()) of a -inf log-prob is NaN, as in TRL:
    the loss is NaN on every backend and path (the gradients then are not meaningful: README)."""
    backend = use_backend(backend)
    leaf, _, call = zero_probability_target(entry, torch.float32)
    for be, x in (("torch", leaf.double()), (backend, leaf)):
        for loss_type in ("grpo", "frpo"):
            value = call(x.clone().requires_grad_(True), be, loss_type=loss_type)
            assert value.isnan(), (be, loss_type, value)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss_type, level", [("frpo", "token"), ("grpo", "sequence"), ("vespo", "token"),
                                               ("sapo", "sequence")])
def test_row_or_group_coupled_losses_keep_two_passes(monkeypatch, backend, loss_type, level):
    backend = use_backend(backend)
    hidden, weight, ids, mask, old, ref, rewards = batch(seed=2)
    calls = count_kernel_calls(monkeypatch, backend)
    z = (hidden @ weight.T).float().requires_grad_(True)
    frpo_kernels.loss(z, ids, mask, rewards=rewards, group_size=3, old_logps=old.float(), loss_type=loss_type,
                      importance_sampling_level=level, backend=backend).backward()
    assert calls == {"fused": 0, "backward": 1}, calls


@pytest.mark.skipif(INTERPRETED, reason="this is the rerun")
def test_triton_cases_under_interpreter():
    rerun_under_interpreter(__file__, select="triton")
