"""Public entry points: loss(), token_logprobs(), group_advantages().

Checks arguments, picks the backend (backends.resolve), runs the O(B*T*V) kernel and the O(B*T)
objective (objective.py). The fused one-pass path is used when old_logps is None (on-policy).
"""
from __future__ import annotations

import torch

from frpo_kernels import checks
from frpo_kernels.backends import resolve
from frpo_kernels.groups import advantages_from_rewards, make_groups
from frpo_kernels.objective import LossConfig, k3_kl, kl_weights, policy_loss
from frpo_kernels.ops.token_logprobs import fused_loss, token_logprobs as _token_logprobs


def loss(logits, completion_ids, completion_mask=None, *, advantages=None, rewards=None,
         group_size=None, group_ids=None, old_logps=None, ref_logps=None, loss_type="frpo",
         lam=1.0, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None, jackknife=True,
         baseline=True, importance_sampling_level="token", scale_rewards=False, temperature=1.0,
         max_completion_length=None, backend="auto", return_metrics=False):
    """FRPO (arXiv 2602.08813) or a GRPO-family loss from completion logits.

    logits [B, T, V] predict completion_ids [B, T]; completion_mask [B, T] (None: all tokens).
    Exactly one of advantages/rewards [B] and one of group_size/group_ids. Returns the scalar loss,
    or (loss, metrics) with return_metrics=True. Formulas: see README.md, "The loss".
    """
    checks.check_logits_and_ids(logits, completion_ids)
    batch, length, _ = logits.shape
    device = logits.device
    checks.check_token_tensor("completion_mask", completion_mask, (batch, length), device)
    checks.check_options(loss_type, lam, beta, epsilon_low, epsilon_high, delta,
                         importance_sampling_level, max_completion_length)
    checks.check_temperature(temperature)
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages and rewards (each of shape [B])")
    checks.check_finite_per_sequence("advantages" if rewards is None else "rewards",
                                     rewards if advantages is None else advantages, batch, device)
    checks.check_groups(batch, group_size, group_ids, device, jackknife and loss_type == "frpo")
    checks.check_token_tensor("old_logps", old_logps, (batch, length), device)
    checks.check_token_tensor("ref_logps", ref_logps, (batch, length), device)
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference policy's per-token log-probs)")
    name = resolve(backend, logits)

    cfg = LossConfig(loss_type, float(lam), float(beta), float(epsilon_low), float(epsilon_high),
                     None if delta is None else float(delta), jackknife, baseline,
                     importance_sampling_level, max_completion_length)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = torch.ones(batch, length, dtype=dtype, device=device) if completion_mask is None \
        else completion_mask.to(dtype)
    row_mask = mask != 0
    groups = make_groups(batch, group_size, group_ids, device)
    if advantages is None:
        if scale_rewards and bool((groups.counts < 2).any()):
            raise ValueError("scale_rewards=True needs >= 2 members per group (std of one reward)")
        advantages = advantages_from_rewards(rewards.to(dtype), groups, scale_rewards)
    advantages = advantages.to(dtype)
    ref = None if ref_logps is None else ref_logps.to(dtype)
    kl_coef = kl_weights(mask, cfg) if beta != 0 else None
    if name != "torch" and logits.stride(-1) != 1:
        logits = logits.contiguous()

    if name != "torch" and old_logps is None and logits.requires_grad and torch.is_grad_enabled():
        # On-policy: the ratios are exactly 1, so dloss/dlogp does not depend on logp except through
        # the row-local KL term; get it from the objective at any logp and fuse fwd+bwd in one pass.
        with torch.enable_grad():
            probe = torch.zeros(batch, length, dtype=dtype, device=device, requires_grad=True)
            policy_value, details = policy_loss(probe, probe.detach(), mask, advantages, groups, cfg)
            (coef,) = torch.autograd.grad(policy_value, probe)

        def value_from_logp(logp):
            value = policy_value.detach()
            return value if kl_coef is None else value + (kl_coef * k3_kl(logp.to(dtype), ref)).sum()

        result, logp, entropy = fused_loss(logits, completion_ids, row_mask, float(temperature), coef,
                                           kl_coef, ref, return_metrics, name, value_from_logp)
        logp = logp.to(dtype)
    else:
        logp, entropy = _token_logprobs(logits, completion_ids, row_mask, float(temperature),
                                        return_metrics, name)
        logp = logp.to(dtype)
        old = logp.detach() if old_logps is None else old_logps.to(dtype)
        result, details = policy_loss(logp, old, mask, advantages, groups, cfg)
        if kl_coef is not None:
            result = result + (kl_coef * k3_kl(logp, ref)).sum()
    if not return_metrics:
        return result
    return result, _metrics(logp.detach(), None if entropy is None else entropy.detach(), mask, ref,
                            details, groups, cfg)


def _metrics(logp, entropy, mask, ref, details, groups, cfg):
    tokens = mask.sum().clamp_min(1)

    def masked_mean(x):
        return x.float().mean() if x.shape[-1] == 1 and mask.shape[-1] != 1 else (x * mask).sum() / tokens

    c1, adv = details["c1"].detach(), details["adv"]
    low = (c1 < 1 - cfg.epsilon_low) & (adv < 0)
    high = (c1 > 1 + cfg.epsilon_high) & (adv > 0)
    metrics = {
        "entropy": masked_mean(entropy) if entropy is not None else None,
        "clip_ratio/low_mean": masked_mean(low.to(mask.dtype)),
        "clip_ratio/high_mean": masked_mean(high.to(mask.dtype)),
        "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype)),
        "num_groups": groups.num,
    }
    if ref is not None:
        metrics["kl"] = masked_mean(k3_kl(logp, ref))
    if cfg.loss_type == "frpo":
        w, u = details["w"].detach(), details["u"].detach()
        metrics.update({"frpo/w_mean": w.mean(), "frpo/w_max": w.max(), "frpo/u_mean": u.mean(),
                        "frpo/u_min": u.min(), "frpo/u_max": u.max()})
    return metrics


def token_logprobs(logits, ids, temperature=1.0, return_entropy=False, backend="auto", mask=None):
    """log_softmax(logits / temperature)[ids] as [B, T] float32 (float64 for float64 logits),
    differentiable; with return_entropy also the per-token entropy. mask [B, T] skips rows."""
    checks.check_logits_and_ids(logits, ids, "ids")
    checks.check_temperature(temperature)
    checks.check_token_tensor("mask", mask, tuple(logits.shape[:2]), logits.device)
    name = resolve(backend, logits)
    if name != "torch" and logits.stride(-1) != 1:
        logits = logits.contiguous()
    row_mask = None if mask is None else mask != 0
    logp, entropy = _token_logprobs(logits, ids, row_mask, float(temperature), return_entropy, name)
    return (logp, entropy) if return_entropy else logp


def group_advantages(rewards, group_size=None, group_ids=None, scale_rewards=False):
    """Group-relative advantages A_i = r_i - mean_g(r) [/ (std_g(r) + 1e-4)] for rewards [B]."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty tensor of shape [B], got {checks._describe(rewards)}")
    checks.check_finite_per_sequence("rewards", rewards, rewards.shape[0], rewards.device)
    checks.check_groups(rewards.shape[0], group_size, group_ids, rewards.device, jackknife=False)
    groups = make_groups(rewards.shape[0], group_size, group_ids, rewards.device)
    if scale_rewards and bool((groups.counts < 2).any()):
        raise ValueError("scale_rewards=True needs >= 2 members per group (std of one reward)")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages_from_rewards(rewards.to(dtype), groups, scale_rewards)
