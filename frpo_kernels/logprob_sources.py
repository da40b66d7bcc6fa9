"""Where the loss gets its per-token log-probs: completion logits [B, T, V], or hidden states and the
LM head (the logits then exist only as tiles). Each source runs both kernel paths on its inputs.

  two_pass(row_mask, with_entropy) -> (logp, entropy or None)   differentiable log-probs
  fused(row_mask, coef, kl_coef, ref, with_entropy, value_from_logp, gate, entropy_coef)
      -> (loss, logp, entropy)
      one sweep when dloss/dlogp = coef * gate + kl_coef * (1 - exp(ref - logp)) is known per token
      (gate: None for 1, or a RatioGate: a function of the importance ratio, torch_reference.py's contract);
      entropy_coef: None, or dloss/dH per token: the entropy term's gradient joins the same sweep, and the
      entropy is returned (its value in the loss is the caller's to add)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frpo_kernels.ops.linear_logprobs import LinearTokenLogprobs, linear_fused_loss
from frpo_kernels.ops.token_logprobs import fused_loss, token_logprobs


@dataclass
class LogitsSource:
    logits: torch.Tensor  # [B, T, V]
    ids: torch.Tensor     # [B, T]
    temperature: float
    backend: str          # a resolved name
    overwrite_logits: bool = False

    @property
    def requires_grad(self) -> bool:
        return self.logits.requires_grad

    def two_pass(self, row_mask, with_entropy):
        return token_logprobs(self.logits, self.ids, row_mask, self.temperature, with_entropy, self.backend,
                              self.overwrite_logits)

    def fused(self, row_mask, coef, kl_coef, ref, with_entropy, value_from_logp, gate=None, entropy_coef=None):
        return fused_loss(self.logits, self.ids, row_mask, self.temperature, coef, kl_coef, ref, with_entropy,
                          self.backend, value_from_logp, self.overwrite_logits, gate, entropy_coef=entropy_coef)


@dataclass
class HiddenSource:
    hidden: torch.Tensor  # [B, T, H]: hidden[b, t] @ weight.T + bias predicts ids[b, t]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    ids: torch.Tensor     # [B, T]
    temperature: float
    backend: str

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))

    def two_pass(self, row_mask, with_entropy):
        shape = self.ids.shape
        logp, entropy = LinearTokenLogprobs.apply(
            self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias, self.ids.reshape(-1).long(),
            None if row_mask is None else row_mask.reshape(-1), self.temperature, with_entropy, self.backend,
            None)
        return logp.view(shape), (entropy.view(shape) if with_entropy else None)

    def fused(self, row_mask, coef, kl_coef, ref, with_entropy, value_from_logp, gate=None, entropy_coef=None):
        return linear_fused_loss(self.hidden, self.weight, self.bias, self.ids, row_mask, self.temperature, coef,
                                 kl_coef, ref, with_entropy, self.backend, value_from_logp, gate=gate,
                                 entropy_coef=entropy_coef)
