"""One RL step (G samples per prompt, rewards, frpo_kernels.linear_loss, update) and one downstream
SFT step, on this rank's slice of the step's examples."""
from __future__ import annotations

import random
import time

import torch

import frpo_kernels
from python import rollout
from python.ranks import Dist, reduce_gradients


def batch_for(examples, size, seed, stage, step):
    """The examples of one step: a function of (seed, stage, step) only, so every arm sees the same."""
    return random.Random(f"{seed}-{stage}-{step}").sample(examples, min(size, len(examples)))


def rl_step(model, tokenizer, optimizer, task, arm, args, step, ctx: Dist = Dist()):
    """One rollout batch + num_iterations updates. Returns (metrics, timing).

    Distributed: this rank samples and trains on its contiguous slice of the step's prompts; prompt i
    samples from the seed (seed, step, i), so the completions are those of the one-process run."""
    t0 = time.perf_counter()
    batch = batch_for(task.train, args.prompts_per_step, args.seed, "rl", step)
    lo, hi = ctx.shard(len(batch))
    seeds = [rollout.sample_seed(args.seed, "rl", step, i) for i in range(lo, hi)]
    batch = batch[lo:hi]
    model.eval()
    ro = rollout.sample(model, tokenizer, [e.prompt for e in batch], args.group_size, args.max_new_tokens,
                        args.temperature, args.top_p, seeds=seeds)
    rewards = torch.tensor([task.reward(text, batch[i // args.group_size]) for i, text in enumerate(ro.texts)],
                           device=ctx.device)
    t1 = time.perf_counter()
    old_logps = ref_logps = None
    with torch.no_grad():  # log-probs of the sampling policy and of the reference (= adapters off)
        if args.num_iterations > 1:
            old_logps = completion_logprobs(model, ro, args)
        if args.beta != 0:
            with model.disable_adapter():
                ref_logps = completion_logprobs(model, ro, args)
    t2 = time.perf_counter()
    model.train()
    losses = []
    for _ in range(args.num_iterations):
        hidden, head, head_bias = rollout.completion_hidden(model, ro)
        loss, metrics = frpo_kernels.linear_loss(
            hidden, head, ro.completion_ids, ro.completion_mask, bias=head_bias, rewards=rewards, group_size=args.group_size,
            old_logps=old_logps, ref_logps=ref_logps, loss_type=arm["loss_type"], **lam_options(arm),
            beta=args.beta, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high, delta=args.delta,
            jackknife=args.jackknife, baseline=args.baseline,
            importance_sampling_level=args.importance_sampling_level, scale_rewards=args.scale_rewards,
            temperature=args.temperature, max_completion_length=args.max_new_tokens, backend=args.backend,
            return_metrics=True, process_group=ctx.pg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # distributed: world x this rank's share of the global gradient ...
        params = optimizer.param_groups[0]["params"]
        reduce_gradients(params, ctx, average=True)  # ... so the mean over ranks is the global gradient
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not losses:  # the global rewards and lengths, once, before the step's first update
            all_rewards = torch.tensor(ctx.gather(rewards.tolist()))
            lengths = torch.tensor(ctx.gather(ro.completion_mask.sum(1).tolist()), dtype=torch.float)
        optimizer.step()
        losses.append(loss.item())
    t3 = time.perf_counter()
    out = {"loss": losses[0], "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
           "completion_len": float(lengths.mean())}
    for key, value in metrics.items():
        if value is not None and key != "num_groups":  # per-group tensors (lam="auto") as their mean
            value = torch.as_tensor(value)
            out[key if value.numel() == 1 else key + "_mean"] = float(value.float().mean())
    return out, {"t_gen": t1 - t0, "t_logp": t2 - t1, "t_loss": t3 - t2}


def lam_options(arm: dict) -> dict:
    """loss() keywords for the arm's lambda: a number, or "auto" with its KL radius."""
    if arm["lam"] == "auto":
        return {"lam": "auto", "kl_radius": arm["kl_radius"]}
    return {"lam": arm["lam"] or 1.0}


def completion_logprobs(model, ro, args, temperature=None):
    """Per-token log-probs of the completion tokens from the model's hidden states and LM head."""
    hidden, head, head_bias = rollout.completion_hidden(model, ro)
    return frpo_kernels.linear_token_logprobs(hidden, head, ro.completion_ids, bias=head_bias,
                                              temperature=args.temperature if temperature is None else temperature,
                                              backend=args.backend, mask=ro.completion_mask)


def sft_step(model, tokenizer, optimizer, downstream, args, step, ctx: Dist = Dist()):
    """One supervised step on the downstream task: mean NLL of the target tokens of the batch.

    Distributed: each rank takes its slice of the batch and divides its NLL sum by the global token
    count; the gradients are summed over ranks, which is the one-process gradient."""
    t0 = time.perf_counter()
    batch = batch_for(downstream.train, args.sft_batch, args.seed, "sft", step)
    lo, hi = ctx.shard(len(batch))
    batch = batch[lo:hi]
    ro = rollout.teacher_forced(tokenizer, [e.prompt for e in batch], [e.answer for e in batch], device=ctx.device)
    model.train()
    logp = completion_logprobs(model, ro, args, temperature=1.0)
    nll = -(logp * ro.completion_mask).sum()
    (tokens,) = ctx.all_sum([float(ro.completion_mask.sum())])
    loss = nll / tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = optimizer.param_groups[0]["params"]
    reduce_gradients(params, ctx, average=False)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    (value,) = ctx.all_sum([nll.item()])
    optimizer.step()
    return {"loss": value / tokens}, {"t_loss": time.perf_counter() - t0}
