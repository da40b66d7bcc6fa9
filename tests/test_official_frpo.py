"""loss(loss_type="frpo") against the official trainer's formulas (tests/official_frpo.py) in float64, for
every option the official scripts use: on- and off-policy, jackknife and baseline on or off, delta,
sequence-level ratios, KL, TRL's reward scaling. Rows are padded; no row is empty and no mask is used
(both are where this package differs by design: README)."""
import pytest
import torch

import frpo_kernels
from official_frpo import official_frpo_loss, trl_advantages

B, G, T, V = 6, 3, 5, 11

CASES = {
    "on_policy": dict(),
    "on_policy_kl": dict(lam=2.0, beta=0.04),
    "off_policy_kl": dict(lam=2.0, beta=0.04, off_policy=True),
    "plain_log_mean": dict(lam=0.5, jackknife=False, baseline=False, off_policy=True),
    "jackknife_only": dict(lam=0.2, baseline=False, off_policy=True),
    "delta": dict(lam=4.0, delta=1.1, off_policy=True),
    "sequence_level": dict(lam=2.0, beta=0.01, level="sequence", off_policy=True),
    "scaled_rewards": dict(lam=2.0, beta=0.01, off_policy=True, scale_rewards=True),
}


def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 1.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = mask[2, 1:] = mask[4, 4:] = mask[5, 2:] = 0
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # some ratios past the clip
    ref = logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.0], dtype=torch.float64)
    return logits, ids, mask, rewards, old, ref


@pytest.mark.parametrize("case", list(CASES))
def test_frpo_matches_the_official_trainer(case):
    opts = dict(CASES[case])
    off_policy, scale = opts.pop("off_policy", False), opts.pop("scale_rewards", False)
    logits, ids, mask, rewards, old, ref = batch()
    lam, beta = opts.get("lam", 1.0), opts.get("beta", 0.0)
    old_logps = old if off_policy else None
    ref_logps = ref if beta else None

    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    want = official_frpo_loss(logp, mask, trl_advantages(rewards, G, scale), torch.arange(B) // G,
                              old_logps=old_logps, ref_logps=ref_logps, **opts)
    (want_grad,) = torch.autograd.grad(want, z)

    z = logits.clone().requires_grad_(True)
    got = frpo_kernels.loss(z, ids, mask, rewards=rewards, group_size=G, loss_type="frpo", backend="torch",
                            lam=lam, beta=beta, jackknife=opts.get("jackknife", True),
                            baseline=opts.get("baseline", True), delta=opts.get("delta"),
                            importance_sampling_level=opts.get("level", "token"), scale_rewards=scale,
                            old_logps=old_logps, ref_logps=ref_logps)
    (got_grad,) = torch.autograd.grad(got, z)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item())), (got.item(), want.item())
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-13)
