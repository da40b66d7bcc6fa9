"""Greedy evaluation on the eval splits: stage-1 reward, downstream skill, and exact KL from the
policy to a reference (the adapter-free base model, or the policy as it was after RL) at the
policy's own completion tokens.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from python import rollout


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def score_all(model, tokenizer, examples, score, max_new_tokens, batch_size=100, desc="eval", references=None,
              kl_limit=None, process_group=None):
    """(score per example, {reference: (KL per token, KL per completion)}): the KL of the
    policy to each reference at the policy's greedy completions of the first kl_limit examples (all
    by default), summed over the completion's tokens for the per-completion figure (the
    sequence-level KL), averaged over tokens for the other.

    With a process_group each rank scores its contiguous slice of examples and the sums are
    all-reduced (the scores gathered), so every rank returns the same result over all examples."""
    model.eval()
    references = references or {}
    sums = torch.zeros(2 + len(references), dtype=torch.float64)  # KL rows, tokens, KL sum per reference
    scores = []
    mine, rank = examples, 0
    if process_group is not None:
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        mine = examples[rank * len(examples) // world:(rank + 1) * len(examples) // world]
    first = 0 if process_group is None else rank * len(examples) // world  # global index of mine[0]
    for batch in tqdm(_batches(mine, batch_size), desc=desc, leave=False, disable=rank != 0):
        ro = rollout.sample(model, tokenizer, [e.prompt for e in batch], max_new_tokens=max_new_tokens, greedy=True)
        scores += [score(text, e) for text, e in zip(ro.texts, batch)]
        start = first + len(scores) - len(batch)  # the global index of batch[0]
        rows = len(batch) if kl_limit is None else min(len(batch), max(0, kl_limit - start))
        if references and rows:
            ro = replace(ro, **{k: getattr(ro, k)[:rows] for k in ("input_ids", "attention_mask", "completion_ids",
                                                                   "completion_mask")})
            sums[1] += float(ro.completion_mask.sum())
            policy = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
            sums[0] += rows
            for j, reference in enumerate(references.values()):
                with reference():
                    other = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
                per_token = (policy.exp() * (policy - other)).sum(-1)
                sums[2 + j] += float((per_token * ro.completion_mask).sum())
    if process_group is not None:
        sums = sums.to(model.device)
        dist.all_reduce(sums, group=process_group)
        sums = sums.cpu()
        parts = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(parts, scores, group=process_group)
        scores = [x for part in parts for x in part]
    kls = {name: (float(sums[2 + j]) / max(float(sums[1]), 1.0), float(sums[2 + j]) / max(float(sums[0]), 1.0))
           for j, name in enumerate(references)}
    return scores, kls


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def stage1_rewards(model, tokenizer, task, limit=None, label="", process_group=None) -> list[float]:
    """The stage-1 reward of each eval prompt (a dose point of the downstream fine-tune)."""
    rewards, _ = score_all(model, tokenizer, task.eval[:limit], task.reward, task.max_new_tokens,
                           desc=f"{label} {task.name}", process_group=process_group)
    return rewards


KL_PROMPTS = 64  # the KL figures are descriptive: measured on the first 64 stage-1 eval prompts


def evaluate(model, tokenizer, task, downstream, limit=None, base=False, references=None, label="",
             process_group=None):
    """{'reward', 'rewards', 'downstream', 'kl', 'kl_seq', ['kl_seq_to_rl']} on the eval splits (the first `limit`
    examples of each; 'rewards': the stage-1 reward per prompt): with references ({name: () ->
    context in which the model is that policy}, from adapters.AdapterStages.references), kl / kl_seq
    are the per-token / per-completion KL(policy || references["base"]) at the policy's completions
    of the first KL_PROMPTS stage-1 eval prompts, and kl_seq_to_rl the per-completion KL(policy ||
    references["rl"]) (the policy after RL): how far the downstream fine-tune moved it. base=True
    scores the adapter-free model. With a process_group the examples are split over its ranks and
    every rank gets the same result."""
    stage1, down = task.eval[:limit], downstream.eval[:limit]
    pg = process_group
    references = None if base else references
    with model.disable_adapter() if base else nullcontext():
        rewards, kls = score_all(model, tokenizer, stage1, task.reward, task.max_new_tokens, references=references,
                                 kl_limit=KL_PROMPTS, desc=f"{label} {task.name}", process_group=pg)
        skills, _ = score_all(model, tokenizer, down, downstream.score, downstream.max_new_tokens,
                              desc=f"{label} {downstream.name}", process_group=pg)
    out = {"reward": mean(rewards), "rewards": rewards, "downstream": mean(skills), "kl": None, "kl_seq": None}
    if base:  # the base model is its own reference
        out["kl"] = out["kl_seq"] = 0.0
    elif references:
        out["kl"], out["kl_seq"] = kls["base"]
        if "rl" in kls:
            out["kl_seq_to_rl"] = kls["rl"][1]
    return out
