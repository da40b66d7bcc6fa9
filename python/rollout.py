"""Rollouts: render prompts, sample G completions per prompt with `generate`, and get the logits
at completion positions only (the [B, T, V] tensor frpo_kernels.loss() takes).

Layout of every batch: [left padding | prompt | completion | right padding], so the completion is
always the last T positions and `logits_to_keep` skips the LM head on the prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from frpo_kernels.integrations.hf import completion_hidden_states

from python.tasks import SYSTEM_PROMPT


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


def sample_seed(*parts) -> int:
    """A 63-bit seed that is a function of `parts` only (e.g. (seed, step, global prompt index))."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


class SeededSampler(LogitsProcessor):
    """Samples the next token of each group of rows from that group's own torch.Generator and returns
    scores that are -inf except at the sampled token, so that greedy `generate` takes it.

    A prompt's completions then depend on its seed only, not on which other prompts share the batch
    (or the process): the same prompt with the same seed gives the same samples whether it is
    generated alone, with the step's other prompts, or on one rank of a distributed run (up to
    float rounding of the logits, which can differ with the batch's padding).
    """

    def __init__(self, seeds: list[int], group_size: int, temperature: float, top_p: float):
        self.seeds, self.group_size, self.temperature, self.top_p = seeds, group_size, temperature, top_p
        self.generators = None

    def __call__(self, input_ids, scores):
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:  # nucleus: keep the most likely tokens up to cumulative probability top_p
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p  # the first token is always kept
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(-1)
        g = self.group_size
        tokens = torch.cat([torch.multinomial(probs[i * g:(i + 1) * g], 1, generator=gen)
                            for i, gen in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


@torch.no_grad()
def sample(model, tokenizer, messages: list[str], group_size: int = 1, max_new_tokens: int = 8,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, seeds: list[int] | None = None,
           ) -> Rollout:
    """group_size completions per message (a group is contiguous in the batch).

    Sampling draws each message's completions from its own generator seeded by seeds[i] (default:
    seeds drawn from torch's global RNG), so a message's samples do not depend on the batch it is in.
    """
    device = model.device
    enc = encode_prompts(tokenizer, messages)
    ids = enc.input_ids.repeat_interleave(group_size, 0).to(device)
    mask = enc.attention_mask.repeat_interleave(group_size, 0).to(device)
    stops = stop_token_ids(tokenizer)
    options = dict(do_sample=False)
    if not greedy:
        if seeds is None:
            seeds = torch.randint(0, 2 ** 63 - 1, (len(messages),)).tolist()
        if len(seeds) != len(messages):
            raise ValueError(f"sample: {len(seeds)} seeds for {len(messages)} messages")
        options["logits_processor"] = LogitsProcessorList([SeededSampler(seeds, group_size, temperature, top_p)])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id, **options)
    completion = out[:, ids.shape[1]:]
    if completion.shape[1] == 0:  # nothing generated (cannot happen with max_new_tokens >= 1)
        completion = torch.full((ids.shape[0], 1), tokenizer.pad_token_id, device=device)
    is_stop = torch.isin(completion, torch.tensor(stops, device=device))
    # keep tokens up to and including the first stop token
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
    completion_mask = (~after_stop).long()
    completion = completion.masked_fill(after_stop, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    return Rollout(torch.cat([ids, completion], 1), full_mask, completion, completion_mask, texts)


def teacher_forced(tokenizer, messages: list[str], targets: list[str], device=None) -> Rollout:
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
    ro = Rollout(torch.cat([enc.input_ids, completion], 1), full_mask, completion, completion_mask, list(targets))
    if device is not None:
        for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask"):
            setattr(ro, name, getattr(ro, name).to(device))
    return ro


def completion_hidden(model, rollout: Rollout):
    """(hidden [B, T, H], head weight, head bias) whose product gives the logits that predict the
    completion tokens, for frpo_kernels.linear_loss / linear_token_logprobs (no [B, T, V] logits)."""
    return completion_hidden_states(model, rollout.input_ids, rollout.attention_mask, rollout.completion_length,
                                    position_ids=position_ids(rollout.attention_mask))


def completion_logits(model, rollout: Rollout) -> torch.Tensor:
    """[B, T, V] logits predicting the completion tokens (LM head run on those positions only)."""
    length = rollout.completion_length
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids(rollout.attention_mask), logits_to_keep=length + 1, use_cache=False)
    return out.logits[:, :-1]
