"""A starting point that already has the behaviour RL is to strengthen (--warm-start-steps).

SmolLM2-135M-Instruct almost never refuses: on the refusal task's disallowed training prompts its
sampled refusal rate (temperature 0.7, 8 samples each) was under 1 %, and 4 % with a system prompt
asking for refusals, so GRPO's groups hold nothing to reinforce. The paper's safety runs start from
instruct models that do refuse. The warm start makes one: a LoRA fine-tuned for a few steps on the
task's demonstrations (refusals of disallowed requests, short answers to allowed ones), merged into the
weights. Its seed is its own, so every seed and arm of a sweep starts from the same model; the base
eval, RL, the KL figures and the downstream stage all see it as the base model.
"""
from __future__ import annotations

import copy

import torch

from python import adapters
from python.ranks import Dist
from python.steps import sft_step
from python.task_types import Downstream

WARM_START_SEED = 20261203


def warm_started(model, tokenizer, task, args):
    """model (a plain HF model) after args.warm_start_steps SFT steps of a LoRA on task.demonstrations
    (batch --sft-batch, lr --warm-start-lr), merged in; eval mode."""
    from peft import get_peft_model

    if not task.demonstrations:
        raise ValueError(f"--warm-start-steps: task {task.name!r} has no demonstrations to warm-start on")
    torch.manual_seed(WARM_START_SEED)
    peft_model = get_peft_model(model, adapters.lora_config(args, args.lora_r, args.lora_alpha, 0.0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.warm_start_lr)
    demonstrations = Downstream("demonstrations", task.demonstrations, [], None, task.max_new_tokens)
    step_args = copy.copy(args)
    step_args.seed = WARM_START_SEED
    on_device = Dist(device=next(peft_model.parameters()).device)  # every rank runs the whole warm start
    for step in range(args.warm_start_steps):
        sft_step(peft_model, tokenizer, optimizer, demonstrations, step_args, step, on_device)
    return peft_model.merge_and_unload().eval()
