"""Hugging Face causal LMs: the final hidden states that predict the completion tokens, and the LM head,
so that linear_loss / linear_token_logprobs score completions without building [B, T, V] logits.

The model runs its own forward (through any DDP/PEFT wrapper) with output_hidden_states=True and
logits_to_keep=1: its last hidden state is the LM head's input, and the one logit row it still
computes is used to check that, once per model.
"""
from __future__ import annotations

import weakref

import torch

_checked = weakref.WeakSet()


def logit_scale(config) -> float:
    """The factor some models apply to the head's output (logit_scale and its aliases, as TRL reads
    them); a final logit soft-capping (a tanh) cannot be folded into a linear head: ValueError."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        raise ValueError("the model applies final_logit_softcapping (a tanh on the logits), which the "
                         "hidden-state path cannot fold into the LM head; score it from logits with loss()")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            return float(getattr(text, name))
    if getattr(text, "logits_scaling", None) is not None:
        return float(text.logits_scaling) if text.model_type == "hyperclovax" else 1.0 / float(text.logits_scaling)
    return 1.0


def completion_hidden_states(model, input_ids, attention_mask, completion_length, **forward_kwargs):
    """(hidden [B, T, H], weight [V, H], bias [V] or None) with hidden[b, t] @ weight.T + bias the logits
    that predict the completion token t, for the last `completion_length` positions of input_ids."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False, **forward_kwargs)
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    scale = logit_scale(inner.config)
    final = out.hidden_states[-1]
    weight, bias = head.weight, head.bias
    if scale != 1.0:  # scale * (h W^T + b) = (scale h) W^T + scale b
        final = final * scale
        bias = None if bias is None else bias * scale
    if inner not in _checked:
        _check_head_input(final[:, -1], weight, bias, out.logits[:, -1])
        _checked.add(inner)
    return final[:, -completion_length - 1:-1], weight, bias


def _unwrapped(model):
    """The model inside DDP / FSDP (.module) or torch.compile (._orig_mod) wrappers; the forward still
    goes through the wrapper (DDP needs it), only the head and config are read from inside."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


@torch.no_grad()
def _check_head_input(last_hidden, weight, bias, last_logits):
    """The model's own last logit row must be its last hidden state through the head: a model whose
    hidden_states[-1] is not the head's input would otherwise get a plausible, wrong loss."""
    mine = last_hidden.float() @ weight.float().T + (0 if bias is None else bias.float())
    theirs = last_logits.float()
    err = (mine - theirs).abs().max()
    if not bool(err <= 1e-2 * theirs.abs().max().clamp_min(1.0)):
        raise ValueError("this model's last hidden state through its output "
                         f"embedding does not give its logits (max difference {float(err):.3g}); the hidden-"
                         "state path cannot score it, use loss() on logits")
