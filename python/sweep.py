"""Seeds x arms of python/train.py: GRPO and one FRPO arm per lambda (plus lam=auto with a KL
radius), each run resumable on its own, then the report folder: its data files and the report
(python/sweep_report.py) with the pre-registered paired test, bootstrap CIs and plots.

    python python/sweep.py --seeds 0..7 --lams 2,0.5 --out runs/sweep/arithmetic_v2 \
        --report-to results/science/arithmetic_v2 --rl-steps 8       # train.py's full preset
    python python/sweep.py --preset tiny --seeds 0,1 --lams 1 --kl-radius measured   # seconds

Every arm of a seed sees the same prompts, data order and adapter inits (train.py's seeding). Flags
this script does not know go to every train.py run (e.g. --task refusal, --rl-steps 8).
--kl-radius measured runs the GRPO arms first and sets rho to their mean KL(policy after downstream
|| policy after RL) per completion: how far the downstream fine-tune actually moved the policy.
Ctrl-C or SIGTERM stops every run at a checkpoint; the same command continues (finished runs are
not redone).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: import python.* from the checkout (see train.py)
    sys.path[0] = str(ROOT)

from tqdm import tqdm

from python import sweep_report

TRAIN_PY = ROOT / "python" / "train.py"


@dataclass
class SweepRun:
    seed: int
    arm: str                     # "grpo", "frpo-lam1", "frpo-auto"
    train_args: list[str]
    out: Path
    needs_radius: bool = False   # lam=auto with --kl-radius measured: waits for the GRPO runs
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return (self.out / "report.json").exists()


def parse_seeds(text: str) -> list[int]:
    """"0..7" (inclusive), "0,1,2" or both ("0..3,8") -> the seeds, in order, each once."""
    seeds = []
    for part in text.split(","):
        if ".." in part:
            lo, hi = (int(x) for x in part.split(".."))
            seeds += range(lo, hi + 1)
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(text)
    return list(dict.fromkeys(seeds))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0..7", help="seeds: 0..7 (inclusive) and/or comma-separated")
    p.add_argument("--lams", default="2,0.5", help="comma-separated FRPO lambdas (one arm each; empty: GRPO only)")
    p.add_argument("--kl-radius", help="add a lam=auto arm with this KL radius: a number > 0, or 'measured'")
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="train.py's preset: full (the sweep's size) or tiny (seconds per run)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="the run folders")
    p.add_argument("--report-to", type=Path, help="the report folder: data files, report and plots (default: --out)")
    p.add_argument("--primary-arm", default="frpo-lam2", help="the arm the pre-registered test compares with GRPO")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (on 2 cores, 2 one-thread runs beat one "
                                                        "two-thread run)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: CPU cores / jobs)")
    args, train_args = p.parse_known_args(argv)
    try:
        args.seed_list = parse_seeds(args.seeds)
        args.lam_list = [float(x) for x in args.lams.split(",") if x]
    except ValueError:
        p.error(f"--seeds takes integers (0..7 or 0,1,2) and --lams numbers, comma-separated; got {args.seeds!r}, "
                f"{args.lams!r}")
    if any(x <= 0 for x in args.lam_list):
        p.error("every --lams value must be > 0")
    if args.kl_radius not in (None, "measured"):
        try:
            if not float(args.kl_radius) > 0:
                raise ValueError
        except ValueError:
            p.error(f"--kl-radius must be a number > 0 or 'measured', got {args.kl_radius!r}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.train_args = train_args
    args.report_to = args.report_to or args.out
    return args


def plan(args) -> list[SweepRun]:
    """Every run, in the order they start: GRPO of every seed, then each lambda, then lam=auto."""
    common = ["--preset", args.preset, "--threads", str(args.threads), "--base-eval", str(args.out / "base_eval.json"),
              *args.train_args]
    arms = [("grpo", ["--loss", "grpo"], False)]
    arms += [(f"frpo-lam{lam:g}", ["--loss", "frpo", "--lam", f"{lam:g}"], False) for lam in args.lam_list]
    if args.kl_radius is not None:
        arms.append(("frpo-auto", ["--loss", "frpo", "--lam", "auto"], args.kl_radius == "measured"))
    return [SweepRun(seed, name, [*flags, "--seed", str(seed), *common], args.out / f"seed{seed}" / name, waits)
            for name, flags, waits in arms for seed in args.seed_list]


def measured_radius(runs: list[SweepRun]) -> float:
    """Mean KL(policy after downstream || policy after RL) per completion over the GRPO runs."""
    values = [json.loads((r.out / "report.json").read_text())["arms"][0]["kl_seq_downstream_to_rl"]
              for r in runs if r.arm == "grpo"]
    return sum(values) / len(values)


def start(run: SweepRun, radius: float | None):
    argv = list(run.train_args) + (["--kl-radius", f"{radius:.6g}"] if run.arm == "frpo-auto" else [])
    if (run.out / "checkpoint.pt").exists():
        argv.append("--resume")
    run.out.mkdir(parents=True, exist_ok=True)
    log = (run.out / "train.log").open("a")
    threads = argv[argv.index("--threads") + 1]
    run.proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *argv, "--out", str(run.out)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads})
    log.close()


def execute(runs: list[SweepRun], args, clock: sweep_report.WallClock) -> list[SweepRun]:
    """Run what is not done yet, at most args.jobs at once. Returns the runs that failed."""
    pending = [r for r in runs if not r.done]
    running, failed = [], []
    radius = None if args.kl_radius in (None, "measured") else float(args.kl_radius)
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep runs", dynamic_ncols=True,
               mininterval=5)
    while pending or running:
        for run in [r for r in running if r.proc.poll() is not None]:
            running.remove(run)
            bar.update(1)
            if run.proc.returncode != 0 or not run.done:
                failed.append(run)
                tqdm.write(f"run {run.out} failed (exit {run.proc.returncode}); see {run.out / 'train.log'}")
            else:
                tqdm.write(f"done: {run.out} ({summary_line(run)})")
        grpo_done = all(r.done for r in runs if r.arm == "grpo")
        if radius is None and args.kl_radius == "measured" and grpo_done:
            radius = measured_radius(runs)
            tqdm.write(f"kl radius (measured on the GRPO runs): {radius:.4f}")
        for run in list(pending):
            if len(running) >= args.jobs or (running and not (args.out / "base_eval.json").exists()):
                break  # (the first run measures the base model for all of them)
            if run.needs_radius and radius is None:
                if not any(r.arm == "grpo" for r in pending + running) and not grpo_done:
                    pending.remove(run)  # a GRPO run failed: nothing to measure the radius on
                    failed.append(run)
                continue
            pending.remove(run)
            start(run, radius)
            running.append(run)
        bar.set_postfix_str(", ".join(f"seed{r.seed}/{r.arm}" for r in running), refresh=False)
        clock.tick()
        time.sleep(0.5)
    bar.close()
    return failed


def summary_line(run: SweepRun) -> str:
    arm = json.loads((run.out / "report.json").read_text())["arms"][0]
    return (f"reward after RL {arm['reward_after_rl']:.3f}, after downstream {arm['reward_after_downstream']:.3f}, "
            f"KL after downstream to after RL {arm['kl_seq_downstream_to_rl']:.3f}")


def stop_all(runs: list[SweepRun], signum: int):
    """Forward the stop to every run still going and wait: each saves a checkpoint and exits."""
    for run in runs:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.send_signal(signum)
    for run in runs:
        if run.proc is not None:
            run.proc.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    clock = sweep_report.WallClock(args.out)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    try:
        failed = execute(runs, args, clock)
    except KeyboardInterrupt as exc:
        term = str(exc) == "SIGTERM"
        stop_all(runs, signal.SIGTERM if term else signal.SIGINT)
        print(f"\nstopped; every unfinished run saved a checkpoint. The same command continues the sweep "
              f"({sum(r.done for r in runs)}/{len(runs)} runs done).", file=sys.stderr)
        return 143 if term else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        wall = clock.save()  # a stopped sweep's time counts too
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(str(r.out) for r in failed) +
              "; the report needs every run. Fix the cause and rerun the same command.", file=sys.stderr)
        return 1
    command = "python python/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    arms = list(dict.fromkeys(r.arm for r in runs))
    info = {"command": command, "seeds": args.seed_list, "arms": arms, "primary_arm": args.primary_arm,
            "wall_s": wall}
    sweep_report.collect(args.report_to, [(r.seed, r.arm, r.out) for r in runs], args.out / "base_eval.json", info)
    text = sweep_report.write(args.report_to)
    print(text)
    print(f"report: {args.report_to / 'report.md'} (data: " + ", ".join(sweep_report.DATA_FILES) + "; redo the report "
          f"from them alone with python python/sweep_report.py {args.report_to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
