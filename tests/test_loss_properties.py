"""gradcheck in float64, hypothesis over random shapes/groups/configurations, bf16 tolerance."""
import torch
from hypothesis import given, settings, strategies as st

import frpo_kernels
from helpers import make_batch
from spec_loss import spec_loss


def test_gradcheck_float64_frpo_and_grpo():
    data = make_batch(batch=4, length=3, vocab=5, group_size=2, seed=11)
    for loss_type in ["frpo", "grpo"]:
        def fn(z):
            return frpo_kernels.loss(z, data["ids"], data["mask"], rewards=data["rewards"], group_size=2,
                                     old_logps=data["old"], ref_logps=data["ref"], beta=0.1,
                                     loss_type=loss_type, lam=1.5, backend="torch")
        assert torch.autograd.gradcheck(fn, (data["logits"].clone().requires_grad_(True),), eps=1e-6,
                                        atol=1e-7)


@st.composite
def configurations(draw):
    group_size = draw(st.integers(2, 4))
    num_groups = draw(st.integers(1, 3))
    return dict(
        batch=group_size * num_groups, group_size=group_size,
        length=draw(st.integers(1, 4)), vocab=draw(st.integers(2, 9)), seed=draw(st.integers(0, 10_000)),
        loss_type=draw(st.sampled_from(["frpo", "grpo", "bnpo", "dr_grpo", "dapo"])),
        jackknife=draw(st.booleans()), baseline=draw(st.booleans()),
        level=draw(st.sampled_from(["token", "sequence"])), with_old=draw(st.booleans()),
        beta=draw(st.sampled_from([0.0, 0.2])), delta=draw(st.sampled_from([None, 1.05, 3.0])),
        lam=draw(st.floats(0.2, 5.0)), temperature=draw(st.floats(0.3, 2.0)),
        scale=draw(st.sampled_from([True, False, "group", "batch", "none"])),
        shuffle_groups=draw(st.booleans()),
        empty_rows=draw(st.lists(st.integers(0, group_size * num_groups - 1), max_size=group_size + 1)),
        lam_scale=draw(st.sampled_from([1.0, 1e-3])),  # 1e-3: exp(-A/lam) far beyond float64's range
    )


@settings(max_examples=60, deadline=None)
@given(configurations())
def test_random_configurations_match_spec(c):
    data = make_batch(batch=c["batch"], length=c["length"], vocab=c["vocab"], group_size=c["group_size"],
                      seed=c["seed"])
    data["mask"][c["empty_rows"]] = 0.0  # rows with no completion token, anywhere in the groups
    group_kw = {"group_size": c["group_size"]}
    if c["shuffle_groups"]:
        perm = torch.randperm(c["batch"], generator=torch.Generator().manual_seed(c["seed"]))
        group_kw = {"group_ids": (torch.arange(c["batch"]) // c["group_size"])[perm] * 10}
    kwargs = dict(rewards=data["rewards"] + torch.arange(c["batch"]) * 0.01, loss_type=c["loss_type"],
                  jackknife=c["jackknife"], baseline=c["baseline"], importance_sampling_level=c["level"],
                  old_logps=data["old"] if c["with_old"] else None,
                  ref_logps=data["ref"] if c["beta"] else None, beta=c["beta"], delta=c["delta"],
                  lam=c["lam"] * c["lam_scale"], temperature=c["temperature"], scale_rewards=c["scale"], **group_kw)
    z1 = data["logits"].clone().requires_grad_(True)
    z2 = data["logits"].clone().requires_grad_(True)
    got = frpo_kernels.loss(z1, data["ids"], data["mask"], backend="torch", **kwargs)
    want = spec_loss(z2, data["ids"], data["mask"], **kwargs)
    got.backward()
    want.backward()
    assert torch.isfinite(got) and torch.isfinite(z1.grad).all()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-9, atol=1e-10)


def test_bf16_logits_within_stated_tolerance():
    """bf16 logits (8-bit mantissa): loss within 2e-2 relative and gradients within 2e-2 absolute
    of the float64 spec evaluated on the same (rounded) logits; accumulation is float32."""
    data = make_batch(batch=8, length=6, vocab=300, group_size=4, seed=2)
    bf16 = data["logits"].to(torch.bfloat16)
    for loss_type in ["frpo", "grpo"]:
        kwargs = dict(rewards=data["rewards"], group_size=4, old_logps=data["old"].float(), loss_type=loss_type)
        z = bf16.clone().requires_grad_(True)
        got = frpo_kernels.loss(z, data["ids"], data["mask"], backend="torch", **kwargs)
        got.backward()
        z64 = bf16.double().requires_grad_(True)
        want = spec_loss(z64, data["ids"], data["mask"], **kwargs)
        want.backward()
        assert got.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
        assert abs(got.item() - want.item()) <= 2e-2 * max(abs(want.item()), 1e-2)
        assert (z.grad.double() - z64.grad).abs().max() <= 2e-2 * z64.grad.abs().max()


def test_token_logprobs_and_entropy_match_log_softmax():
    data = make_batch(batch=3, length=4, vocab=10, seed=4)
    logp, entropy = frpo_kernels.token_logprobs(data["logits"], data["ids"], temperature=0.5,
                                                return_entropy=True, backend="torch")
    log_probs = torch.log_softmax(data["logits"] / 0.5, -1)
    assert torch.allclose(logp, log_probs.gather(-1, data["ids"][..., None]).squeeze(-1))
    assert torch.allclose(entropy, -(log_probs.exp() * log_probs).sum(-1))


def test_neg_inf_masked_vocab_gives_finite_loss_and_zero_grad_there():
    data = make_batch(batch=4, length=3, vocab=8, group_size=2, seed=9)
    logits = data["logits"].clone()
    banned = torch.ones(8, dtype=torch.bool)
    banned[data["ids"].unique()] = False
    logits[..., banned] = float("-inf")
    z = logits.requires_grad_(True)
    value = frpo_kernels.loss(z, data["ids"], data["mask"], rewards=data["rewards"], group_size=2,
                              backend="torch")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    assert (z.grad[..., banned] == 0).all()
