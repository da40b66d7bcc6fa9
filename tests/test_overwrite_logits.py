"""loss(..., overwrite_logits=True): same value and gradient, written into the logits' storage."""
import pytest
import torch

import frpo_kernels
from helpers import make_batch, require_cpu_kernels


@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_overwrite_matches_allocating_path_and_reuses_storage(with_old):
    require_cpu_kernels()
    data = make_batch(batch=6, length=5, vocab=301, group_size=3, dtype=torch.float32, seed=1)
    kwargs = dict(rewards=data["rewards"].float(), group_size=3, ref_logps=data["ref"].float(), beta=0.1,
                  old_logps=data["old"].float() if with_old else None, backend="cpu")
    base = data["logits"].clone().requires_grad_(True)
    want = frpo_kernels.loss(base, data["ids"], data["mask"], **kwargs)
    (want_grad,) = torch.autograd.grad(want, base)

    head = data["logits"].clone().requires_grad_(True)
    logits = head * 1.0  # a non-leaf, like the LM head's output
    got = frpo_kernels.loss(logits, data["ids"], data["mask"], overwrite_logits=True, **kwargs)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert got_grad.data_ptr() == logits.data_ptr()


@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_logits_with_non_unit_vocab_stride_match_torch(with_old):
    """The kernels need unit-stride rows; loss() copies such logits and the gradient still flows."""
    require_cpu_kernels()
    data = make_batch(batch=4, length=3, vocab=50, group_size=2, dtype=torch.float32, seed=2)
    strided = torch.stack([data["logits"], data["logits"]], dim=-1)[..., 0]  # stride(-1) == 2
    assert strided.stride(-1) != 1
    kwargs = dict(rewards=data["rewards"].float(), group_size=2, old_logps=data["old"].float() if with_old else None)
    z1 = strided.clone().requires_grad_(True)
    got = frpo_kernels.loss(strided.requires_grad_(True), data["ids"], data["mask"], backend="cpu", **kwargs)
    (got_grad,) = torch.autograd.grad(got, strided)
    want = frpo_kernels.loss(z1, data["ids"], data["mask"], backend="torch", **kwargs)
    (want_grad,) = torch.autograd.grad(want, z1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
