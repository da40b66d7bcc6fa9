"""loss(backend="torch") against the independent float64 spec in spec_loss.py: values and
gradients w.r.t. logits, over every loss option that changes the formula."""
import itertools

import pytest
import torch

import frpo_kernels
from helpers import make_batch
from spec_loss import spec_loss

GRPO_FAMILY = ["grpo", "bnpo", "dr_grpo", "dapo"]


def _configs():
    for loss_type in ["frpo"] + GRPO_FAMILY:
        frpo_flags = itertools.product([True, False], [True, False]) if loss_type == "frpo" else [(True, True)]
        for (jackknife, baseline), level, with_old, beta, delta in itertools.product(
                frpo_flags, ["token", "sequence"], [True, False], [0.0, 0.05], [None, 1.1]):
            yield dict(loss_type=loss_type, jackknife=jackknife, baseline=baseline,
                       importance_sampling_level=level, with_old=with_old, beta=beta, delta=delta)


def _value_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_(True)
    value = fn(logits)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


def _assert_close(actual, expected, tol=1e-10):
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), \
        f"max abs diff {(actual - expected).abs().max().item():.3e}"


@pytest.mark.parametrize("cfg", list(_configs()), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_matches_spec(cfg):
    cfg = dict(cfg)
    data = make_batch(seed=hash(tuple(cfg.items())) % 1000)
    with_old = cfg.pop("with_old")
    kwargs = dict(rewards=data["rewards"], group_size=data["group_size"],
                  old_logps=data["old"] if with_old else None,
                  ref_logps=data["ref"] if cfg["beta"] else None, lam=2.0, **cfg)
    got_value, got_grad = _value_and_grad(
        lambda z: frpo_kernels.loss(z, data["ids"], data["mask"], backend="torch", **kwargs), data["logits"])
    want_value, want_grad = _value_and_grad(
        lambda z: spec_loss(z, data["ids"], data["mask"], **kwargs), data["logits"])
    _assert_close(got_value, want_value)
    _assert_close(got_grad, want_grad)


@pytest.mark.parametrize("loss_type", ["frpo", "grpo", "dr_grpo"])
def test_group_ids_advantages_temperature_and_scaling(loss_type):
    data = make_batch(batch=8, seed=3)
    group_ids = torch.tensor([7, 2, 7, 2, 5, 5, 7, 2])  # interleaved, non-contiguous groups
    advantages = frpo_kernels.group_advantages(data["rewards"] + torch.arange(8.0) * 0.1,
                                               group_ids=group_ids, scale_rewards=True)
    kwargs = dict(advantages=advantages, group_ids=group_ids, old_logps=data["old"], lam=0.5,
                  temperature=0.7, loss_type=loss_type, max_completion_length=9, epsilon_low=0.1,
                  epsilon_high=0.3)
    got = _value_and_grad(lambda z: frpo_kernels.loss(z, data["ids"], data["mask"], backend="torch", **kwargs),
                          data["logits"])
    want = _value_and_grad(lambda z: spec_loss(z, data["ids"], data["mask"], **kwargs), data["logits"])
    _assert_close(got[0], want[0])
    _assert_close(got[1], want[1])


def test_group_advantages_match_spec_with_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    got = frpo_kernels.group_advantages(rewards, group_size=3, scale_rewards=True)
    g1, g2 = rewards[:3], rewards[3:]
    want = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4)])
    _assert_close(got, want)


def test_rewards_and_equivalent_advantages_give_same_loss():
    data = make_batch(seed=5)
    adv = frpo_kernels.group_advantages(data["rewards"], group_size=3)
    a = frpo_kernels.loss(data["logits"], data["ids"], data["mask"], rewards=data["rewards"], group_size=3)
    b = frpo_kernels.loss(data["logits"], data["ids"], data["mask"], advantages=adv, group_size=3)
    _assert_close(a, b)


def test_all_masked_rows_are_legal_and_finite():
    data = make_batch(seed=6)
    mask = data["mask"].clone()
    mask[1] = 0.0
    logits = data["logits"].clone().requires_grad_(True)
    for loss_type in ["frpo", "grpo", "bnpo"]:
        value = frpo_kernels.loss(logits, data["ids"], mask, rewards=data["rewards"], group_size=3,
                                  loss_type=loss_type, backend="torch")
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert grad[1].abs().max() == 0


def test_on_policy_frpo_gradient_points_towards_high_reward():
    """A sanity check independent of any formula transcription: one gradient step of FRPO raises
    the log-prob of the high-reward sequence and lowers the low-reward one."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3), generator=gen)
    value = frpo_kernels.loss(logits, ids, torch.ones(2, 3), rewards=torch.tensor([1.0, 0.0]),
                              group_size=2, lam=1.0, backend="torch")
    value.backward()
    stepped = (logits - 0.1 * logits.grad).detach()
    before = torch.log_softmax(logits.detach(), -1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)
    after = torch.log_softmax(stepped, -1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)
    assert after[0] > before[0] and after[1] < before[1]
