"""Greedy evaluation on the eval splits: stage-1 reward, downstream skill, and KL(policy || base)
measured exactly (full distributions) at the policy's own completion tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

import rollout


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def mean_score(model, tokenizer, examples, score, max_new_tokens, batch_size=32, desc="eval", kl=False,
               process_group=None):
    """(mean score, mean per-token KL to the adapter-free model or None) over examples.

    With a process_group each rank scores its contiguous slice of examples and the sums are
    all-reduced, so every rank returns the means over all examples."""
    model.eval()
    total, kl_sum, kl_tokens = 0.0, 0.0, 0.0
    mine, rank = examples, 0
    if process_group is not None:
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        mine = examples[rank * len(examples) // world:(rank + 1) * len(examples) // world]
    for batch in tqdm(_batches(mine, batch_size), desc=desc, leave=False, disable=rank != 0):
        ro = rollout.sample(model, tokenizer, [e.prompt for e in batch], max_new_tokens=max_new_tokens, greedy=True)
        total += sum(score(text, e) for text, e in zip(ro.texts, batch))
        if kl:
            policy = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
            with model.disable_adapter():
                base = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
            per_token = (policy.exp() * (policy - base)).sum(-1)
            kl_sum += float((per_token * ro.completion_mask).sum())
            kl_tokens += float(ro.completion_mask.sum())
    if process_group is not None:
        sums = torch.tensor([total, kl_sum, kl_tokens], dtype=torch.float64, device=model.device)
        dist.all_reduce(sums, group=process_group)
        total, kl_sum, kl_tokens = sums.tolist()
    return total / len(examples), (kl_sum / max(kl_tokens, 1.0) if kl else None)


def evaluate(model, tokenizer, task, downstream, limit=None, base=False, kl=False, label="", process_group=None):
    """{'reward', 'downstream', 'kl'} on the eval splits (the first `limit` examples of each); with a
    process_group the examples are split over its ranks and every rank gets the same result."""
    stage1, down = task.eval[:limit], downstream.eval[:limit]
    pg = process_group
    if base:
        with model.disable_adapter():
            reward, _ = mean_score(model, tokenizer, stage1, task.reward, task.max_new_tokens,
                                   desc=f"{label} {task.name}", process_group=pg)
            skill, _ = mean_score(model, tokenizer, down, downstream.score, downstream.max_new_tokens,
                                  desc=f"{label} {downstream.name}", process_group=pg)
        return {"reward": reward, "downstream": skill, "kl": 0.0}
    reward, kl_value = mean_score(model, tokenizer, stage1, task.reward, task.max_new_tokens, kl=kl,
                                  desc=f"{label} {task.name}", process_group=pg)
    skill, _ = mean_score(model, tokenizer, down, downstream.score, downstream.max_new_tokens,
                          desc=f"{label} {downstream.name}", process_group=pg)
    return {"reward": reward, "downstream": skill, "kl": kl_value}
