"""No silent wrong answers, round 2: inputs that gave a plausible value, or a gradient on one backend and
none on another, now get one documented convention or an error that names the argument.

3. rewards / advantages / old_logps / ref_logps are constants: no gradient reaches them, on every backend
   and path, and the logits' gradient is the one with detached inputs.
4. float (or bool) group_ids with group_stats= are a TypeError, as without group_stats.
5. max_completion_length (every option group_stats and the loss both take) must match the statistics.
7. a negative, NaN or inf completion_mask is a ValueError naming it; non-negative weights are weights.
Extras: FRPO's clip metrics count the tokens FRPO clips; NumPy scalars for every numeric option; any
integer or float dtype for rewards/advantages (bool refused); FRPOConfig validates at construction.
"""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

import frpo_kernels
from frpo_kernels.config import LossConfig
from frpo_kernels.group_stats import SHARED_OPTIONS
from helpers import use_backend

B, T, V, H = 4, 5, 11, 6
BACKENDS = ["torch", "cpu"]


def probe_batch(seed=0):
    """float64 logits [4, 5, 11], ids, mask (row 1 masked from t=3), rewards [1, 0, 0, 1], old and ref
    log-probs 0.2 from the current ones."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    logp = current_logps(logits, ids)
    old = logp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return logits, ids, mask, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), old, ref


def current_logps(logits, ids):
    return torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def linear_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    return hidden, weight


# 3. Constants: rewards, advantages, old_logps and ref_logps never receive a gradient.
def constant_inputs(by_rewards, with_old, dtype):
    logits, ids, mask, rewards, old, ref = probe_batch()
    values = dict(rewards=rewards) if by_rewards else \
        dict(advantages=frpo_kernels.group_advantages(rewards, group_size=2))
    values.update(ref_logps=ref, old_logps=old if with_old else None)
    values = {k: v.to(dtype) for k, v in values.items() if v is not None}
    return logits.to(dtype), ids, mask, values


def grads_with_live_constants(call, leaves, constants):
    """(gradients w.r.t. leaves with the constants requiring grad, their gradients, and the leaves'
    gradients with the constants detached)."""
    live = {k: v.clone().requires_grad_(True) for k, v in constants.items()}
    value = call(*leaves, **live)
    grads = torch.autograd.grad(value, list(leaves) + list(live.values()), allow_unused=True)
    detached = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    want = torch.autograd.grad(call(*detached, **constants), detached)
    return grads[:len(leaves)], dict(zip(live, grads[len(leaves):])), want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("by_rewards", [True, False], ids=["rewards", "advantages"])
@pytest.mark.parametrize("loss_type", ["frpo", "grpo"])
def test_rewards_advantages_old_and_ref_logps_are_constants(backend, with_old, by_rewards, loss_type):
    backend = use_backend(backend)
    logits, ids, mask, constants = constant_inputs(by_rewards, with_old, torch.float32)

    def call(z, **values):
        return frpo_kernels.loss(z, ids, mask, group_size=2, beta=0.1, loss_type=loss_type, backend=backend,
                                 **values)
    (grad,), constant_grads, (want,) = grads_with_live_constants(call, [logits.clone().requires_grad_(True)],
                                                                 constants)
    assert all(g is None for g in constant_grads.values()), \
        {k: None if g is None else float(g.abs().max()) for k, g in constant_grads.items()}
    assert torch.equal(grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_linear_loss_constants_get_no_gradient(backend, with_old):
    backend = use_backend(backend)
    _, ids, mask, constants = constant_inputs(True, with_old, torch.float32)
    hidden, weight = (t.float().requires_grad_(True) for t in linear_batch())

    def call(x, w, **values):
        return frpo_kernels.linear_loss(x, w, ids, mask, group_size=2, beta=0.1, backend=backend, **values)
    grads, constant_grads, want = grads_with_live_constants(call, [hidden, weight], constants)
    assert all(g is None for g in constant_grads.values())
    for got, expected in zip(grads, want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "off_policy"])
def test_rewards_through_group_stats_get_no_gradient(with_old):
    logits, ids, mask, rewards, old, _ = probe_batch()
    group_ids = torch.tensor([0, 0, 1, 1])
    live = rewards.clone().requires_grad_(True)
    logps = current_logps(logits, ids) if with_old else None
    stats = frpo_kernels.group_stats(mask, rewards=live, group_ids=group_ids, logps=logps,
                                     old_logps=old if with_old else None)
    rows = [1, 2]
    z = logits[rows].clone().requires_grad_(True)
    part = frpo_kernels.loss(z, ids[rows], mask[rows], rewards=live[rows], group_ids=group_ids[rows],
                             group_stats=stats, old_logps=old[rows] if with_old else None, backend="torch")
    grad, reward_grad = torch.autograd.grad(part, [z, live], allow_unused=True)
    assert reward_grad is None
    detached_stats = frpo_kernels.group_stats(mask, rewards=rewards, group_ids=group_ids, logps=logps,
                                              old_logps=old if with_old else None)
    z2 = logits[rows].clone().requires_grad_(True)
    want = frpo_kernels.loss(z2, ids[rows], mask[rows], rewards=rewards[rows], group_ids=group_ids[rows],
                             group_stats=detached_stats, old_logps=old[rows] if with_old else None,
                             backend="torch")
    assert torch.equal(grad, torch.autograd.grad(want, z2)[0])


# 4. float group_ids with group_stats: float32 rounds 16777217 to 16777216, joining another group.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_group_ids_with_group_stats_are_refused(dtype):
    logits, ids, mask, rewards, _, _ = probe_batch()
    group_ids = torch.tensor([16777216, 16777216, 16777217, 16777217])
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_ids=group_ids)
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        frpo_kernels.loss(logits[2:], ids[2:], mask[2:], rewards=rewards[2:], group_ids=group_ids[2:].to(dtype),
                          group_stats=stats, backend="torch")


# 5. Every option both group_stats() and the loss take must be the same in both.
def test_shared_options_are_every_option_group_stats_and_the_loss_both_take():
    stats_options = set(inspect.signature(frpo_kernels.group_stats).parameters)
    loss_options = {f.name for f in dataclasses.fields(LossConfig)}
    assert set(SHARED_OPTIONS) == stats_options & loss_options


MISMATCHES = [  # (option, group_stats' value, the loss's value, other options of both)
    ("max_completion_length", 8, None, {}),
    ("max_completion_length", None, 8, {}),
    ("max_completion_length", 8, 9, dict(loss_type="dr_grpo")),
    ("loss_type", "frpo", "grpo", {}),
    ("lam", 1.0, 0.5, {}),
    ("kl_radius", 0.1, 0.2, dict(lam="auto")),
    ("jackknife", True, False, {}),
    ("baseline", True, False, {}),
    ("scale_rewards", False, "group", {}),
    ("epsilon_low", 0.2, 0.3, {}),
    ("epsilon_high", 0.2, 0.3, {}),
    ("delta", None, 2.0, {}),
    ("importance_sampling_level", "token", "sequence", {}),
]


@pytest.mark.parametrize("name,in_stats,in_loss,common", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_an_option_that_differs_from_group_stats_is_named(name, in_stats, in_loss, common):
    logits, ids, mask, rewards, _, _ = probe_batch()
    group_ids = torch.tensor([0, 0, 1, 1])
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_ids=group_ids, **common, **{name: in_stats})
    with pytest.raises(ValueError, match=f"^{name}="):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_ids=group_ids, group_stats=stats,
                          backend="torch", **common, **{name: in_loss})


# 7. completion_mask entries must be finite and >= 0; other non-negative values are weights.
BAD_MASK_VALUES = [-1.0, float("nan"), float("inf")]


def bad_mask(value):
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[2, 1] = value
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", BAD_MASK_VALUES)
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_negative_or_nonfinite_completion_mask_is_refused_by_the_loss(backend, value, with_old):
    backend = use_backend(backend)
    logits, ids, _, rewards, old, _ = probe_batch()
    z = logits.float().requires_grad_(True)
    with pytest.raises(ValueError, match="completion_mask"):
        frpo_kernels.loss(z, ids, bad_mask(value), rewards=rewards, group_size=2, backend=backend,
                          old_logps=old if with_old else None)
    hidden, weight = linear_batch()
    with pytest.raises(ValueError, match="completion_mask"):
        frpo_kernels.linear_loss(hidden.float().requires_grad_(True), weight.float(), ids, bad_mask(value),
                                 rewards=rewards, group_size=2, backend=backend,
                                 old_logps=old if with_old else None)


@pytest.mark.parametrize("value", BAD_MASK_VALUES)
def test_negative_or_nonfinite_masks_are_refused_elsewhere(value):
    logits, ids, _, rewards, _, _ = probe_batch()
    with pytest.raises(ValueError, match="completion_mask"):
        frpo_kernels.group_stats(bad_mask(value), rewards=rewards, group_size=2)
    with pytest.raises(ValueError, match="mask"):
        frpo_kernels.token_logprobs(logits, ids, mask=bad_mask(value), backend="torch")
    hidden, weight = linear_batch()  # linear_token_logprobs once took such a mask as "compute this row"
    with pytest.raises(ValueError, match="mask must hold finite weights"):
        frpo_kernels.linear_token_logprobs(hidden, weight, ids, mask=bad_mask(value), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_negative_mask_values_are_token_weights(backend):
    """dr_grpo's sum of weighted token terms scales with the weights (as TRL's mask would)."""
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    kwargs = dict(rewards=rewards, group_size=2, loss_type="dr_grpo", max_completion_length=T, backend=backend,
                  old_logps=old)
    once = frpo_kernels.loss(logits.float(), ids, mask, **kwargs)
    twice = frpo_kernels.loss(logits.float(), ids, 2.5 * mask, **kwargs)
    assert torch.allclose(twice, 2.5 * once, rtol=1e-6, atol=0)


# Extra: FRPO's clip metrics count exactly the tokens whose term FRPO clips (gradient exactly 0).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delta", [None, 1.1, 3.0])
def test_frpo_clip_metrics_count_the_tokens_frpo_clips(backend, delta):
    backend = use_backend(backend)
    logits, ids, mask, rewards, old, _ = probe_batch()
    old = current_logps(logits, ids) + 0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(9),
                                                         dtype=torch.float64)
    z = logits.to(torch.float64 if backend == "torch" else torch.float32).requires_grad_(True)
    value, metrics = frpo_kernels.loss(z, ids, mask, rewards=rewards, group_size=2, old_logps=old, delta=delta,
                                       backend=backend, return_metrics=True)
    (grad,) = torch.autograd.grad(value, z)
    ratio = torch.exp(current_logps(z.detach(), ids) - old)
    clipped = ratio > min(1.2, delta or math.inf)
    assert torch.equal(clipped & (mask != 0), (grad == 0).all(-1) & (mask != 0))  # the float64 truth
    assert bool(((ratio < 0.8) & (mask != 0)).any()) and bool((clipped & (mask != 0)).any())
    want = float((clipped * mask).sum() / mask.sum())
    assert float(metrics["clip_ratio/low_mean"]) == 0  # epsilon_low never binds in FRPO's min(c1, c2)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(want, abs=1e-12)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(want, abs=1e-12)


def test_grpo_clip_metrics_keep_trl_definitions():
    logits, ids, mask, rewards, old, _ = probe_batch()
    old = current_logps(logits, ids) + 0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(9),
                                                         dtype=torch.float64)
    _, metrics = frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_size=2, old_logps=old, delta=3.0,
                                   loss_type="grpo", backend="torch", return_metrics=True)
    c1 = torch.exp(current_logps(logits, ids) - old).clamp(max=3.0)
    adv = frpo_kernels.group_advantages(rewards, group_size=2).unsqueeze(-1)
    low, high = (c1 < 0.8) & (adv < 0), (c1 > 1.2) & (adv > 0)
    for name, counted in [("low", low), ("high", high), ("region", low | high)]:
        want = float((counted * mask).sum() / mask.sum())
        assert float(metrics[f"clip_ratio/{name}_mean"]) == pytest.approx(want, abs=1e-12)
    assert bool((low & (mask != 0)).any()) and bool((high & (mask != 0)).any())


# Extra: NumPy scalars are numbers for every numeric option; bools are not ints.
def test_numpy_scalars_for_every_numeric_option():
    logits, ids, mask, rewards, old, ref = probe_batch()
    hidden, weight = linear_batch()
    floats = dict(temperature=0.7, lam=0.5, beta=0.1, epsilon_low=0.1, epsilon_high=0.3, delta=2.0)
    numpy_floats = {k: np.float32(v) for k, v in floats.items()}
    as_python = {k: float(v) for k, v in numpy_floats.items()}
    common = dict(rewards=rewards, old_logps=old, ref_logps=ref, backend="torch")
    want = frpo_kernels.loss(logits, ids, mask, group_size=2, **as_python, **common)
    got = frpo_kernels.loss(logits, ids, mask, group_size=np.int64(2), **numpy_floats, **common)
    assert torch.equal(got, want)
    want = frpo_kernels.loss(logits, ids, mask, group_size=2, loss_type="dr_grpo", max_completion_length=8,
                             **common)
    got = frpo_kernels.loss(logits, ids, mask, group_size=np.int32(2), loss_type="dr_grpo",
                            max_completion_length=np.int64(8), **common)
    assert torch.equal(got, want)
    want = frpo_kernels.loss(logits, ids, mask, group_size=2, lam="auto", kl_radius=0.1, **common)
    got = frpo_kernels.loss(logits, ids, mask, group_size=2, lam="auto", kl_radius=np.float64(0.1), **common)
    assert torch.equal(got, want)
    t32 = np.float32(0.7)
    assert torch.equal(frpo_kernels.token_logprobs(logits, ids, temperature=t32, backend="torch"),
                       frpo_kernels.token_logprobs(logits, ids, temperature=float(t32), backend="torch"))
    assert torch.equal(frpo_kernels.linear_token_logprobs(hidden, weight, ids, temperature=t32, backend="torch"),
                       frpo_kernels.linear_token_logprobs(hidden, weight, ids, temperature=float(t32),
                                                          backend="torch"))
    assert torch.equal(frpo_kernels.group_advantages(rewards, group_size=np.int64(2)),
                       frpo_kernels.group_advantages(rewards, group_size=2))
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_size=np.int64(2), lam=np.float32(0.5),
                                     max_completion_length=np.int16(8))
    assert stats.cfg == frpo_kernels.group_stats(mask, rewards=rewards, group_size=2, lam=float(np.float32(0.5)),
                                                 max_completion_length=8).cfg


@pytest.mark.parametrize("option", ["group_size", "max_completion_length"])
@pytest.mark.parametrize("value", [True, np.bool_(True), 2.0, "2", np.float32(2.0)])
def test_integer_options_refuse_bools_floats_and_text(option, value):
    logits, ids, mask, rewards, _, _ = probe_batch()
    options = {"group_size": 2, option: value}
    with pytest.raises(TypeError, match=f"{option} must be a positive int"):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, backend="torch", **options)


# Extra: rewards / advantages of any integer or float dtype are values; bool and complex are refused.
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["rewards", "advantages"])
def test_integer_and_float_rewards_are_values(dtype, name):
    logits, ids, mask, _, _, _ = probe_batch()
    values = torch.tensor([3.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    want = frpo_kernels.loss(logits, ids, mask, group_size=2, backend="torch", **{name: values})
    got = frpo_kernels.loss(logits, ids, mask, group_size=2, backend="torch", **{name: values.to(dtype)})
    assert torch.equal(got, want)
    stats = frpo_kernels.group_stats(mask, group_size=2, **{name: values.to(dtype)})
    assert torch.equal(stats.terms, frpo_kernels.group_stats(mask, group_size=2, **{name: values}).terms)
    if name == "rewards":
        assert torch.allclose(frpo_kernels.group_advantages(values.to(dtype), group_size=2).double(),
                              frpo_kernels.group_advantages(values, group_size=2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["rewards", "advantages"])
def test_bool_and_complex_rewards_are_refused(dtype, name):
    logits, ids, mask, _, _, _ = probe_batch()
    values = torch.tensor([1, 0, 0, 1]).to(dtype)
    rule = f"{name} must be a tensor of real numbers \\(an integer or floating-point dtype\\)"
    with pytest.raises(TypeError, match=rule):
        frpo_kernels.loss(logits, ids, mask, group_size=2, backend="torch", **{name: values})
    with pytest.raises(TypeError, match=rule):
        frpo_kernels.group_stats(mask, group_size=2, **{name: values})
    if name == "rewards":
        with pytest.raises(TypeError, match=rule):
            frpo_kernels.group_advantages(values, group_size=2)


# Extra: FRPOConfig refuses a bad loss option when it is built, not after the first generation.
@pytest.mark.parametrize("options,name", [
    (dict(jackknife="false"), "jackknife"),
    (dict(baseline=0), "baseline"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(delta=0.5), "delta"),
    (dict(beta=float("nan")), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
])
def test_frpo_config_validates_loss_options_at_construction(tmp_path, options, name):
    pytest.importorskip("trl")
    from frpo_kernels.integrations.trl import FRPOConfig
    with pytest.raises((ValueError, TypeError), match=f"FRPOConfig.*{name}"):
        FRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


def test_frpo_config_keeps_its_good_values(tmp_path):
    pytest.importorskip("trl")
    from frpo_kernels.integrations.trl import FRPOConfig
    cfg = FRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", jackknife=False, baseline=False,
                     importance_sampling_level="sequence", epsilon=0.1, epsilon_high=0.3, delta=2.0, lam="0.5",
                     loss_type="dr_grpo", max_completion_length=16, temperature=0.7, beta=0.05)
    assert (cfg.jackknife, cfg.baseline, cfg.importance_sampling_level, cfg.lam) == (False, False, "sequence", 0.5)
