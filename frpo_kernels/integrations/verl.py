"""verl integration: FRPO as a verl advantage estimator plus a verl policy loss, both named "frpo".

Importing this module registers them with verl's own registries (verl.trainer.ppo.core_algos):
  register_adv_est("frpo")      compute_frpo_outcome_advantage: runs once per rollout batch in the
      driver, sees the whole batch and its group index `uid`, computes frpo_kernels.group_stats of it
      and writes, for every token of row j, FRPO's per-row gradient coefficient (frpo_token_advantages).
  register_policy_loss("frpo")  compute_policy_loss_frpo: runs on every micro-batch in the workers
      and turns those coefficients into a clipped surrogate whose gradient is FRPO's.
Select them by config (verl 0.9.x, hydra overrides of verl.trainer.main_ppo):

    algorithm.adv_estimator=frpo
    actor_rollout_ref.actor.policy_loss.loss_mode=frpo
    actor_rollout_ref.model.external_lib=frpo_kernels.integrations.verl
    +algorithm.frpo.lam=1.0 +algorithm.frpo.jackknife=true +algorithm.frpo.baseline=true   # optional

external_lib is imported by every verl process that builds the model config (the driver, which
computes advantages, and every actor worker), so both registrations exist where verl looks them up.
(VERL_USE_EXTERNAL_MODULES=frpo_kernels.integrations.verl does the same where the variable reaches
every Ray worker.) The two must be used together: the "frpo" loss reads FRPO coefficients, not
advantages, and the "frpo" estimator's output is not an advantage for verl's other losses.

Options. algorithm.frpo.{lam, jackknife, baseline, scale_rewards} are frpo_kernels.loss()'s (README,
"The loss"; any other key is an error). scale_rewards defaults to "group" when verl's
algorithm.norm_adv_by_std_in_grpo is true (verl's default) and to "none" otherwise; advantages are
frpo_kernels', A = (r - mean_g r) / (std_g + 1e-4), r = token_level_rewards summed over the row. The
clip is the actor's: epsilon_high = actor.clip_ratio_high (or clip_ratio); epsilon_low has no effect on
FRPO (min(r, clip(r, 1 - eps_low, 1 + eps_high)) = min(r, 1 + eps_high)); FRPO's delta cap and
sequence-level importance sampling are not available. Rows whose response_mask is all 0 are not
samples (README): coefficient 0, left out of the group statistics.

How it works. FRPO's loss is L = max(lam, 1) * [mean_g J_g(s) - baseline * mean_g mean_{i in g} o_i],
s_i = w_i * o_i, w_i = exp(-A_i / lam), o_i = mean_t min(r_it, 1 + eps_high) over the row's tokens,
r the token ratio pi / pi_old (README). Its gradient with respect to row j's tokens is
  dL/dlogp_jt = c_j(theta) * do_j/dlogp_jt,
  c_j = max(lam, 1) / N * (kappa_j * w_j - baseline / n_g),   kappa_j = dJ_g/ds_j (group_stats.py),
  do_j/dlogp_jt = m_jt * r_jt * [r_jt < 1 + eps_high] / T_j,   T_j = sum_t m_jt,
with N the groups that have a response token and n_g the rows of j's group that do. verl gives a
policy loss no group ids, only per-token `advantages`, so the estimator writes the coefficient there:
advantages_jt = a_j = -B * c_j(theta_old) on the row's tokens (B = rows of the rollout batch; a_j is
like an advantage: max(lam, 1) * (1 - w_j / mean_g w) for a full group with the baseline and without
jackknife). The loss builds, per token, -a_j * min(r_jt, 1 + eps_high) / T_j and aggregates it with verl's
own agg_loss(..., "seq-mean-token-sum", **config.global_batch_info): the micro-batch's rows summed and
divided by global_batch_size M (verl: ppo_mini_batch_size * rollout.n rows of the whole mini-batch,
over all data-parallel ranks), times dp_size, which verl's gradient average over ranks cancels.
So a mini-batch's accumulated gradient is (B / M) * sum over its rows of c_j * do_j, whatever its
split into micro-batches (fixed size or dynamic by tokens) and data-parallel ranks: the division is
by a constant of the whole mini-batch, never by micro-batch counts.

actor.loss_agg_mode does not change this loss: FRPO's token mean per row and mean over groups are
part of its definition, so every mode gives the same FRPO gradient (verl still uses the mode for its
entropy and KL-loss terms; FRPO's beta * k3 term is verl's use_kl_loss with kl_loss_type=low_var_kl
and loss_agg_mode=seq-mean-token-mean, up to verl's +1e-8 in T_j and its clamp of k3 to 10).

What is exact and what is first order.
  Exact, at the rollout policy (log_prob == old_log_prob: the first mini-batch of the first PPO epoch;
  verl recomputes old_log_prob with the actor before updating): the gradient of one mini-batch that
  holds the whole rollout batch (ppo_mini_batch_size = data.train_batch_size, so M = B) is the
  whole-batch FRPO gradient of frpo_kernels.loss(), for any micro-batch / data-parallel split and any
  loss_agg_mode. With several mini-batches the first one's gradient is exactly B/M times its rows'
  share of the whole-batch gradient (the unbiased estimate verl's GRPO mini-batches also make).
  Exact at any policy: the clip structure (a token with r_jt > 1 + eps_high has gradient 0; the
  factor r_jt of the others is live), the baseline part of c_j (-baseline / n_g, linear in o),
  max(lam, 1) / N and the weights w_j (rewards do not move).
  First order once the policy has moved within the rollout batch (later mini-batches, ppo_epochs > 1,
  or a stale old_log_prob such as verl's bypass mode): kappa_j stays at its rollout value. kappa_j
  depends on every s_i of j's group (u_g and its leave-one-out means), which move with the policy
  through o_i, so the surrogate is J linearised in o around the rollout policy: its gradient differs
  from FRPO's exact gradient by O(policy change), and its value (actor/pg_loss) moves with FRPO's loss
  to first order but is not FRPO's loss. frpo_kernels.loss(..., group_stats=...) with off-policy
  group_stats is the exact alternative; verl's per-micro-batch loss cannot recompute group sums.
rollout_is_weights (verl's rollout correction) multiply the per-token terms, as in verl's "vanilla".

Tested with verl 0.9.1 (tests/test_verl_integration.py, in the virtual environment that
scripts/verl_env.sh makes): verl's agg_loss, its ppo_loss (workers/utils/losses.py), its
compute_advantage and its micro-batch splitters, against frpo_kernels.loss() in float64.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import verl
from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss

import frpo_kernels
from frpo_kernels.lam_auto import lam_scale

NAME = "frpo"
TESTED_VERL_VERSIONS = ("0.9.1",)
OPTIONS = ("lam", "jackknife", "baseline", "scale_rewards")

if verl.__version__ not in TESTED_VERL_VERSIONS:
    warnings.warn(f"frpo_kernels.integrations.verl was tested with verl {', '.join(TESTED_VERL_VERSIONS)}; found "
                  f"{verl.__version__}: check that its policy-loss interface and agg_loss are unchanged", stacklevel=2)


def frpo_options(config=None) -> dict:
    """FRPO's options from verl's algorithm config: its `frpo` mapping (lam, jackknife, baseline,
    scale_rewards) and, for scale_rewards when not given, norm_adv_by_std_in_grpo."""
    get = (lambda key, default: default) if config is None else config.get
    given = get(NAME, None)
    given = {} if given is None else {str(key): given[key] for key in given}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"algorithm.{NAME} has unknown keys {unknown}; FRPO's options are {list(OPTIONS)}")
    options = dict(lam=1.0, jackknife=True, baseline=True)
    options.update(given)
    if options.get("scale_rewards") is None:
        options["scale_rewards"] = "group" if get("norm_adv_by_std_in_grpo", True) else "none"
    if options["lam"] == "auto":
        raise ValueError(f"algorithm.{NAME}.lam=auto (per-group lam from a KL radius) is not supported by the verl "
                         "integration yet; give a number > 0, or use frpo_kernels.loss / FRPOTrainer")
    try:
        options["lam"] = float(options["lam"])
    except (TypeError, ValueError):
        raise ValueError(f"algorithm.{NAME}.lam must be a number > 0, got {options['lam']!r}") from None
    return options


def group_ids_of(index, batch: int, device=None) -> torch.Tensor:
    """int64 group ids [B] for verl's `uid` index (one hashable id per row, e.g. strings), numbered
    in order of first appearance."""
    if index is None:
        raise ValueError("FRPO needs the rows' group index: verl passes data.non_tensor_batch['uid'] as index")
    keys = index.tolist() if isinstance(index, (np.ndarray, torch.Tensor)) else list(index)
    if len(keys) != batch:
        raise ValueError(f"index has {len(keys)} entries for {batch} rows")
    numbers: dict = {}
    ids = [numbers.setdefault(key, len(numbers)) for key in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)


def frpo_row_coefficients(response_mask, rewards, group_ids, *, lam=1.0, jackknife=True, baseline=True,
                          scale_rewards="none") -> torch.Tensor:
    """c_j [B] float64: FRPO's loss gradient, at the on-policy point, with respect to o_j (row j's
    token mean of min(ratio, 1 + eps_high)): max(lam, 1) / N * (kappa_j w_j - baseline / n_g), 0 for a
    row without a response token. rewards [B] per row; group_ids [B] ints (any order)."""
    mask = response_mask.to(torch.float64)
    rewards = rewards.to(torch.float64)
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_ids=group_ids, lam=lam, jackknife=jackknife,
                                     baseline=baseline, scale_rewards=scale_rewards)
    index = stats.index_of(group_ids)
    valid = mask.sum(-1) > 0
    lams = stats.lams[index]  # each row's group's lam, resolved once by group_stats
    log_s = -stats.advantages(rewards, index) / lams  # on-policy: o_j = 1, so s_j = w_j
    kappa_w = stats.kappa_times_s(log_s, index)      # kappa_j * s_j = kappa_j * w_j
    coefficient = kappa_w - (1 / stats.n[index].clamp_min(1) if baseline else 0)
    scale = lam_scale(stats.lams)[index] / max(stats.num_nonempty, 1)
    return torch.where(valid, coefficient * scale, torch.zeros_like(coefficient))


def frpo_token_advantages(token_level_rewards, response_mask, index, *, lam=1.0, jackknife=True, baseline=True,
                          scale_rewards="none") -> torch.Tensor:
    """The per-token "advantages" [B, T] that the "frpo" policy loss turns into FRPO's gradient:
    -B * c_j (frpo_row_coefficients) on row j's response tokens, 0 elsewhere. token_level_rewards
    [B, T] (summed per row, as verl's outcome estimators do), response_mask [B, T], index: verl's uid
    per row. In token_level_rewards' dtype (float32 for an integer one)."""
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"token_level_rewards and response_mask must be [B, T] of one shape, got "
                         f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}")
    batch = token_level_rewards.shape[0]
    group_ids = group_ids_of(index, batch, token_level_rewards.device)
    with torch.no_grad():
        c = frpo_row_coefficients(response_mask, token_level_rewards.sum(-1), group_ids, lam=lam,
                                  jackknife=jackknife, baseline=baseline, scale_rewards=scale_rewards)
        dtype = token_level_rewards.dtype if token_level_rewards.is_floating_point() else torch.float32
        tokens = response_mask > 0
        return torch.where(tokens, (-batch * c).unsqueeze(-1), torch.zeros_like(tokens, dtype=c.dtype)).to(dtype)


@register_adv_est(NAME)
def compute_frpo_outcome_advantage(token_level_rewards, response_mask, index=None, config=None, **unused):
    """verl advantage estimator "frpo" (called by verl's compute_advantage with the whole rollout batch):
    (advantages, returns), both frpo_token_advantages(...) with options from config (algorithm config)."""
    adv = frpo_token_advantages(token_level_rewards, response_mask, index, **frpo_options(config))
    return adv, adv


@register_policy_loss(NAME)
def compute_policy_loss_frpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             config=None, rollout_is_weights=None):
    """verl policy loss "frpo" for one micro-batch: sum over its rows of -a_j * mean_t min(r, 1 + eps_high)
    (a_j: the "frpo" estimator's advantages), through verl's agg_loss in "seq-mean-token-sum" mode with
    config.global_batch_info. loss_agg_mode is not used (see the module docstring)."""
    clip = 0.2 if config is None else config.clip_ratio
    eps_high = clip if config is None or config.get("clip_ratio_high", None) is None else config.clip_ratio_high
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.where(mask > 0, log_prob - old_log_prob, torch.zeros_like(log_prob))  # padding: any value
    # min(r, clip(r, 1 - eps_low, 1 + eps_high)) = min(r, 1 + eps_high): clamp the log-ratio, then exp
    # (no overflow; a clipped token has gradient exactly 0)
    term = torch.exp(log_ratio.clamp(max=math.log1p(eps_high)))
    lengths = mask.sum(-1, keepdim=True).clamp_min(1)
    losses = -advantages.to(log_prob.dtype) * term / lengths
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    info = {} if config is None else dict(config.global_batch_info)
    info.pop("loss_scale_factor", None)  # only "seq-mean-token-sum-norm" reads it
    loss = agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode="seq-mean-token-sum", **info)
    with torch.no_grad():
        tokens = mask.sum().clamp_min(1)
        clipfrac = ((log_ratio > math.log1p(eps_high)).to(mask.dtype) * mask).sum() / tokens
        ppo_kl = (-log_ratio * mask).sum() / tokens
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item()}
