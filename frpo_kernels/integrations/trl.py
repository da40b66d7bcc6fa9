"""TRL integration: FRPOTrainer is trl.GRPOTrainer with its loss computed by frpo_kernels.linear_loss()
from the model's final hidden states and LM head, so FRPO and every GRPOConfig loss run through this
package's kernels without ever building the [B, T, V] logits.

Tested with trl 1.16.0, transformers 5.24.0, accelerate 1.15.0, torch 2.13.0 (CPU). It overrides
two GRPOTrainer internals, which TRL may rename between releases:
  _generate_and_score_completions  adds "group_ids": TRL lays out a generation batch as contiguous
      blocks of num_generations completions of one prompt over the rank-major concatenation of all
      processes (its advantages are rewards.view(-1, G) of the gathered rewards, then sliced by
      process_index * B_local), so the global group id of local row i is (rank * B_local + i) // G.
      The ids travel with the rows through TRL's shuffle and split of the generation batch. For
      FRPO it also computes frpo_kernels.group_stats of the whole generation batch (all processes),
      so micro-batches may hold any part of any group: per_device_train_batch_size needs no relation
      to num_generations, and gradient accumulation over a generation batch gives the update of one
      big batch (exact on the first pass over it; with num_iterations > 1 later passes reuse the
      statistics of the sampling policy, a first-order approximation).
  _compute_loss  runs the model for its final hidden states of the completion positions and calls
      frpo_kernels.linear_loss() with the LM head (the logits exist only as tiles of rows).

For every loss type of GRPOTrainer (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) the value,
gradients and logged metrics are those of GRPOTrainer._compute_loss (tests/test_trl_parity.py): the
same options (importance-sampling level, delta, bias-corrected KL, entropy mask and bonus with the
adaptive controller, off-policy mask, vLLM importance-sampling correction, MoE router aux loss) and
the same normalisation: each process's own micro-batch (linear_loss without process_group, as TRL's
loss is per process), divided by the gradient-accumulation steps in training, and for dapo/cispo/vespo
by TRL's token count num_items_in_batch / num_processes * accumulation steps / steps_per_generation.
With top_entropy_quantile < 1 on several processes the loss runs over process_group=WORLD, because
TRL's entropy quantile is over all processes; every process then gets the loss of all processes' rows
(the same gradient after DDP's average, the same logged mean loss; per-process values differ). That is
exact for every normaliser but two per-process token means, bnpo's and the entropy bonus's: that
combination is refused at construction, as is FRPO with top_entropy_quantile < 1 (its micro-batches
are scored against the generation batch's group_stats, which cannot hold an entropy quantile).
loss_type="frpo" computes its groups over all processes (process_group=WORLD; see frpo_kernels.loss
for the gradient convention, which matches DDP) and over the generation batch (group_stats); its
entropy bonus is then the micro-batch's share of the generation batch's mean entropy.
Multimodal inputs are refused (the hidden-state path is text-only).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import trl
from trl import GRPOConfig, GRPOTrainer

import frpo_kernels
from frpo_kernels import loss_types
from frpo_kernels.backends import BACKENDS
from frpo_kernels.config import LOSS_TYPES, LossConfig
from frpo_kernels.group_stats import SHARED_OPTIONS
from frpo_kernels.integrations.hf import _unwrapped, completion_hidden_states, logit_scale

TESTED_TRL_VERSIONS = ("1.16.0",)


@dataclass
class FRPOConfig(GRPOConfig):
    """GRPOConfig plus FRPO's options. loss_type is one of frpo_kernels' loss types (default "frpo");
    delta (the two-sided ratio cap) and every other loss option are GRPOConfig's own fields."""

    loss_type: str = field(default="frpo", metadata={"help": f"One of {LOSS_TYPES}."})
    # typed str so that HF's argument parser lets --lam auto through; numbers become floats in __post_init__
    lam: str = field(default=1.0, metadata={"help": "FRPO's temperature lambda: w = exp(-A / lam), or "
                                             "\"auto\" (each group's lam from kl_radius)."})
    kl_radius: float | None = field(default=None, metadata={"help": "With lam=\"auto\": the KL radius rho."})
    jackknife: bool = field(default=True, metadata={"help": "Jackknife bias correction of log(mean)."})
    baseline: bool = field(default=True, metadata={"help": "Subtract FRPO's baseline offset."})
    kernel_backend: str = field(default="auto", metadata={"help": "frpo_kernels backend."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"FRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if isinstance(self.lam, str) and self.lam != "auto":  # a command line gives a number as text
            try:
                self.lam = float(self.lam)
            except ValueError:
                raise ValueError(f'FRPOConfig.lam must be a number > 0 or "auto", got {self.lam!r}') from None
        self._check_loss_options()
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"FRPOConfig.kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")

    def _check_loss_options(self):
        """The loss options as FRPOTrainer passes them to the loss, checked now rather than after the
        first generation (those LossConfig knows; the loss itself checks the rest on its first call)."""
        options = dict(loss_type=self.loss_type, lam=self.lam, kl_radius=self.kl_radius, jackknife=self.jackknife,
                       baseline=self.baseline, beta=self.beta, epsilon_low=self.epsilon,
                       epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
                       delta=self.delta, importance_sampling_level=self.importance_sampling_level,
                       temperature=self.temperature,
                       max_completion_length=self.max_completion_length
                       if loss_types.get(self.loss_type).normaliser.reads_max_completion_length else None,
                       use_bias_correction_kl=self.use_bias_correction_kl,
                       sapo_temperature_pos=self.sapo_temperature_pos,
                       sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
                       vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                       vespo_lambda_neg=self.vespo_lambda_neg, top_entropy_quantile=self.top_entropy_quantile,
                       off_policy_mask_threshold=self.off_policy_mask_threshold,
                       entropy_coef=self.entropy_coef)
        known = {f.name for f in dataclasses.fields(LossConfig)}
        try:
            LossConfig(**{k: v for k, v in options.items() if k in known})
        except (ValueError, TypeError) as exc:
            message = str(exc)
            if message.startswith("epsilon_low"):  # GRPOConfig's name for it
                message = "epsilon" + message[len("epsilon_low"):]
            raise type(exc)(f"FRPOConfig: {message}") from None


class FRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is frpo_kernels.linear_loss(); use with FRPOConfig (a plain GRPOConfig works
    for the GRPO family, with FRPO options at their defaults)."""

    _tag_names = ["trl", "frpo", "frpo-kernels"]
    _name = "FRPO"

    def __init__(self, *args, **kwargs):
        if trl.__version__ not in TESTED_TRL_VERSIONS:
            warnings.warn(f"FRPOTrainer was tested with trl {', '.join(TESTED_TRL_VERSIONS)}; found "
                          f"{trl.__version__}: it overrides GRPOTrainer internals that may have changed",
                          stacklevel=2)
        super().__init__(*args, **kwargs)
        a = self.args
        self.frpo_options = dict(lam=getattr(a, "lam", 1.0), kl_radius=getattr(a, "kl_radius", None),
                                 jackknife=getattr(a, "jackknife", True),
                                 baseline=getattr(a, "baseline", True),
                                 backend=getattr(a, "kernel_backend", "auto"))
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"FRPOTrainer supports loss_type in {LOSS_TYPES}, got {self.loss_type!r}")
        self.kind = loss_types.get(self.loss_type)  # what differs between loss types, from the one registry
        self._check_entropy_mask_support()
        logit_scale(self.model.config)  # a soft-capped head cannot be scored from hidden states: fail now
        self._group_stats = None

    def _check_entropy_mask_support(self):
        """The two combinations with no exact counterpart, refused now rather than at the first step."""
        if self.top_entropy_quantile >= 1.0:
            return
        if self.kind.group_coupled:
            # FRPO scores micro-batches against the generation batch's group_stats, and the quantile would
            # have to be the whole generation batch's (frpo_kernels.loss refuses it with group_stats)
            raise ValueError(f"FRPOTrainer: loss_type={self.loss_type!r} with top_entropy_quantile={self.top_entropy_quantile} "
                             "is not supported (the entropy quantile of a generation batch split into "
                             "micro-batches); use top_entropy_quantile=1.0")
        per_process_tokens = self.kind.normaliser.batch_token_mean
        if self.accelerator.num_processes > 1 and (per_process_tokens or self._entropy_bonus_enabled):
            # TRL's entropy quantile is over all processes while this loss is normalised per process: the loss
            # takes the quantile over process_group, which also makes these two normalisers global
            what = f"loss_type={self.loss_type!r} (per-process token mean)" if per_process_tokens else \
                "the entropy bonus (entropy_coef / use_adaptive_entropy: a per-process token mean)"
            raise ValueError(f"FRPOTrainer: top_entropy_quantile={self.top_entropy_quantile} on "
                             f"{self.accelerator.num_processes} processes with {what} is not supported: TRL takes "
                             "the entropy quantile over all processes and this normaliser per process")

    def _loss_spans_processes(self):
        """Whether linear_loss gets process_group=WORLD: FRPO's groups span processes; TRL's entropy quantile
        is over all processes. Otherwise each process computes its own loss, as TRL's does."""
        return self.accelerator.num_processes > 1 and (self.kind.group_coupled or self.top_entropy_quantile < 1.0)

    # ------------------------------------------------------------------ generation: group ids, FRPO's stats

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        size = self.num_generations if self.model.training else self.num_generations_eval
        rows = output["completion_ids"].size(0)
        first = self.accelerator.process_index * rows
        output["group_ids"] = torch.arange(first, first + rows, device=output["completion_ids"].device) // size
        if self.model.training and self.kind.group_coupled:
            self._group_stats = self._frpo_group_stats(output)
        return output

    def _frpo_group_stats(self, batch):
        """FRPO's statistics of the whole generation batch (every process's rows), so that TRL may cut
        it into micro-batches and shuffle rows freely: each micro-batch's loss is its exact share.
        At the generation step the current policy is the sampling one, so these are exact for the
        first pass over the batch; with num_iterations > 1 later passes reuse them (first order)."""
        kwargs = self.frpo_loss_kwargs(batch)
        old = kwargs["old_logps"]
        return frpo_kernels.group_stats(
            kwargs["completion_mask"], advantages=kwargs["advantages"], group_ids=kwargs["group_ids"],
            logps=old, old_logps=old, process_group=kwargs["process_group"],
            **{k: kwargs[k] for k in SHARED_OPTIONS + ("importance_sampling_ratio", "sampling_logps") if k in kwargs})

    # ------------------------------------------------------------------ the model: hidden states, not logits

    def completion_hidden_states(self, model, inputs, **forward_kwargs):
        """(hidden [B, T, H], head weight, head bias): hidden[b, t] through the head gives the logits
        predicting inputs["completion_ids"][b, t]; no [B, T, V] logits are built."""
        self._check_text_only(inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            return completion_hidden_states(model, input_ids, attention_mask, inputs["completion_ids"].size(1),
                                            **forward_kwargs)

    def _hidden_states_and_aux_loss(self, model, inputs):
        """completion_hidden_states plus, for an MoE model with the aux loss on, the router load-balancing
        loss of the same forward (the model's own aux_loss output: load_balancing_loss_func of its router
        logits under the attention mask, as TRL's fused head computes it)."""
        if not self.aux_loss_enabled:
            return (*self.completion_hidden_states(model, inputs), None)
        outputs = []
        handle = _unwrapped(model).register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            hidden = self.completion_hidden_states(model, inputs, output_router_logits=True)
        finally:
            handle.remove()
        return (*hidden, outputs[-1].aux_loss)

    @staticmethod
    def _check_text_only(inputs):
        if any(inputs.get(key) is not None for key in ("pixel_values", "image_grid_thw", "num_images")):
            raise ValueError("FRPOTrainer does not support multimodal inputs")

    def completion_logits(self, model, inputs):
        """[B, T, V] logits predicting inputs["completion_ids"] (the model's plain forward; the loss does
        not use them, tests compare against them)."""
        self._check_text_only(inputs)
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        length = completion_ids.size(1)
        with self.accelerator.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1,
                           use_cache=False).logits
        return logits[:, -length - 1:-1]

    # ------------------------------------------------------------------ the loss

    def frpo_loss_kwargs(self, inputs):
        """Everything frpo_kernels.linear_loss() gets besides the hidden states and head (also used by
        the tests): TRL's options as GRPOTrainer._compute_loss reads them, only those in use."""
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        process_group = dist.group.WORLD if self._loss_spans_processes() else None
        old = inputs.get("old_per_token_logps")
        kwargs = dict(
            completion_ids=inputs["completion_ids"], completion_mask=mask, advantages=inputs["advantages"],
            group_ids=inputs["group_ids"], old_logps=old,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0 else None,
            loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, delta=self.args.delta,
            importance_sampling_level=self.importance_sampling_level, temperature=self.temperature,
            max_completion_length=self.max_completion_length if self.kind.normaliser.reads_max_completion_length
            else None, process_group=process_group, **self.frpo_options)
        a = self.args
        if self.beta != 0:
            kwargs["use_bias_correction_kl"] = a.use_bias_correction_kl
        kwargs.update({name: getattr(a, name) for name in self.kind.options})  # e.g. sapo's temperatures
        if self.kind.ratio_inside:
            # TRL's gamma weights (vespo) read the sampler's ratio whenever the batch has one
            if inputs.get("importance_sampling_ratio") is not None:
                kwargs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            kwargs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
        if self.off_policy_mask_threshold is not None:
            # TRL: the sampler's log-probs, else the old policy's, else (None) the current one's, detached
            kwargs.update(off_policy_mask_threshold=self.off_policy_mask_threshold,
                          sampling_logps=inputs.get("sampling_per_token_logps", old))
        if self.top_entropy_quantile < 1.0:
            kwargs["top_entropy_quantile"] = self.top_entropy_quantile
        return kwargs

    def _applied_entropy_coef(self):
        """The entropy bonus's coefficient of this micro-batch: fixed at the last optimizer step, and with
        the adaptive controller 0 until the entropy has fallen to entropy_target (TRL's gating)."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        # TRL's loss is scaled for gradient accumulation (it sets loss_is_scaled_for_ga)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        hidden, weight, bias, aux_loss = self._hidden_states_and_aux_loss(model, inputs)
        kwargs = self.frpo_loss_kwargs(inputs)
        completion_ids, mask = kwargs.pop("completion_ids"), kwargs.pop("completion_mask")
        stats = self._group_stats if mode == "train" and self.kind.group_coupled else None
        # FRPO in training: a share of the generation batch's loss, which feeds steps_per_generation /
        # accumulation optimizer steps. The others: the micro-batch's loss over the accumulation steps.
        scale = self.args.steps_per_generation / accumulation if stats is not None else 1.0 / accumulation
        if self.kind.normaliser.takes_num_items:
            # TRL divides each process's token sum by num_items_in_batch (the generation batch's tokens, all
            # processes) / num_processes * accumulation / steps_per_generation; the 1 / accumulation is in
            # `scale`. Over process_group the loss divides the sum over all processes: num_processes times that.
            count = inputs["num_items_in_batch"].clamp(min=1.0)
            if kwargs["process_group"] is None:
                count = count / self.accelerator.num_processes
            kwargs["num_items_in_batch"] = count / self.args.steps_per_generation if mode == "train" else count
        coef = self._applied_entropy_coef() if self._entropy_bonus_enabled else None
        if coef is not None:
            # TRL subtracts coef * (mean entropy over the bonus's tokens) / accumulation from any loss type.
            # FRPO's share (group_stats) takes the micro-batch's entropy sum over the generation batch's tokens.
            kwargs["entropy_coef"] = coef
        loss, metrics = frpo_kernels.linear_loss(hidden, weight, completion_ids, mask, bias=bias,
                                                 return_metrics=True, group_stats=stats, **kwargs)
        if coef is not None or self.kind.group_coupled:
            # the policy term alone, as TRL logs it (with the bonus on): before the accumulation scaling, but
            # for dapo / cispo / vespo, whose token count holds it; FRPO: the generation batch's loss
            policy = float(loss.detach())
            if coef is not None:
                entropy_sum, entropy_count = self._bonus_entropy(metrics)
                tokens = float(entropy_count) if stats is None else float(stats.size.tokens)
                policy += coef * float(entropy_sum) / max(tokens, 1.0)
            if stats is not None:
                policy *= self.args.steps_per_generation
            elif self.kind.normaliser.takes_num_items:
                policy /= accumulation
            policy = torch.tensor(policy, device=self.accelerator.device)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
        self._log_loss_metrics(mode, metrics, mask, global_metrics=kwargs["process_group"] is not None)
        if coef is not None and self.use_adaptive_entropy and mode == "train":
            self._update_entropy_controller(metrics)
        if coef is not None and mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        loss = loss * scale
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    # ------------------------------------------------------------------ TRL's metrics and entropy controller

    def _bonus_entropy(self, metrics):
        """(sum, count) of the entropy over the bonus's tokens (the mask, times the entropy mask)."""
        return metrics["entropy_bonus/sum"], metrics["entropy_bonus/count"]

    def _update_entropy_controller(self, metrics):
        """TRL's adaptive entropy coefficient: the window's token-weighted entropy over all processes,
        compared with entropy_target at each optimizer step, moves entropy_coef by entropy_coef_delta."""
        stats = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in self._bonus_entropy(metrics)])
        stats = stats.to(self.accelerator.device)
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
            a = self.args
            if world_entropy <= a.entropy_target:
                self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None

    def _log_loss_metrics(self, mode, metrics, mask, global_metrics):
        """The metrics GRPOTrainer logs (FRPO adds its own). The loss's metrics describe this process's
        rows (global_metrics: all processes' rows, process_group gathered them); TRL's are token- (or, for
        per-sequence values, row-) weighted means over all processes."""
        logged = self._metrics[mode]
        frpo = self.kind.group_coupled
        device = mask.device
        tokens = mask.sum().float()
        rows = torch.tensor(float(mask.shape[0]), device=device)
        per_token = tokens if self.importance_sampling_level == "token" else rows

        def global_mean(value, count):
            if global_metrics or self.accelerator.num_processes == 1:
                return float(value)
            local = torch.as_tensor(value, dtype=torch.float32, device=device)
            totals = self.accelerator.reduce(torch.stack([local * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0:
            logged["kl"].append(global_mean(metrics["kl"], tokens))
        logged["entropy"].append(global_mean(metrics["entropy"], tokens))
        for key, value in metrics.items():  # the loss type's own metrics (loss_types.py), as TRL logs them
            if key in ("kl", "entropy", "num_groups") or key.startswith(("entropy_bonus/", "frpo/")) or value is None:
                continue
            if key.startswith("clip_ratio/") and key.endswith(("_min", "_max")):
                # a min / max over rows of their token means: TRL's nanmin / nanmax over every process's rows
                local = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1)
                gathered = local if global_metrics else self.accelerator.gather(local)
                values = [v for v in gathered.tolist() if v == v]
                pick = min if key.endswith("_min") else max
                logged[key].append(pick(values) if values else float("nan"))
            else:
                logged[key].append(global_mean(value, rows if key in loss_types.PER_ROW_METRICS else per_token))
        if frpo:
            for key, value in metrics.items():
                if key == "frpo/lam_groups":  # one lam per group: log their mean
                    logged["frpo/lam_mean"].append(float(value.mean()))
                elif key.startswith("frpo/") and value is not None:
                    logged[key].append(float(value))
