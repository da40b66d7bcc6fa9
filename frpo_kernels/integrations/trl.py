"""TRL integration: FRPOTrainer is trl.GRPOTrainer with its loss computed by frpo_kernels.linear_loss()
from the model's final hidden states and LM head, so FRPO (and the GRPO family) run through this
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
      frpo_kernels.linear_loss() with the LM head (the logits exist only as tiles of rows), TRL's
      advantages, the carried group ids, old/ref log-probs, the group statistics (FRPO, training)
      and, with several processes, process_group=WORLD (groups may span processes; see
      frpo_kernels.loss for the gradient convention, which matches DDP).

Differences from GRPOTrainer's own loss: dapo is normalised by the global token count of the
micro-batch (TRL: of the accumulation window); bnpo by the global token count (TRL: per process);
the k3-KL is not weighted by TRL's use_bias_correction_kl ratio. Options with no counterpart here
(entropy masks/bonus, off-policy masks, vLLM importance-sampling correction, MoE aux loss,
multimodal inputs, the cispo/sapo/vespo/luspo losses) are rejected with an error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import trl
from trl import GRPOConfig, GRPOTrainer

import frpo_kernels
from frpo_kernels.backends import BACKENDS
from frpo_kernels.config import LOSS_TYPES, LossConfig
from frpo_kernels.group_stats import SHARED_OPTIONS
from frpo_kernels.integrations.hf import completion_hidden_states, logit_scale

TESTED_TRL_VERSIONS = ("1.16.0",)


@dataclass
class FRPOConfig(GRPOConfig):
    """GRPOConfig plus FRPO's options. loss_type is one of frpo_kernels' loss types (default "frpo");
    delta (the two-sided ratio cap) is GRPOConfig's own field."""

    loss_type: str = field(default="frpo", metadata={"help": f"One of {LOSS_TYPES}."})
    # typed str so that HF's argument parser lets --lam auto through; numbers become floats in __post_init__
    lam: str = field(default=1.0, metadata={"help": "FRPO's temperature lambda: w = exp(-A / lam), or "
                                             "\"auto\" (each group's lam from kl_radius)."})
    kl_radius: float | None = field(default=None, metadata={"help": "With lam=\"auto\": the KL radius rho."})
    jackknife: bool = field(default=True, metadata={"help": "Jackknife bias correction of log(mean)."})
    baseline: bool = field(default=True, metadata={"help": "Subtract FRPO's baseline offset."})
    kernel_backend: str = field(default="auto", metadata={"help": "frpo_kernels backend."})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Not supported by FRPOTrainer."})

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
        first generation."""
        try:
            LossConfig(loss_type=self.loss_type, lam=self.lam, kl_radius=self.kl_radius, jackknife=self.jackknife,
                       baseline=self.baseline, beta=self.beta, epsilon_low=self.epsilon,
                       epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
                       delta=self.delta, importance_sampling_level=self.importance_sampling_level,
                       temperature=self.temperature,
                       max_completion_length=self.max_completion_length if self.loss_type == "dr_grpo" else None)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            if message.startswith("epsilon_low"):  # GRPOConfig's name for it
                message = "epsilon" + message[len("epsilon_low"):]
            raise type(exc)(f"FRPOConfig: {message}") from None


class FRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is frpo_kernels.loss(); use with FRPOConfig (a plain GRPOConfig works
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
        unsupported = {
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "entropy_coef / use_adaptive_entropy": self._entropy_bonus_enabled,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "vllm_importance_sampling_correction": self.use_vllm and self.vllm_importance_sampling_correction,
            "an MoE router aux loss": self.aux_loss_enabled,
        }
        for what, used in unsupported.items():
            if used:
                raise ValueError(f"FRPOTrainer does not support {what}")
        if self.beta != 0 and getattr(a, "use_bias_correction_kl", False):
            warnings.warn("FRPOTrainer ignores use_bias_correction_kl: its KL term is the plain k3 "
                          "estimator of frpo_kernels.loss()", stacklevel=2)
        logit_scale(self.model.config)  # a soft-capped head cannot be scored from hidden states: fail now
        self._group_stats = None

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        size = self.num_generations if self.model.training else self.num_generations_eval
        rows = output["completion_ids"].size(0)
        first = self.accelerator.process_index * rows
        output["group_ids"] = torch.arange(first, first + rows, device=output["completion_ids"].device) // size
        if self.model.training and self.loss_type == "frpo":
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
            **{k: kwargs[k] for k in SHARED_OPTIONS if k in kwargs})

    def completion_hidden_states(self, model, inputs):
        """(hidden [B, T, H], head weight, head bias): hidden[b, t] through the head gives the logits
        predicting inputs["completion_ids"][b, t]; no [B, T, V] logits are built."""
        self._check_text_only(inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            return completion_hidden_states(model, input_ids, attention_mask, inputs["completion_ids"].size(1))

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

    def frpo_loss_kwargs(self, inputs):
        """Everything frpo_kernels.loss() gets besides the logits (also used by the tests)."""
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        process_group = dist.group.WORLD if self.accelerator.num_processes > 1 else None
        return dict(
            completion_ids=inputs["completion_ids"], completion_mask=mask, advantages=inputs["advantages"],
            group_ids=inputs["group_ids"], old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0 else None,
            loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, delta=self.args.delta,
            importance_sampling_level=self.importance_sampling_level, temperature=self.temperature,
            max_completion_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            process_group=process_group, **self.frpo_options)

    def _compute_loss(self, model, inputs):
        hidden, weight, bias = self.completion_hidden_states(model, inputs)
        kwargs = self.frpo_loss_kwargs(inputs)
        mode = "train" if self.model.training else "eval"
        stats = self._group_stats if mode == "train" and self.loss_type == "frpo" else None
        loss, metrics = frpo_kernels.linear_loss(hidden, weight, kwargs.pop("completion_ids"),
                                                 kwargs.pop("completion_mask"), bias=bias, return_metrics=True,
                                                 group_stats=stats, **kwargs)
        # metrics already describe the global batch (process_group gathers them): no further gather
        for key, value in metrics.items():
            if key == "frpo/lam_groups":  # one lam per group: log their mean
                self._metrics[mode]["frpo/lam_mean"].append(float(value.mean()))
            elif value is not None and key != "num_groups":
                self._metrics[mode][key].append(float(value))
        if stats is not None:
            # a share of the generation batch's loss; the generation batch feeds
            # steps_per_generation / gradient_accumulation_steps optimizer steps
            share_to_step = self.args.steps_per_generation / self.current_gradient_accumulation_steps
            self._metrics[mode]["policy_loss"].append(float(loss.detach()) * self.args.steps_per_generation)
            return loss * share_to_step
        self._metrics[mode]["policy_loss"].append(float(loss.detach()))
        # GRPOTrainer sets loss_is_scaled_for_ga: the trainer scales for gradient accumulation itself
        return loss / self.current_gradient_accumulation_steps if mode == "train" else loss

