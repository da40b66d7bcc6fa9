"""Every bad input of the public API raises ValueError/TypeError naming the argument."""
import os

import pytest
import torch

import frpo_kernels

B, T, V = 4, 3, 5


def good(**overrides):
    args = dict(logits=torch.randn(B, T, V), completion_ids=torch.randint(0, V, (B, T)),
                completion_mask=torch.ones(B, T), rewards=torch.randn(B), group_size=2)
    args.update(overrides)
    return args


def call(**overrides):
    args = good(**overrides)
    args = {k: v for k, v in args.items() if v is not _DROP}
    logits, ids, mask = args.pop("logits"), args.pop("completion_ids"), args.pop("completion_mask")
    return frpo_kernels.loss(logits, ids, mask, **args)


_DROP = object()

CASES = [
    # (overrides, exception, text the message must contain)
    (dict(logits=torch.randn(B, T)), ValueError, "logits"),
    (dict(logits=torch.randint(0, 3, (B, T, V))), TypeError, "logits"),
    (dict(completion_ids=torch.randint(0, V, (B, T + 1))), ValueError, "completion_ids"),
    (dict(completion_ids=torch.rand(B, T)), TypeError, "completion_ids"),
    (dict(completion_ids=torch.full((B, T), V)), ValueError, "completion_ids"),
    (dict(completion_ids=torch.full((B, T), -1)), ValueError, "completion_ids"),
    (dict(completion_mask=torch.ones(B, T + 1)), ValueError, "completion_mask"),
    (dict(rewards=torch.randn(B + 1)), ValueError, "rewards"),
    (dict(rewards=_DROP, advantages=torch.randn(B, 1)), ValueError, "advantages"),
    (dict(old_logps=torch.randn(B, T - 1)), ValueError, "old_logps"),
    (dict(ref_logps=torch.randn(B + 1, T), beta=0.1), ValueError, "ref_logps"),
    (dict(old_logps=torch.zeros(B, T, dtype=torch.long)), TypeError, "old_logps must be a floating-point"),
    (dict(ref_logps=torch.zeros(B, T, dtype=torch.int32), beta=0.1), TypeError, "ref_logps must be a floating-point"),
    (dict(advantages=torch.randn(B)), ValueError, "advantages and rewards"),
    (dict(rewards=_DROP), ValueError, "advantages and rewards"),
    (dict(group_ids=torch.tensor([0, 0, 1, 1])), ValueError, "group_size"),
    (dict(group_size=_DROP), ValueError, "group_size"),
    (dict(group_size=3), ValueError, "group_size=3"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=_DROP, group_ids=torch.tensor([0, 0, 1, 1, 2])), ValueError, "group_ids"),
    (dict(group_size=_DROP, group_ids=torch.tensor([0.0, 0, 1, 1])), TypeError, "group_ids"),
    (dict(group_size=1), ValueError, "jackknife"),
    (dict(group_size=_DROP, group_ids=torch.tensor([0, 0, 0, 1])), ValueError, "jackknife"),
    (dict(lam=0.0), ValueError, "lam"),
    (dict(lam=-1.0), ValueError, "lam"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(epsilon_low=-0.1), ValueError, "epsilon_low"),
    (dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
    (dict(delta=1.0), ValueError, "delta"),
    (dict(delta=0.5), ValueError, "delta"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), ValueError, "rewards"),
    (dict(rewards=_DROP, advantages=torch.tensor([1.0, float("inf"), 0.0, 1.0])), ValueError, "advantages"),
    (dict(beta=0.1), ValueError, "ref_logps"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(logits=torch.randn(0, T, V), completion_ids=torch.zeros(0, T, dtype=torch.long),
          completion_mask=torch.ones(0, T), rewards=torch.randn(0)), ValueError, "B = 0"),
    (dict(logits=torch.randn(B, 0, V), completion_ids=torch.zeros(B, 0, dtype=torch.long),
          completion_mask=torch.ones(B, 0)), ValueError, "T = 0"),
    (dict(logits=torch.randn(B, T, 0)), ValueError, "V = 0"),
    (dict(max_completion_length=0, loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(scale_rewards=True, group_size=1, jackknife=False), ValueError, "scale_rewards"),
]


@pytest.mark.parametrize("overrides,exc,text", CASES, ids=[c[2] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument(overrides, exc, text):
    with pytest.raises(exc, match=text.replace("[", r"\[")):
        call(**overrides)


def test_good_input_passes():
    assert torch.isfinite(call())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="with TRITON_INTERPRET set the triton backend accepts CPU tensors")
def test_unavailable_backend_says_how_to_get_it():
    with pytest.raises(ValueError, match="triton.*CUDA tensors.*TRITON_INTERPRET=1"):
        call(backend="triton")


def test_token_logprobs_bad_inputs():
    logits, ids = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))
    with pytest.raises(ValueError, match="ids"):
        frpo_kernels.token_logprobs(logits, ids[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        frpo_kernels.token_logprobs(logits, ids, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        frpo_kernels.token_logprobs(logits, ids, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="backend"):
        frpo_kernels.token_logprobs(logits, ids, backend="gpu")


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        frpo_kernels.group_advantages(torch.randn(5), group_size=2)
    with pytest.raises(ValueError, match="rewards"):
        frpo_kernels.group_advantages(torch.randn(2, 2), group_size=2)
    with pytest.raises(ValueError, match="rewards"):
        frpo_kernels.group_advantages(torch.tensor([0.0, float("nan")]), group_size=2)
