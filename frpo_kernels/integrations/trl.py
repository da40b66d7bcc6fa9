"""TRL integration: FRPOTrainer is trl.GRPOTrainer with its loss computed by frpo_kernels.loss() from
the completion logits, so FRPO (and the GRPO family) run through this package's fused kernels.

Tested with trl 1.16.0, transformers 5.24.0, accelerate 1.15.0, torch 2.13.0 (CPU). It overrides
three GRPOTrainer internals, which TRL may rename between releases:
  _generate_and_score_completions  adds "group_ids": TRL lays out a generation batch as contiguous
      blocks of num_generations completions of one prompt over the rank-major concatenation of all
      processes (its advantages are rewards.view(-1, G) of the gathered rewards, then sliced by
      process_index * B_local), so the global group id of local row i is (rank * B_local + i) // G.
      The ids travel with the rows through TRL's shuffle and split of the generation batch.
  _prepare_inputs  with steps_per_generation > 1 and loss_type="frpo", shuffles whole groups instead
      of rows, so that every micro-batch holds complete groups (needs per_device_train_batch_size to
      be a multiple of num_generations; checked at construction).
  _compute_loss  runs the model for its final hidden states of the completion positions and calls
      frpo_kernels.linear_loss() with the LM head (the [B, T, V] logits never exist: tiles of rows
      only), TRL's advantages, the carried group ids, old/ref log-probs and, with several
      processes, process_group=WORLD (groups may span processes; see frpo_kernels.loss for the
      gradient convention, which matches DDP).

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
from trl.trainer.utils import split_tensor_dict

import frpo_kernels
from frpo_kernels.backends import BACKENDS
from frpo_kernels.config import LOSS_TYPES
from frpo_kernels.integrations.hf import completion_hidden_states, logit_scale

TESTED_TRL_VERSIONS = ("1.16.0",)


@dataclass
class FRPOConfig(GRPOConfig):
    """GRPOConfig plus FRPO's options. loss_type is one of frpo_kernels' loss types (default "frpo");
    delta (the two-sided ratio cap) is GRPOConfig's own field."""

    loss_type: str = field(default="frpo", metadata={"help": f"One of {LOSS_TYPES}."})
    lam: float = field(default=1.0, metadata={"help": "FRPO's temperature lambda: w = exp(-A / lam)."})
    jackknife: bool = field(default=True, metadata={"help": "Jackknife bias correction of log(mean)."})
    baseline: bool = field(default=True, metadata={"help": "Subtract FRPO's baseline offset."})
    kernel_backend: str = field(default="auto", metadata={"help": "frpo_kernels backend."})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Not supported by FRPOTrainer."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"FRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.lam > 0:
            raise ValueError(f"FRPOConfig.lam must be > 0, got {self.lam!r}")
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"FRPOConfig.kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")


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
        self.frpo_options = dict(lam=getattr(a, "lam", 1.0), jackknife=getattr(a, "jackknife", True),
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
        self._whole_group_shuffle = self.loss_type == "frpo" and a.steps_per_generation > 1
        if self._whole_group_shuffle and a.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"loss_type='frpo' with steps_per_generation={a.steps_per_generation} > 1 needs "
                f"per_device_train_batch_size ({a.per_device_train_batch_size}) to be a multiple of "
                f"num_generations ({self.num_generations}), so that each micro-batch holds whole groups; "
                "or use steps_per_generation=1 (groups may then span processes)")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        size = self.num_generations if self.model.training else self.num_generations_eval
        rows = output["completion_ids"].size(0)
        first = self.accelerator.process_index * rows
        output["group_ids"] = torch.arange(first, first + rows, device=output["completion_ids"].device) // size
        return output

    def _prepare_inputs(self, generation_batch):
        if not (self.model.training and self._whole_group_shuffle):
            return super()._prepare_inputs(generation_batch)
        # GRPOTrainer._prepare_inputs, with a shuffle of whole groups instead of rows
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = _shuffle_groups(batch, self.num_generations)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

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
        loss, metrics = frpo_kernels.linear_loss(hidden, weight, kwargs.pop("completion_ids"),
                                                 kwargs.pop("completion_mask"), bias=bias, return_metrics=True,
                                                 **kwargs)
        mode = "train" if self.model.training else "eval"
        # metrics already describe the global batch (process_group gathers them): no further gather
        for key, value in metrics.items():
            if value is not None and key != "num_groups":
                self._metrics[mode][key].append(float(value))
        self._metrics[mode]["policy_loss"].append(float(loss.detach()))
        # GRPOTrainer sets loss_is_scaled_for_ga: the trainer scales for gradient accumulation itself
        return loss / self.current_gradient_accumulation_steps if mode == "train" else loss


def _shuffle_groups(batch, group_size):
    """Permute the rows of a generation batch by whole groups of `group_size` contiguous rows."""
    rows = batch["completion_ids"].size(0)
    order = (torch.randperm(rows // group_size)[:, None] * group_size + torch.arange(group_size)).flatten()

    def permute(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value[order.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in order.tolist()]
        return value
    return {key: permute(value) for key, value in batch.items()}
