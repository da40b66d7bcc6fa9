"""Public entry points: loss(), token_logprobs(), group_advantages().

Checks arguments, picks the backend (backends.resolve), runs the O(B*T*V) kernel and the O(B*T)
objective (objective.py). The fused one-pass path is used when old_logps is None (on-policy).
"""
from __future__ import annotations

import torch

from frpo_kernels import checks
from frpo_kernels.distributed import BatchSpan
from frpo_kernels.backends import resolve
from frpo_kernels.groups import advantages_from_rewards, make_groups
from frpo_kernels.objective import LossConfig, k3_kl, kl_weights, policy_loss
from frpo_kernels.ops.token_logprobs import fused_loss, token_logprobs as _token_logprobs


def loss(logits, completion_ids, completion_mask=None, *, advantages=None, rewards=None,
         group_size=None, group_ids=None, old_logps=None, ref_logps=None, loss_type="frpo",
         lam=1.0, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None, jackknife=True,
         baseline=True, importance_sampling_level="token", scale_rewards=False, temperature=1.0,
         max_completion_length=None, backend="auto", return_metrics=False, process_group=None,
         overwrite_logits=False):
    """FRPO (arXiv 2602.08813) or a GRPO-family loss from completion logits.

    logits [B, T, V] predict completion_ids [B, T]; completion_mask [B, T] (None: all tokens).
    Exactly one of advantages/rewards [B] and one of group_size/group_ids. Returns the scalar loss,
    or (loss, metrics) with return_metrics=True. Formulas: see README.md, "The loss".

    overwrite_logits=True lets the cpu/triton kernels write the logits' gradient into the logits'
    own storage (no new [B, T, V] buffer); the logits hold the gradient afterwards, so use it only
    when nothing else reads them (e.g. logits straight from the LM head).

    process_group (torch.distributed): groups may span the ranks of this group. Each rank passes its
    own rows; the global batch is the rank-major concatenation of all ranks' rows (batch sizes and T
    may differ per rank; token tensors are right-padded with mask 0 to the largest T). group_ids are
    global ids; group_size means contiguous groups over the global batch. The returned value is, on
    every rank, the single-process loss of the global batch; its gradient is world_size times the
    single-process gradient w.r.t. this rank's logits, so DDP's gradient average over ranks equals
    the single-process gradient. Only O(B*T) tensors are gathered; the fused kernel path stays on
    (its token gradient carries the world_size factor). Every rank must call loss() with the same
    options (loss_type, beta, advantages vs rewards, old_logps given or not, return_metrics).
    """
    checks.check_logits_and_ids(logits, completion_ids)
    checks.check_overwritable("overwrite_logits", overwrite_logits, logits)
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
    span = None if process_group is None else BatchSpan.create(process_group, batch, length, device)
    if span is None:
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
    if span is not None:  # from here on, the O(B*T) tensors describe the global batch
        group_ids, group_size = span.group_ids(batch, group_size, group_ids,
                                               jackknife and loss_type == "frpo"), None
        mask, batch, length = span.gather(mask), span.total, span.length
        rewards = None if rewards is None else span.gather(rewards.to(dtype))
        advantages = None if advantages is None else span.gather(advantages.to(dtype))
        ref_logps = None if ref_logps is None else span.gather(ref_logps.to(dtype))
        old_logps = None if old_logps is None else span.gather(old_logps.to(dtype))
    groups = make_groups(batch, group_size, group_ids, device)
    if advantages is None:
        checks.check_scale_rewards(scale_rewards, groups.counts)
        advantages = advantages_from_rewards(rewards.to(dtype), groups, scale_rewards)
    advantages = advantages.to(dtype)
    ref = _unmasked_only(ref_logps, mask)
    old_logps = _unmasked_only(old_logps, mask)
    kl_coef = kl_weights(mask, cfg) if beta != 0 else None

    # The fused path takes autograd.grad of a probe inside forward, which torch.compile cannot trace:
    # compiled graphs use the two-pass kernels instead.
    fused = name != "torch" and old_logps is None and logits.requires_grad and torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()
    path = _fused_path if fused else _two_pass_path
    result, logp, entropy, details = path(
        logits, completion_ids, row_mask, mask, advantages, groups, cfg, old_logps, ref, kl_coef,
        float(temperature), return_metrics, name, span, overwrite_logits)
    if not return_metrics:
        return result
    if span is not None and entropy is not None:
        entropy = span.gather(entropy.detach())
    return result, _metrics(logp.detach(), None if entropy is None else entropy.detach(), mask, ref,
                            details, groups, cfg)


def _unmasked_only(token_values, mask):
    """Per-token log-probs as mask.dtype with 0 where mask == 0: padding there (-inf, NaN) is never read."""
    if token_values is None:
        return None
    return torch.where(mask != 0, token_values.to(mask.dtype), torch.zeros_like(mask))


def _fused_path(logits, ids, row_mask, mask, advantages, groups, cfg, old_logps, ref, kl_coef,
                temperature, with_entropy, name, span, overwrite_logits):
    """On-policy: the ratios are exactly 1, so dloss/dlogp does not depend on logp except through the
    row-local KL term; take it from the objective at any logp and fuse fwd+bwd in one pass over V."""
    dtype = mask.dtype
    with torch.enable_grad():
        probe = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
        policy_value, details = policy_loss(probe, probe.detach(), mask, advantages, groups, cfg)
        (coef,) = torch.autograd.grad(policy_value, probe)
    local_kl_coef, local_ref, kernel_kl_coef = kl_coef, ref, kl_coef
    if span is not None:  # this rank's rows; the gradient carries the world_size factor
        coef = span.local(coef) * span.world
        local_ref = None if ref is None else span.local(ref)
        local_kl_coef = None if kl_coef is None else span.local(kl_coef)
        kernel_kl_coef = None if kl_coef is None else local_kl_coef * span.world

    def value_from_logp(logp):
        # the on-policy value does not read logp but for the KL term; `logp * 0` still makes a NaN
        # log-prob (a NaN logit) turn the value NaN, as it does on the two-pass path
        local = (logp.to(dtype) * 0).sum()
        if kl_coef is not None:
            local = local + (local_kl_coef * k3_kl(logp.to(dtype), local_ref)).sum()
        return policy_value.detach() + (local if span is None else span.all_sum(local))

    result, logp, entropy = fused_loss(logits, ids, row_mask, temperature, coef, kernel_kl_coef,
                                       local_ref, with_entropy, name, value_from_logp, overwrite_logits)
    logp = logp.to(dtype)
    if span is not None and with_entropy:
        logp = span.gather(logp.detach())
    return result, logp, entropy, details


def _two_pass_path(logits, ids, row_mask, mask, advantages, groups, cfg, old_logps, ref, kl_coef,
                   temperature, with_entropy, name, span, overwrite_logits):
    """Differentiable per-token log-probs (kernel forward now, kernel backward in backward), then
    the objective with autograd."""
    logp, entropy = _token_logprobs(logits, ids, row_mask, temperature, with_entropy, name,
                                    overwrite_logits)
    logp = logp.to(mask.dtype)
    if span is not None:
        logp = span.gather(logp)  # this rank's rows keep their gradient
    old = logp.detach() if old_logps is None else old_logps.to(mask.dtype)
    result, details = policy_loss(logp, old, mask, advantages, groups, cfg)
    if kl_coef is not None:
        result = result + (kl_coef * k3_kl(logp, ref)).sum()
    if span is not None:
        result = span.scale_gradient(result)
    return result, logp, entropy, details


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
    if cfg.loss_type == "frpo":  # exp of log-domain values: inf where lam is small enough to overflow
        w, log_u = details["log_w"].detach().exp(), details["log_u"].detach()
        nonempty = log_u > float("-inf")  # groups with at least one completion token
        u = log_u.exp()
        metrics.update({"frpo/w_mean": w.mean(), "frpo/w_max": w.max(),
                        "frpo/u_mean": torch.where(nonempty, u, 0).sum() / nonempty.sum().clamp_min(1),
                        "frpo/u_min": torch.where(nonempty, u, float("inf")).min(),
                        "frpo/u_max": u.max()})
    return metrics


def token_logprobs(logits, ids, temperature=1.0, return_entropy=False, backend="auto", mask=None):
    """log_softmax(logits / temperature)[ids] as [B, T] float32 (float64 for float64 logits),
    differentiable; with return_entropy also the per-token entropy. mask [B, T] skips rows."""
    checks.check_logits_and_ids(logits, ids, "ids")
    checks.check_temperature(temperature)
    checks.check_token_tensor("mask", mask, tuple(logits.shape[:2]), logits.device)
    name = resolve(backend, logits)
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
    checks.check_scale_rewards(scale_rewards, groups.counts)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages_from_rewards(rewards.to(dtype), groups, scale_rewards)
