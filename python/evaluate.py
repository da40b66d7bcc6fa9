"""Greedy evaluation on the eval splits: stage-1 reward, downstream skill, and KL(policy || base)
measured exactly (full distributions) at the policy's own completion tokens.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

import rollout


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def mean_score(model, tokenizer, examples, score, max_new_tokens, batch_size=32, desc="eval", kl=False):
    """(mean score, mean per-token KL to the adapter-free model or None) over examples."""
    model.eval()
    total, kl_sum, kl_tokens = 0.0, 0.0, 0.0
    for batch in tqdm(_batches(examples, batch_size), desc=desc, leave=False):
        ro = rollout.sample(model, tokenizer, [e.prompt for e in batch], max_new_tokens=max_new_tokens, greedy=True)
        total += sum(score(text, e) for text, e in zip(ro.texts, batch))
        if kl:
            policy = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
            with model.disable_adapter():
                base = torch.log_softmax(rollout.completion_logits(model, ro).float(), -1)
            per_token = (policy.exp() * (policy - base)).sum(-1)
            kl_sum += float((per_token * ro.completion_mask).sum())
            kl_tokens += float(ro.completion_mask.sum())
    return total / len(examples), (kl_sum / max(kl_tokens, 1.0) if kl else None)


def evaluate(model, tokenizer, task, downstream, limit=None, base=False, kl=False, label=""):
    """{'reward', 'downstream', 'kl'} on the eval splits (the first `limit` examples of each)."""
    stage1, down = task.eval[:limit], downstream.eval[:limit]
    if base:
        with model.disable_adapter():
            reward, _ = mean_score(model, tokenizer, stage1, task.reward, task.max_new_tokens, desc=f"{label} {task.name}")
            skill, _ = mean_score(model, tokenizer, down, downstream.score, downstream.max_new_tokens,
                                  desc=f"{label} {downstream.name}")
        return {"reward": reward, "downstream": skill, "kl": 0.0}
    reward, kl_value = mean_score(model, tokenizer, stage1, task.reward, task.max_new_tokens, kl=kl,
                                  desc=f"{label} {task.name}")
    skill, _ = mean_score(model, tokenizer, down, downstream.score, downstream.max_new_tokens,
                          desc=f"{label} {downstream.name}")
    return {"reward": reward, "downstream": skill, "kl": kl_value}
