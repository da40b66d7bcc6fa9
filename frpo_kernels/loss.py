"""Public entry points: loss(), linear_loss(), token_logprobs(), group_advantages().

loss() and linear_loss() differ only in where the per-token log-probs come from (logprob_sources:
the logits, or hidden states and the LM head); everything else is _loss(): checks, the backend
choice, the batch's O(B*T) tensors (gathered over ranks by a BatchSpan), and the objective. The
fused one-pass path runs on-policy (old_logps None) and for token-local losses (objective.is_token_local)
off-policy, unless an option needs the log-probs or entropies first (objective.one_pass_serves);
otherwise two passes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from frpo_kernels import checks
from frpo_kernels.backends import resolve
from frpo_kernels.backends.torch_reference import RatioGate
from frpo_kernels.config import LossConfig
from frpo_kernels.distributed import BatchSpan, LocalSpan, gather_token_factor, gather_unmasked, sum_over_ranks
from frpo_kernels.group_stats import GroupStats
from frpo_kernels.groups import Groups, advantages_from_rewards, make_groups
from frpo_kernels.lam_auto import resolve_group_lams
from frpo_kernels.logprob_sources import HiddenSource, LogitsSource
from frpo_kernels.loss_types import Metric
from frpo_kernels.objective import (fused_ratio_gate, high_entropy_mask, k3_kl, kl_weights, mean_bonus_entropy,
                                    off_policy_mask, one_pass_serves, per_token_kl, policy_loss, token_scale)
from frpo_kernels.ops.token_logprobs import token_logprobs as _token_logprobs


def loss(logits, completion_ids, completion_mask=None, *, overwrite_logits=False, **options):
    """FRPO (arXiv 2602.08813) or a GRPO-family loss from completion logits.

    logits [B, T, V] predict completion_ids [B, T]; completion_mask [B, T] (None: all tokens).
    Exactly one of advantages/rewards [B] and one of group_size/group_ids. Returns the scalar loss,
    or (loss, metrics) with return_metrics=True. Formulas: see README.md, "The loss"; the keywords
    are those of _loss below. completion_mask entries are token weights (finite, >= 0). rewards,
    advantages, old_logps and ref_logps are constants: no gradient reaches them, whatever the backend.

    overwrite_logits=True lets the cpu/triton kernels write the logits' gradient into the logits'
    own storage (no new [B, T, V] buffer); the logits hold the gradient afterwards, so use it only
    when nothing else reads them (e.g. logits straight from the LM head).
    """
    checks.check_logits_and_ids(logits, completion_ids)
    checks.check_overwritable("overwrite_logits", overwrite_logits, logits)

    def source(backend, temperature):
        return LogitsSource(logits, completion_ids, temperature, resolve(backend, logits), overwrite_logits)

    def check_ids(mask):
        checks.check_ids_in_range("completion_ids", completion_ids, logits.shape[-1], mask)
    return _loss(source, check_ids, logits, completion_mask, **options)


def linear_loss(hidden, weight, completion_ids, completion_mask=None, *, bias=None, **options):
    """loss(hidden @ weight.T + bias, completion_ids, completion_mask, **options) without the [B, T, V]
    logits: they exist only as tiles of rows (ops/linear_logprobs.py). Same value, same gradients
    w.r.t. hidden [B, T, H], weight [V, H] (the LM head; its GEMM is skipped when it is frozen, and
    a weight tied to the input embedding accumulates both) and bias [V]."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {tuple(hidden.shape)}")
    checks.check_linear_inputs(hidden, weight, bias, completion_ids, None, "completion_ids")

    def source(backend, temperature):
        return HiddenSource(hidden, weight, bias, completion_ids, temperature, resolve(backend, hidden))

    def check_ids(mask):
        checks.check_ids_in_range("completion_ids", completion_ids, weight.shape[0], mask, "weight.shape[0]")
    return _loss(source, check_ids, hidden, completion_mask, **options)


@dataclass
class _Batch:
    """The objective's O(B*T) inputs over the global batch (every rank's rows; one process: its own)."""
    mask: torch.Tensor        # [B, T] float64 (the objective runs in float64)
    row_mask: torch.Tensor    # this rank's rows, bool: which rows the kernels compute
    advantages: torch.Tensor  # [B]
    groups: Groups
    old: torch.Tensor | None  # [B, T], 0 where mask == 0
    ref: torch.Tensor | None
    kl_coef: torch.Tensor | None  # [B, T]: the loss adds sum(kl_coef * per_token_kl)
    stats: GroupStats | None = None  # a micro-batch of the batch these describe
    lams: torch.Tensor | None = None  # [groups.num] each group's lam (FRPO; lam_auto.resolve_group_lams)
    is_ratio: torch.Tensor | None = None  # [B, T] or [B, 1] importance_sampling_ratio, 1 where mask == 0
    sampling: torch.Tensor | None = None  # [B, T] sampling_logps, 0 where mask == 0


def _loss(make_source, check_ids, like, completion_mask, *, advantages=None, rewards=None, group_size=None,
          group_ids=None, old_logps=None, ref_logps=None, loss_type="frpo", lam=1.0, beta=0.0,
          epsilon_low=0.2, epsilon_high=0.2, delta=None, jackknife=True, baseline=True,
          importance_sampling_level="token", scale_rewards=False, temperature=1.0,
          max_completion_length=None, kl_radius=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
          vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
          use_bias_correction_kl=False, importance_sampling_ratio=None, off_policy_mask_threshold=None,
          sampling_logps=None, top_entropy_quantile=1.0, entropy_coef=0.0, num_items_in_batch=None,
          backend="auto", return_metrics=False, process_group=None, group_stats=None):
    """The loss of loss() / linear_loss(); `like` (logits or hidden) gives [B, T], device and dtype;
    check_ids(completion_mask) checks the range of completion_ids where the mask reads them.

    loss_type: one of loss_types.NAMES (frpo, grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo); the
    GRPO family's formulas, options and defaults are TRL 1.16's GRPOTrainer's (README.md, "The loss"):
    sapo_temperature_pos / _neg (sapo's gate), vespo_k_pos / vespo_lambda_pos / vespo_k_neg /
    vespo_lambda_neg (vespo's gamma weights); cispo caps the ratio at epsilon_high itself.
    use_bias_correction_kl: the KL term's k3 times the importance ratio (TRL's; its default there is True).
    importance_sampling_ratio [B, T] or [B, 1] (constant; TRL's vLLM correction): multiplies each token's
      policy loss (vespo: enters its gamma weights instead, [B, T] only).
    off_policy_mask_threshold with sampling_logps [B, T] (default old_logps, else the current log-probs,
      detached): drops the rows with A < 0 whose mean sampling_logps - logp exceeds the threshold (TRL's).
    top_entropy_quantile < 1: only the tokens whose entropy is in the top quantile of the batch's completion
      tokens (all ranks' with process_group) keep their policy loss (TRL's entropy mask).
    entropy_coef: the loss minus entropy_coef times the mean entropy over the (entropy-masked) completion
      tokens, with its gradient (TRL's bonus; with group_stats the rows' share: divided by the whole
      batch's completion tokens).
    num_items_in_batch (dapo, cispo, vespo): the token count their token sum is divided by; default the
      completion tokens of the batch (all ranks' with process_group, the whole batch's with group_stats).
      bnpo always divides by the batch's tokens, dr_grpo by rows x max_completion_length.
    The masks and the ratio multiply each token's policy loss (FRPO: inside o_i), never the KL term.

    process_group (torch.distributed): groups may span the ranks of this group. Each rank passes its
    own rows; the global batch is the rank-major concatenation of all ranks' rows (batch sizes and T
    may differ per rank; token tensors are right-padded with mask 0 to the largest T). group_ids are
    global ids; group_size means contiguous groups over the global batch. The returned value is, on
    every rank, the single-process loss of the global batch; its gradient is world_size times the
    single-process gradient w.r.t. this rank's inputs, so DDP's gradient average over ranks equals
    the single-process gradient. Only O(B*T) tensors are gathered; the fused kernel path stays on
    (its token gradient carries the world_size factor). Every rank must call with the same options
    (loss_type, beta, advantages vs rewards, old_logps given or not, return_metrics).

    lam="auto" with kl_radius=rho (FRPO): each group's lam maximises its inner problem's dual, i.e. the
    tilted weights exp(-A/lam) over the group have KL rho from uniform (lam_auto.py), clamped to [1e-2, 1e2];
    the groups are the global ones (process_group) or the generation batch's (group_stats).

    group_stats (from frpo_kernels.group_stats on the whole generation batch): these rows are a
    micro-batch of that batch, identified by their global group_ids; the result is their share, and
    the shares of any partition of the batch add up to its loss in value and gradient. With
    process_group too, the value is the sum of every rank's share and the gradient world_size times
    this rank's (the same DDP convention).
    """
    cfg = LossConfig(loss_type=loss_type, lam=lam, beta=beta, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, delta=delta, jackknife=jackknife, baseline=baseline,
                     importance_sampling_level=importance_sampling_level,
                     max_completion_length=max_completion_length, scale_rewards=scale_rewards,
                     temperature=temperature, kl_radius=kl_radius, sapo_temperature_pos=sapo_temperature_pos,
                     sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                     vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
                     use_bias_correction_kl=use_bias_correction_kl, off_policy_mask_threshold=off_policy_mask_threshold,
                     top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef,
                     num_items_in_batch=num_items_in_batch)
    batch, length = like.shape[:2]
    device = like.device
    checks.check_token_tensor("completion_mask", completion_mask, (batch, length), device)
    checks.check_token_weights("completion_mask", completion_mask)
    check_ids(completion_mask)
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages and rewards (each of shape [B])")
    checks.check_finite_per_sequence("advantages" if rewards is None else "rewards",
                                     rewards if advantages is None else advantages, batch, device)
    checks.check_token_tensor("old_logps", old_logps, (batch, length), device, floating=True)
    checks.check_token_tensor("ref_logps", ref_logps, (batch, length), device, floating=True)
    checks.check_ratio_and_sampling_logps(cfg, importance_sampling_ratio, sampling_logps, batch, length, device,
                                          completion_mask)
    if group_stats is not None and cfg.top_entropy_quantile < 1:
        raise NotImplementedError(f"top_entropy_quantile={cfg.top_entropy_quantile} with group_stats: the entropy "
                                  "quantile would have to be the whole generation batch's; score the batch in "
                                  "one call, or use top_entropy_quantile=1.0")
    group_size = checks.optional_positive_int("group_size", group_size)
    # Data, not parameters (as in TRL): detached here, every backend and path (fused, two-pass,
    # group_stats) gives them no gradient, where autograd alone would differ between paths.
    advantages, rewards, old_logps, ref_logps, importance_sampling_ratio, sampling_logps = (
        None if t is None else t.detach()
        for t in (advantages, rewards, old_logps, ref_logps, importance_sampling_ratio, sampling_logps))
    if cfg.beta != 0 and ref_logps is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logps (the reference policy's per-token log-probs)")
    # The O(B*T) objective runs in float64 whatever the logits' dtype: it costs nothing next to the
    # vocabulary sweep, and FRPO's log-domain terms (-A/lam, in the thousands for small lam) keep
    # their digits. The result comes back in float32 (float64 for float64 inputs).
    mask = torch.ones(batch, length, dtype=torch.float64, device=device) if completion_mask is None \
        else completion_mask.to(torch.float64)
    tokens = dict(old=old_logps, ref=ref_logps, is_ratio=importance_sampling_ratio, sampling=sampling_logps)
    if group_stats is None:
        span = BatchSpan.create(process_group, batch, length, device)
        group_size, group_ids = span.groups(group_size, group_ids, cfg.frpo_jackknife)
        data = _global_batch(cfg, span, mask, advantages, rewards, group_size, group_ids, **tokens)
    else:
        span = LocalSpan(batch, length, device)
        data = _micro_batch(cfg, group_stats, mask, advantages, rewards, group_size, group_ids, **tokens)
    source = make_source(backend, cfg.temperature)
    # The fused path takes autograd.grad of a probe inside forward, which torch.compile cannot trace:
    # compiled graphs use the two-pass kernels instead.
    fused = source.backend != "torch" and one_pass_serves(cfg, old_logps is None) and source.requires_grad \
        and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    result, logp, entropy, details = (_fused_path if fused else _two_pass_path)(
        source, data, cfg, span, return_metrics)
    if group_stats is not None and process_group is not None:
        result = sum_over_ranks(result, process_group)
    result = result.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
    if not return_metrics:
        return result
    return result, _metrics(logp.detach(), entropy, data, details, cfg)


def _with_options_signature(public):
    """help(loss) lists every keyword of _loss, the one place they and their defaults are written."""
    own = [p for p in inspect.signature(public).parameters.values() if p.kind != p.VAR_KEYWORD]
    shared = [p for p in inspect.signature(_loss).parameters.values() if p.kind == p.KEYWORD_ONLY]
    public.__signature__ = inspect.Signature(own + shared)


_with_options_signature(loss)
_with_options_signature(linear_loss)


def _global_batch(cfg, span, mask, advantages, rewards, group_size, group_ids, old, ref, is_ratio, sampling):
    dtype, device = mask.dtype, mask.device
    row_mask = mask != 0
    mask = span.gather(mask)
    groups = make_groups(span.total, group_size, group_ids, device)
    if advantages is None:
        checks.check_scale_rewards(cfg.scale_rewards, groups.counts)
        advantages = advantages_from_rewards(span.gather(rewards.to(dtype)), groups, cfg.scale_rewards)
    else:
        advantages = span.gather(advantages.to(dtype))
    return _Batch(mask, row_mask, advantages, groups, gather_unmasked(span, old, mask),
                  gather_unmasked(span, ref, mask), kl_weights(mask, cfg) if cfg.beta != 0 else None,
                  lams=resolve_group_lams(cfg, advantages, mask.sum(-1) > 0, groups),
                  is_ratio=gather_token_factor(span, is_ratio, mask), sampling=gather_unmasked(span, sampling, mask))


def _micro_batch(cfg, stats, mask, advantages, rewards, group_size, group_ids, old, ref, is_ratio, sampling):
    """A micro-batch of the batch `stats` describe: its rows' groups are positions in the statistics,
    and the loss types normalise by the whole batch's size."""
    if not isinstance(stats, GroupStats):
        raise TypeError(f"group_stats must come from frpo_kernels.group_stats(), got {type(stats).__name__}")
    stats.check_matches(cfg)
    if group_size is not None or group_ids is None:
        raise ValueError("with group_stats pass group_ids (the rows' global group ids); group_size is "
                         "ambiguous for part of a batch")
    checks.check_group_ids(group_ids, mask.shape[0], mask.device)
    index = stats.index_of(group_ids)
    groups = Groups(index, stats.n.long(), stats.n.numel())
    local = LocalSpan(*mask.shape, mask.device)
    advantages = stats.advantages(rewards, index) if advantages is None else advantages
    return _Batch(mask, mask != 0, advantages.to(mask.dtype), groups, gather_unmasked(local, old, mask),
                  gather_unmasked(local, ref, mask),
                  kl_weights(mask, cfg, stats.size) if cfg.beta != 0 else None, stats, stats.lams,
                  is_ratio=gather_token_factor(local, is_ratio, mask), sampling=gather_unmasked(local, sampling, mask))


def _fused_path(source, data, cfg, span, with_entropy):
    """One pass over V: each token's dloss/dlogp is known once its row is read. On-policy the ratios are
    exactly 1, so it does not depend on logp but through the row-local KL term: take it from the
    objective at any logp. Off-policy, for a token-local loss, it is the loss type's kernel gate. A constant
    importance-sampling ratio multiplies either coefficient."""
    dtype = data.mask.dtype
    q = token_scale(cfg, data.is_ratio)  # one_pass_serves: no masks here
    objective = dict(stats=data.stats, lams=data.lams, q=q, importance_sampling_ratio=data.is_ratio)
    gate = None
    if data.old is None:
        with torch.enable_grad():
            probe = torch.zeros(data.mask.shape, dtype=dtype, device=data.mask.device, requires_grad=True)
            policy_value, details = policy_loss(probe, probe.detach(), data.mask, data.advantages, data.groups,
                                                cfg, **objective)
            (coef,) = torch.autograd.grad(policy_value, probe)
    else:
        coef, lo, hi, kind = fused_ratio_gate(data.mask, data.advantages, cfg,
                                              None if data.stats is None else data.stats.size, q)
        gate = RatioGate(*(span.local(t) for t in (data.old, lo, hi)), kind)
        details = {}
    # this rank's rows; their gradient carries the world_size factor (see _loss)
    coef = span.local(coef) * span.world
    ref = None if data.ref is None else span.local(data.ref)
    kl_coef = None if data.kl_coef is None else span.local(data.kl_coef)

    def value_from_logp(logp):
        logp = logp.to(dtype)
        local = torch.zeros((), dtype=dtype, device=logp.device)
        if kl_coef is not None:
            local = local + (kl_coef * k3_kl(logp, ref)).sum()
        if gate is None and not cfg.kind.value_reads_logp:
            # the on-policy value does not read logp but for the KL term; `logp * 0` still makes the value
            # NaN where the two-pass path's ratio exp(logp - logp) is NaN: a NaN log-prob, or a -inf one
            return policy_value.detach() + span.all_sum(local + (logp * 0).sum())
        # the objective at logp: NaN spreads from a NaN log-prob, and off-policy a -inf one is a ratio of 0
        full = span.gather(logp)
        value, at_logp = policy_loss(full, full if data.old is None else data.old, data.mask, data.advantages,
                                     data.groups, cfg, **objective)
        details.update(at_logp)  # the metrics' clip counts need the ratios at this logp
        return value + span.all_sum(local)

    entropy_coef = bonus_tokens = None
    if cfg.entropy_coef != 0:  # the bonus -coef * sum(H m) / sum(m): dloss/dH = -coef m / sum(m) per token
        bonus_tokens = data.mask.sum().clamp(min=1.0) if data.stats is None else data.stats.size.tokens
        entropy_coef = span.local(-cfg.entropy_coef * data.mask / bonus_tokens) * span.world
    result, logp, entropy = source.fused(data.row_mask, coef, None if kl_coef is None else kl_coef * span.world,
                                         ref, with_entropy, value_from_logp, gate, entropy_coef=entropy_coef)
    logp = logp.to(dtype)
    if with_entropy or entropy_coef is not None:
        logp, entropy = span.gather(logp.detach()), span.gather(entropy.detach())
    if entropy_coef is not None:  # the bonus's value; its gradient is already in the sweep
        result = result - cfg.entropy_coef * mean_bonus_entropy(entropy.to(dtype), data.mask, None, bonus_tokens)
    return result, logp, entropy if with_entropy else None, details


def _two_pass_path(source, data, cfg, span, with_entropy):
    """Differentiable per-token log-probs (and entropies, when the loss or the metrics read them): kernel
    forward now, kernel backward in backward; then the masks, the objective, the KL term and the entropy
    bonus with autograd."""
    logp, entropy = source.two_pass(data.row_mask, with_entropy or cfg.needs_entropy)
    logp = span.gather(logp.to(data.mask.dtype))  # this rank's rows keep their gradient
    if entropy is not None:
        entropy = span.gather(entropy)  # in the kernels' dtype: TRL's entropy quantile is float32's
    old = logp.detach() if data.old is None else data.old
    row_keep = entropy_mask = None
    if cfg.off_policy_mask_threshold is not None:
        row_keep = off_policy_mask(data.advantages, logp, old if data.sampling is None else data.sampling,
                                   data.mask, cfg.off_policy_mask_threshold)
    if cfg.top_entropy_quantile < 1:
        entropy_mask = high_entropy_mask(entropy, data.mask, cfg.top_entropy_quantile)
    q = token_scale(cfg, data.is_ratio, row_keep, entropy_mask)
    result, details = policy_loss(logp, old, data.mask, data.advantages, data.groups, cfg, data.stats, data.lams, q,
                                  data.is_ratio)
    if data.kl_coef is not None:
        result = result + (data.kl_coef * per_token_kl(logp, old, data.ref, data.mask, cfg)).sum()
    if cfg.entropy_coef != 0:
        tokens = None if data.stats is None else data.stats.size.tokens  # a share of the whole batch's bonus
        result = result - cfg.entropy_coef * mean_bonus_entropy(entropy.to(data.mask.dtype), data.mask, entropy_mask,
                                                                tokens)
    details["entropy_mask"] = entropy_mask
    return span.scale_gradient(result), logp, None if entropy is None else entropy.detach(), details


def _metrics(logp, entropy, data, details, cfg):
    """TRL's metrics (the loss type's own from its registry entry), over the batch's rows (all ranks' with
    process_group)."""
    mask = data.mask
    tokens = mask.sum().clamp_min(1)

    def masked_mean(x):
        return x.float().mean() if x.shape[-1] == 1 and mask.shape[-1] != 1 else (x * mask).sum() / tokens

    def row_means(x):  # NaN for a row without completion tokens, as TRL's
        return x.float().squeeze(-1) if x.shape[-1] == 1 and mask.shape[-1] != 1 else (x * mask).sum(-1) / mask.sum(-1)

    def row_extreme(x, pick):  # TRL's nanmin / nanmax
        rows = row_means(x)
        rows = rows[~torch.isnan(rows)]
        return pick(rows) if rows.numel() else torch.tensor(float("nan"), dtype=rows.dtype, device=rows.device)

    reduce = {"mean": masked_mean, "row_min": lambda x: row_extreme(x, torch.min),
              "row_max": lambda x: row_extreme(x, torch.max)}
    metrics = {"entropy": masked_mean(entropy) if entropy is not None else None, "num_groups": data.groups.num}
    for name, value in cfg.kind.metrics(details, cfg).items():
        metrics[name] = reduce[value.how](value.values.to(mask.dtype)) if isinstance(value, Metric) else value
    if data.ref is not None:
        metrics["kl"] = masked_mean(per_token_kl(logp, logp if data.old is None else data.old, data.ref, mask, cfg))
    if entropy is not None:  # the entropy bonus's tokens (the trainer's adaptive coefficient reads them)
        entropy_mask = details.get("entropy_mask")
        effective = mask if entropy_mask is None else mask * entropy_mask
        metrics["entropy_bonus/sum"] = (entropy * effective).sum()
        metrics["entropy_bonus/count"] = effective.sum()
    return metrics


def token_logprobs(logits, ids, temperature=1.0, return_entropy=False, backend="auto", mask=None):
    """log_softmax(logits / temperature)[ids] as [B, T] float32 (float64 for float64 logits),
    differentiable; with return_entropy also the per-token entropy. mask [B, T] (finite, >= 0):
    rows where it is 0 are skipped."""
    checks.check_logits_and_ids(logits, ids, "ids")
    checks.check_temperature(temperature)
    checks.check_token_tensor("mask", mask, tuple(logits.shape[:2]), logits.device)
    checks.check_token_weights("mask", mask)
    checks.check_ids_in_range("ids", ids, logits.shape[-1], mask)
    name = resolve(backend, logits)
    row_mask = None if mask is None else mask != 0
    logp, entropy = _token_logprobs(logits, ids, row_mask, float(temperature), return_entropy, name)
    return (logp, entropy) if return_entropy else logp


def group_advantages(rewards, group_size=None, group_ids=None, scale_rewards=False):
    """Group-relative advantages A_i = r_i - mean_g(r) for rewards [B], divided by (std + 1e-4) as
    scale_rewards says: True / "group" (the group's std), "batch" (the batch's), False / "none"."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty tensor of shape [B], got {checks._describe(rewards)}")
    checks.check_finite_per_sequence("rewards", rewards, rewards.shape[0], rewards.device)
    group_size = checks.optional_positive_int("group_size", group_size)
    checks.check_groups(rewards.shape[0], group_size, group_ids, rewards.device, jackknife=False)
    checks.check_scale_rewards_name(scale_rewards)
    groups = make_groups(rewards.shape[0], group_size, group_ids, rewards.device)
    checks.check_scale_rewards(scale_rewards, groups.counts)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages_from_rewards(rewards.to(dtype), groups, scale_rewards)
