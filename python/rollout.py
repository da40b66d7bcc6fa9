"""Rollouts: render prompts, sample G completions per prompt with `generate`, and get the logits
at completion positions only (the [B, T, V] tensor frpo_kernels.loss() takes).

Layout of every batch: [left padding | prompt | completion | right padding], so the completion is
always the last T positions and `logits_to_keep` skips the LM head on the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks import SYSTEM_PROMPT


def render(tokenizer, user_message: str) -> str:
    """The prompt text: the model's chat template if it has one, else a plain Q/A format."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Q: {user_message}\nA: "


_stop_cache: dict[int, list[int]] = {}


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every token that contains a newline: all tasks answer in one line."""
    key = id(tokenizer)
    if key not in _stop_cache:
        ids = [i for i, piece in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
               if "\n" in piece]
        _stop_cache[key] = sorted(set(ids) | {tokenizer.eos_token_id})
    return _stop_cache[key]


@dataclass
class Rollout:
    input_ids: torch.Tensor        # [B, P + T] prompt (left padded) + completion
    attention_mask: torch.Tensor   # [B, P + T]
    completion_ids: torch.Tensor   # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the stop token
    texts: list[str]               # decoded completions

    @property
    def completion_length(self) -> int:
        return self.completion_ids.shape[1]


def encode_prompts(tokenizer, messages: list[str]):
    prompts = [render(tokenizer, m) for m in messages]
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def position_ids(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def sample(model, tokenizer, messages: list[str], group_size: int = 1, max_new_tokens: int = 8,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """group_size completions per message (a group is contiguous in the batch)."""
    enc = encode_prompts(tokenizer, messages)
    ids = enc.input_ids.repeat_interleave(group_size, 0)
    mask = enc.attention_mask.repeat_interleave(group_size, 0)
    stops = stop_token_ids(tokenizer)
    options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id, **options)
    completion = out[:, ids.shape[1]:]
    if completion.shape[1] == 0:  # nothing generated (cannot happen with max_new_tokens >= 1)
        completion = torch.full((ids.shape[0], 1), tokenizer.pad_token_id)
    is_stop = torch.isin(completion, torch.tensor(stops))
    # keep tokens up to and including the first stop token
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
    completion_mask = (~after_stop).long()
    completion = completion.masked_fill(after_stop, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    return Rollout(torch.cat([ids, completion], 1), full_mask, completion, completion_mask, texts)


def teacher_forced(tokenizer, messages: list[str], targets: list[str]) -> Rollout:
    """A Rollout whose completions are given targets (+ EOS): the SFT batch, same layout as sampling."""
    enc = encode_prompts(tokenizer, messages)
    pieces = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in targets]
    length = max(len(p) for p in pieces)
    completion = torch.full((len(pieces), length), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(pieces), length, dtype=torch.long)
    for row, piece in enumerate(pieces):
        completion[row, :len(piece)] = torch.tensor(piece)
        completion_mask[row, :len(piece)] = 1
    full_mask = torch.cat([enc.attention_mask, torch.ones_like(completion)], 1)
    return Rollout(torch.cat([enc.input_ids, completion], 1), full_mask, completion, completion_mask, list(targets))


def completion_logits(model, rollout: Rollout) -> torch.Tensor:
    """[B, T, V] logits predicting the completion tokens (LM head run on those positions only)."""
    length = rollout.completion_length
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids(rollout.attention_mask), logits_to_keep=length + 1, use_cache=False)
    return out.logits[:, :-1]
