"""The sweep's report, recomputed from the data files a report folder keeps.

    python python/sweep_report.py results/science/arithmetic_v2     # report.md, report.json, plots

collect() turns the sweep's run folders into those files: per_prompt.csv (seed, arm, dose,
prompt_id, reward: every eval prompt of every run at every dose), prompts.csv (the eval prompts and
their kind), runs.csv (per run what per_prompt.csv does not hold: RL steps, training reward,
downstream skill, KLs), base_eval.json (the base model's eval) and sweep.json (command, settings,
seeds, arms, the primary arm, wall time). write() reads those files alone.

The primary measure (PROTOCOL.md of the folder fixes it in advance): per seed, the arm's mean
stage-1 reward over the eval prompts after the last downstream dose minus GRPO's; its mean over
seeds, a one-sided paired t-test over seeds and a bootstrap CI. Seeds where either arm ended RL less
than RL_FAILURE_MARGIN above the base model are RL failures: left out of the test, and listed with
their numbers (the test on every seed is reported too). Per arm, descriptively: reward after RL and
at each dose, retention area and drop with 95 % CIs from a bootstrap that resamples seeds and, within
each, eval prompts (every arm shares the resampled indices, so differences to GRPO are paired).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: import python.* from the checkout (see train.py)
    sys.path[0] = str(ROOT)

import numpy as np

from python import tasks
from python.report import downstream_stage, rl_budget
from python.stats import BOOTSTRAP_REPLICATES, bootstrap_mean_ci, paired_t_test
from python.task_types import Example, Task, measure_values

BOOTSTRAP = 2000
RL_FAILURE_MARGIN = 0.05   # an arm whose reward after RL is below base + this did not learn
ALPHA = 0.05               # the one-sided test's level, fixed in PROTOCOL.md
DATA_FILES = ("per_prompt.csv", "prompts.csv", "runs.csv", "base_eval.json", "sweep.json")
RUN_COLUMNS = ("seed", "arm", "loss_type", "lam", "kl_radius", "lr", "rl_steps_done", "train_reward_end",
               "rl_target_reached", "downstream_before", "downstream_after", "kl_to_base", "kl_seq_downstream_to_rl",
               "lam_groups_mean")
# train.py settings that differ between the runs of a sweep, or only say where files were
PER_RUN_KEYS = ("out", "seed", "loss", "lam", "lams", "kl_radius", "resume", "lam_list", "base_eval", "threads",
                "stop_after_steps")


# ---------------------------------------------------------------- run folders -> data files
def relative_paths(text: str) -> str:
    """text with every absolute path in it made relative to the checkout, or outside it cut to
    <elsewhere>/its name: no committed file may name a folder of the machine it was made on."""
    def fix(word: str) -> str:
        key, eq, value = word.partition("=") if word.startswith("--") and "=" in word else ("", "", word)
        if not os.path.isabs(value):
            return word
        path = Path(value)
        return key + eq + (os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else f"<elsewhere>/{path.name}")
    return " ".join(fix(word) for word in text.split(" "))


def load(runs: list[tuple[int, str, Path]]) -> dict:
    """{arm: {"seeds": [...], "results": [train.py's arm result per seed]}} from the run folders, in run order."""
    arms: dict[str, dict] = {}
    for seed, arm, out in runs:
        result = json.loads((out / "report.json").read_text())["arms"][0]
        result["lam_groups_mean"] = mean_lam_used(out / "metrics.jsonl")
        arms.setdefault(arm, {"seeds": [], "results": []})
        arms[arm]["seeds"].append(seed)
        arms[arm]["results"].append(result)
    return arms


def mean_lam_used(metrics_file: Path) -> float | None:
    """lam=auto: the mean over RL steps of the step's mean per-group lambda (None for other arms)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    values = [r.get("frpo/lam_groups_mean", r.get("frpo/lam_groups")) for r in rows if r["stage"] == "rl"]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)  # repr: the float reads back exactly


def _write_csv(path: Path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[_cell(v) for v in row] for row in rows])


def collect(report_dir: Path, runs: list[tuple[int, str, Path]], base_eval: Path, info: dict):
    """The data files of a report folder from the sweep's run folders; info: sweep.json's command,
    seeds, arms, primary_arm, wall_s (the train.py settings common to every run are added)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    arms = load(runs)
    rows, run_rows = [], []
    for name, arm in arms.items():
        for seed, result in zip(arm["seeds"], arm["results"]):
            for k in sorted(result["rewards_at_dose"], key=int):
                rows += [(seed, name, int(k), i, float(r)) for i, r in enumerate(result["rewards_at_dose"][k])]
            run_rows.append([seed, name] + [result.get(c) for c in RUN_COLUMNS[2:]])
    _write_csv(report_dir / "per_prompt.csv", ("seed", "arm", "dose", "prompt_id", "reward"), rows)
    _write_csv(report_dir / "runs.csv", RUN_COLUMNS, run_rows)
    config = json.loads((runs[0][2] / "report.json").read_text())["config"]
    config = {k: relative_paths(v) if isinstance(v, str) else v for k, v in config.items() if k not in PER_RUN_KEYS}
    task, _ = tasks.get_tasks(config["task"], config.get("operands"))
    n_prompts = len(next(iter(arms.values()))["results"][0]["rewards_at_dose"]["0"])
    _write_csv(report_dir / "prompts.csv", ("prompt_id", "kind", "prompt", "answer"),
               [(i, e.kind, e.prompt, e.answer) for i, e in enumerate(task.eval[:n_prompts])])
    (report_dir / "base_eval.json").write_text(base_eval.read_text())
    (report_dir / "sweep.json").write_text(json.dumps({**info, "command": relative_paths(info["command"]),
                                                      "config": config}, indent=1) + "\n")


# ---------------------------------------------------------------- data files -> numbers
def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str):
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def load_dir(report_dir: Path) -> tuple[dict, dict, dict, list[dict]]:
    """(arms in load()'s shape, base eval, sweep.json, prompts) from a report folder's data files."""
    sweep = json.loads((report_dir / "sweep.json").read_text())
    base = json.loads((report_dir / "base_eval.json").read_text())["eval"]
    prompts = _read_csv(report_dir / "prompts.csv")
    rewards: dict[tuple[int, str], dict[int, dict[int, float]]] = {}
    for row in _read_csv(report_dir / "per_prompt.csv"):
        run = rewards.setdefault((int(row["seed"]), row["arm"]), {})
        run.setdefault(int(row["dose"]), {})[int(row["prompt_id"])] = float(row["reward"])
    arms = {name: {"seeds": [], "results": []} for name in sweep["arms"]}
    for row in _read_csv(report_dir / "runs.csv"):
        seed, name = int(row["seed"]), row["arm"]
        result = {k: _number(row[k]) for k in RUN_COLUMNS[2:]}  # (lam: a number, "auto" or None)
        doses = rewards.pop((seed, name), None)
        if doses is None:
            raise ValueError(f"per_prompt.csv has no rows for seed {seed}, arm {name}")
        result["rewards_at_dose"] = {str(k): [v[i] for i in sorted(v)] for k, v in sorted(doses.items())}
        if any(sorted(v) != list(range(len(prompts))) for v in doses.values()):
            raise ValueError(f"seed {seed}, arm {name}: per_prompt.csv lacks some of the {len(prompts)} prompts")
        arms[name]["seeds"].append(seed)
        arms[name]["results"].append(result)
    if rewards:
        raise ValueError(f"per_prompt.csv has runs that runs.csv does not list: {sorted(rewards)}")
    for arm in arms.values():  # seed order, as sweep.json lists the seeds
        order = sorted(range(len(arm["seeds"])), key=lambda i: sweep["seeds"].index(arm["seeds"][i]))
        arm["seeds"] = [arm["seeds"][i] for i in order]
        arm["results"] = [arm["results"][i] for i in order]
    return arms, base, sweep, prompts


def curves(results: list[dict]) -> tuple[list[int], np.ndarray]:
    """(dose steps, rewards [seed, dose, prompt])."""
    doses = sorted(int(k) for k in results[0]["rewards_at_dose"])
    return doses, np.array([[r["rewards_at_dose"][str(k)] for k in doses] for r in results], dtype=float)


def bootstrap_indices(n_seeds: int, n_prompts: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Seeds [B, S] and prompts [B, S, P] of each bootstrap replicate."""
    seeds = rng.integers(0, n_seeds, size=(BOOTSTRAP, n_seeds))
    prompts = rng.integers(0, n_prompts, size=(BOOTSTRAP, n_seeds, n_prompts))
    return seeds, prompts


def replicate_means(rewards: np.ndarray, seeds, prompts) -> np.ndarray:
    """[B, dose]: the mean reward of each replicate at each dose point."""
    picked = rewards[seeds[:, :, None], :, prompts]  # [B, S, P, dose]
    return picked.mean(axis=(1, 2))


def interval(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def seed_interval(values: list[float], rng) -> list[float]:
    """Bootstrap over seeds only (figures without per-prompt values)."""
    v = np.array(values, dtype=float)
    return interval(v[rng.integers(0, len(v), size=(BOOTSTRAP, len(v)))].mean(axis=1))


def stat(mean, ci) -> dict:
    return {"mean": float(mean), "ci": ci}


def _mean_of(results: list[dict], key: str):
    values = [r.get(key) for r in results]
    return None if any(v is None for v in values) else float(np.mean(values))


def statistics(arms: dict, base_reward: float) -> list[dict]:
    """Per arm: the descriptive figures with their bootstrap CIs (see the module's docstring)."""
    rng = np.random.default_rng(0)
    grpo_doses, grpo = curves(arms["grpo"]["results"])
    seeds, prompts = bootstrap_indices(grpo.shape[0], grpo.shape[2], rng)
    grpo_boot = replicate_means(grpo, seeds, prompts)
    grpo_curve = grpo.mean(axis=(0, 2))
    grpo_area, grpo_area_boot = grpo_curve.mean() - base_reward, grpo_boot.mean(axis=1) - base_reward
    grpo_lost, grpo_lost_boot = grpo_curve[0] - grpo_curve, grpo_boot[:, :1] - grpo_boot  # since RL, per dose
    out = []
    for name, arm in arms.items():
        results = arm["results"]
        doses, rewards = curves(results)
        if doses != grpo_doses or rewards.shape != grpo.shape or arm["seeds"] != arms["grpo"]["seeds"]:
            raise ValueError(f"arm {name}: dose points, seeds or eval prompts differ from the GRPO arm's")
        boot = replicate_means(rewards, seeds, prompts)
        mean_curve = rewards.mean(axis=(0, 2))
        area, area_boot = mean_curve.mean() - base_reward, boot.mean(axis=1) - base_reward
        lost, lost_boot = mean_curve[0] - mean_curve, boot[:, :1] - boot  # since RL, per dose
        lost_vs_grpo, lost_vs_grpo_boot = lost - grpo_lost, lost_boot - grpo_lost_boot  # paired
        first = results[0]
        out.append({
            "name": name, "loss_type": first["loss_type"], "lam": first["lam"], "kl_radius": first.get("kl_radius"),
            "lr": first.get("lr"), "seeds": arm["seeds"],
            "rl_steps_done": _mean_of(results, "rl_steps_done"),
            "train_reward_end": _mean_of(results, "train_reward_end"),
            "reward_after_rl": stat(mean_curve[0], interval(boot[:, 0])),
            "dose_steps": doses,
            "reward_at_dose": {"mean": [float(x) for x in mean_curve], "ci": [interval(boot[:, j]) for j in range(len(doses))]},
            "retention_area": stat(area, interval(area_boot)),
            "diff_vs_grpo": stat(area - grpo_area, interval(area_boot - grpo_area_boot)),
            "drop": stat(lost[-1], interval(lost_boot[:, -1])),
            "lost_vs_grpo_at_dose": {"mean": [float(x) for x in lost_vs_grpo],
                                     "ci": [interval(lost_vs_grpo_boot[:, j]) for j in range(len(doses))]},
            "drop_vs_grpo": stat(lost_vs_grpo[-1], interval(lost_vs_grpo_boot[:, -1])),
            "downstream_after": stat(np.mean([r["downstream_after"] for r in results]),
                                     seed_interval([r["downstream_after"] for r in results], rng)),
            "kl_to_base_after_rl": float(np.mean([r["kl_to_base"] for r in results])),
            "kl_downstream_to_rl": float(np.mean([r["kl_seq_downstream_to_rl"] for r in results])),
            "lam_groups_mean": _mean_of(results, "lam_groups_mean"),
        })
    return out


def seed_means(arm: dict, dose: int) -> list[float]:
    """The arm's mean stage-1 reward over the eval prompts at `dose`, one value per seed."""
    return [float(np.mean(r["rewards_at_dose"][str(dose)])) for r in arm["results"]]


def rl_failures(arms: dict, base_reward: float) -> list[dict]:
    """Every (seed, arm) whose reward after RL is below base + RL_FAILURE_MARGIN."""
    out = []
    for name, arm in arms.items():
        for seed, after_rl, result in zip(arm["seeds"], seed_means(arm, 0), arm["results"]):
            if after_rl < base_reward + RL_FAILURE_MARGIN:
                out.append({"seed": seed, "arm": name, "reward_after_rl": after_rl, "base": base_reward,
                            "rl_steps_done": result.get("rl_steps_done"),
                            "train_reward_end": result.get("train_reward_end")})
    return out


def _test(diffs: list[float]) -> dict:
    t = paired_t_test(diffs)
    return {"mean_diff": t["mean"], "ci": bootstrap_mean_ci(diffs), "p_one_sided": t["p_one_sided"],
            "t": t["t"], "df": t["df"], "n_seeds": t["n"]}


def compare(arms: dict, name: str, base_reward: float) -> dict:
    """The primary measure for `name` against GRPO at the last dose: per seed the difference of mean
    stage-1 rewards; the test over the seeds where neither arm is an RL failure (and, as a check,
    over every seed)."""
    dose = curves(arms["grpo"]["results"])[0][-1]
    failed = {(f["seed"], f["arm"]) for f in rl_failures({k: arms[k] for k in ("grpo", name)}, base_reward)}
    per_seed = []
    for seed, g, a in zip(arms["grpo"]["seeds"], seed_means(arms["grpo"], dose), seed_means(arms[name], dose)):
        excluded = (seed, "grpo") in failed or (seed, name) in failed
        per_seed.append({"seed": seed, "grpo": g, "arm": a, "diff": a - g, "excluded": excluded})
    kept = [s["diff"] for s in per_seed if not s["excluded"]]
    return {"arm": name, "vs": "grpo", "dose": dose, **_test(kept),
            "excluded_seeds": [s["seed"] for s in per_seed if s["excluded"]], "per_seed": per_seed,
            "all_seeds": _test([s["diff"] for s in per_seed])}


def measures_by_dose(arms: dict, task, prompts: list[dict]) -> dict:
    """{arm: {measure: [mean over seeds at each dose]}} for the task's named measures (refusal rate...)."""
    if not task.measures:
        return {}
    eval_examples = [Example(p["prompt"], p["answer"], p["kind"]) for p in prompts]
    task = Task(task.name, [], eval_examples, task.reward, task.max_new_tokens, task.measures)
    out = {}
    for name, arm in arms.items():
        doses = curves(arm["results"])[0]
        per_seed = [[measure_values(task, r["rewards_at_dose"][str(k)]) for k in doses] for r in arm["results"]]
        out[name] = {m: [float(np.mean([seed[j][m] for seed in per_seed])) for j in range(len(doses))]
                     for m in task.measures}
    return out


# ---------------------------------------------------------------- numbers -> report
def excludes_zero(ci) -> str:
    return "yes, above" if ci[0] > 0 else "yes, below" if ci[1] < 0 else "no"


def _ci(s: dict, digits=3) -> str:
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def table(stats: list[dict]) -> str:
    doses = stats[0]["dose_steps"]
    header = ["arm", "lr", "RL steps", "train reward at RL end", "after RL", *[f"k={k}" for k in doses[1:]],
              "retention area", "vs GRPO (paired)", f"drop (after RL - k={doses[-1]})", "drop vs GRPO (paired)",
              "downstream after", "KL to base after RL", "KL(after SFT || after RL)"]
    grpo = lambda s, text: "-" if s["name"] == "grpo" else text  # noqa: E731
    number = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
    rows = [[s["name"], number(s["lr"], "{:g}"), number(s["rl_steps_done"], "{:.1f}"), number(s["train_reward_end"]),
             _ci(s["reward_after_rl"]), *[f"{m:.3f}" for m in s["reward_at_dose"]["mean"][1:]],
             _ci(s["retention_area"]), grpo(s, _ci(s["diff_vs_grpo"])), _ci(s["drop"]), grpo(s, _ci(s["drop_vs_grpo"])),
             _ci(s["downstream_after"]), f"{s['kl_to_base_after_rl']:.4f}", f"{s['kl_downstream_to_rl']:.3f}"]
            for s in stats]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(c: dict) -> str:
    """The test's outcome in words."""
    if c["p_one_sided"] is None:
        return f"**{c['arm']}**: fewer than two seeds to test ({c['n_seeds']})."
    more = c["p_one_sided"] < ALPHA
    word = "keeps MORE stage-1 reward than GRPO" if more else "is not shown to keep more than GRPO"
    everyone = c["all_seeds"]
    left_out = (f" (RL failures left out: seeds {c['excluded_seeds']}; on every seed: {everyone['mean_diff']:+.3f}, "
                f"p = {_p(everyone['p_one_sided'])})") if c["excluded_seeds"] else ""
    return (f"**{c['arm']}** {word} after k={c['dose']} downstream steps: mean paired difference "
            f"{c['mean_diff']:+.3f} (95 % bootstrap CI [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]), one-sided paired "
            f"t-test p = {_p(c['p_one_sided'])} over {c['n_seeds']} seeds{left_out}; level {ALPHA} one-sided.")


def per_seed_table(c: dict) -> str:
    lines = [f"| seed | GRPO at k={c['dose']} | {c['arm']} at k={c['dose']} | difference | |", "|---|---|---|---|---|"]
    lines += [f"| {s['seed']} | {s['grpo']:.3f} | {s['arm']:.3f} | {s['diff']:+.3f} | "
              f"{'RL failure: left out' if s['excluded'] else ''} |" for s in c["per_seed"]]
    return "\n".join(lines)


def failures_text(failures: list[dict]) -> str:
    if not failures:
        return f"None: every arm of every seed ended RL at least {RL_FAILURE_MARGIN} above the base model."
    lines = ["| seed | arm | reward after RL | base | RL steps | train reward at RL end |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['seed']} | {f['arm']} | {f['reward_after_rl']:.3f} | {f['base']:.3f} | "
              f"{'-' if f['rl_steps_done'] is None else int(f['rl_steps_done'])} | "
              f"{'-' if f['train_reward_end'] is None else format(f['train_reward_end'], '.3f')} |" for f in failures]
    return "\n".join(lines)


def measures_text(measures: dict, doses: list[int]) -> str:
    if not measures:
        return ""
    names = list(next(iter(measures.values())))
    lines = ["| arm | measure | " + " | ".join(f"k={k}" for k in doses) + " |", "|---|---|" + "---|" * len(doses)]
    lines += [f"| {arm} | {m} | " + " | ".join(f"{v:.3f}" for v in values[m]) + " |"
              for arm, values in measures.items() for m in names]
    return "\n".join(lines)


def write(report_dir: Path) -> str:
    """report.json, report.md and the plots of a report folder, from its data files alone."""
    arms, base, sweep, prompts = load_dir(report_dir)
    config = sweep["config"]
    base_reward = float(np.mean(base["rewards"][:len(prompts)]))
    stats = statistics(arms, base_reward)
    others = [name for name in arms if name != "grpo"]
    comparisons = {name: compare(arms, name, base_reward) for name in others}
    primary_arm = sweep.get("primary_arm") if sweep.get("primary_arm") in arms else None
    primary = comparisons.get(primary_arm)
    failures = rl_failures(arms, base_reward)
    task, _ = tasks.get_tasks(config["task"], config.get("operands"))
    measures = measures_by_dose(arms, task, prompts)
    report = {"primary": primary and {k: primary[k] for k in ("arm", "vs", "dose", "mean_diff", "ci", "p_one_sided",
                                                             "n_seeds", "t", "df", "excluded_seeds")},
              "primary_all_seeds": primary and primary["all_seeds"],
              "secondary": [comparisons[n] for n in others if n != primary_arm],
              "primary_per_seed": primary and primary["per_seed"],
              "rl_failures": failures, "arms": stats, "measures_at_dose": measures,
              "base": {"reward": base_reward, "downstream": base["downstream"]}, "config": config,
              "command": sweep["command"], "wall_s": sweep.get("wall_s"), "bootstrap": BOOTSTRAP,
              "bootstrap_primary": BOOTSTRAP_REPLICATES, "alpha_one_sided": ALPHA,
              "rl_failure_margin": RL_FAILURE_MARGIN}
    (report_dir / "report.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    text = table(stats)
    doses = stats[0]["dose_steps"]
    wall = sweep.get("wall_s")
    posthoc = report_dir / "posthoc.md"
    wall_text = f" ({wall / 60:.1f} min wall in all, resumed parts included)." if wall else "."
    operands = f" (operands {config['operands']})" if config.get("operands") else ""
    md = ["# Does FRPO keep more? Sweep report", "",
          f"Command: `{sweep['command']}`{wall_text}",
          "Recomputed from this folder's data files by `python python/sweep_report.py <this folder>`.", "",
          f"Model `{config['model']}`, task `{config['task']}`{operands} -> downstream `{config['downstream']}`; "
          f"{rl_budget(config)} (lr {config['lr']}), then "
          f"{downstream_stage(config)} (batch {config['sft_batch']}, lr {config['sft_lr']}). Seeds {sweep['seeds']}; "
          f"stage-1 eval: {len(prompts)} prompts, greedy, after k = {', '.join(map(str, doses))} downstream steps. "
          f"Base model: stage-1 reward {base_reward:.3f}, downstream skill {base['downstream']:.3f}.", "",
          "## Primary measure (pre-registered in PROTOCOL.md)", "",
          verdict(primary) if primary else "No primary arm in this sweep.", "",
          per_seed_table(primary) if primary else "", "",
          "## RL failures", "",
          f"A seed on which an arm ends RL less than {RL_FAILURE_MARGIN} above the base model is left out of that "
          "arm's test against GRPO (and GRPO's failures out of every test); listed here, never dropped silently.", "",
          failures_text(failures), "",
          "## Secondary (pre-registered as descriptive)", "",
          *[f"- {verdict(comparisons[n])}" for n in others if n != primary_arm], "",
          text, "",
          "k=N: stage-1 reward after N downstream steps (seed means). Retention area: mean stage-1 reward over "
          "the dose points (after RL and every k) minus the base reward. vs GRPO: the retention area minus "
          "GRPO's on the same seed. Drop: reward after RL minus reward after the last dose. [lo, hi]: 95 % "
          "bootstrap CI over seeds and eval prompts (downstream: over seeds). RL steps, train reward at RL end: "
          "seed means. KL(after SFT || after RL): per completion, on the stage-1 eval prompts.", "",
          measures_text(measures, doses), "",
          "## Post hoc (decided after seeing the results)", "",
          posthoc.read_text().strip() if posthoc.exists() else "None.", "",
          "![decay curves](decay_curves.png)", "", "![retention vs lambda](retention_vs_lambda.png)", ""]
    (report_dir / "report.md").write_text("\n".join(md))
    plot(report_dir, stats, base_reward)
    return text


def json_safe(value):
    """value with NaN as None and +-inf as "inf" / "-inf" (a t statistic of equal differences):
    JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def add_wall_time(out: Path, seconds: float) -> float:
    """The sweep's wall time over all its invocations (a resumed sweep adds to the earlier ones)."""
    path = out / "wall_time.json"
    total = seconds + (json.loads(path.read_text())["seconds"] if path.exists() else 0.0)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seconds": total}) + "\n")
    tmp.replace(path)  # a kill mid-write leaves the previous total, never a torn file
    return total


class WallClock:
    """Adds the time since its last save to out/wall_time.json at most every `every` seconds (tick) and
    on save(): a sweep killed outright (SIGKILL, the machine going away) loses at most that much."""

    def __init__(self, out: Path, every: float = 60.0):
        self.out, self.every, self.mark = out, every, time.perf_counter()

    def tick(self):
        if time.perf_counter() - self.mark >= self.every:
            self.save()

    def save(self) -> float:
        now = time.perf_counter()
        total = add_wall_time(self.out, now - self.mark)
        self.mark = now
        return total


def plot(out: Path, stats: list[dict], base_reward: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lost) = plt.subplots(1, 2, figsize=(13, 4.4))
    doses = stats[0]["dose_steps"]
    for s in stats:
        band = np.array(s["reward_at_dose"]["ci"])
        grpo = s["name"] == "grpo"
        line, = ax.plot(doses, s["reward_at_dose"]["mean"], marker="o", label=s["name"],
                        linewidth=2.5 if grpo else 1.5, color="black" if grpo else None)
        ax.fill_between(doses, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.07)
        if not grpo:
            lost = np.array(s["lost_vs_grpo_at_dose"]["ci"])
            ax_lost.plot(doses, s["lost_vs_grpo_at_dose"]["mean"], marker="o", color=line.get_color(), label=s["name"])
            ax_lost.fill_between(doses, lost[:, 0], lost[:, 1], color=line.get_color(), alpha=0.1)
    ax.axhline(base_reward, color="gray", linestyle="--", label="base model")
    ax_lost.axhline(0.0, color="black", linewidth=2.5, label="grpo")
    ax.set(ylabel="stage-1 eval reward", title="stage-1 reward during the downstream fine-tune\n(mean over seeds, 95 % band)")
    ax_lost.set(ylabel="reward lost since RL, minus GRPO's",
                title="what the fine-tune took, paired with GRPO\n(below 0: lost less than GRPO; 95 % band)")
    for a in (ax, ax_lost):
        a.set_xscale("symlog", linthresh=1)
        a.set_xticks(doses, [str(k) for k in doses])
        a.set_xlabel("downstream SFT steps")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "decay_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    grpo = next(s for s in stats if s["name"] == "grpo")
    ax.axhspan(*grpo["retention_area"]["ci"], color="black", alpha=0.1)
    ax.axhline(grpo["retention_area"]["mean"], color="black", label="GRPO (band: 95 % CI)")
    fixed = [s for s in stats if isinstance(s["lam"], (int, float))]
    if fixed:
        lams = [s["lam"] for s in fixed]
        means = [s["retention_area"]["mean"] for s in fixed]
        errors = np.array([[m - s["retention_area"]["ci"][0], s["retention_area"]["ci"][1] - m]
                           for m, s in zip(means, fixed)]).T
        ax.errorbar(lams, means, yerr=errors, marker="o", capsize=3, label="FRPO, fixed lambda")
    for s in stats:
        if s["lam"] == "auto" and s["lam_groups_mean"] is not None and math.isfinite(s["lam_groups_mean"]):
            m = s["retention_area"]
            ax.errorbar([s["lam_groups_mean"]], [m["mean"]], yerr=[[m["mean"] - m["ci"][0]], [m["ci"][1] - m["mean"]]],
                        marker="*", markersize=12, capsize=3, linestyle="none",
                        label=f"FRPO lam=auto (rho={s['kl_radius']:.3g}), at its mean lambda_g")
    ax.set_xscale("log")
    ax.set(xlabel="lambda", ylabel="retention area (reward - base)", title="how much stage-1 reward survives")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "retention_vs_lambda.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python python/sweep_report.py REPORT_DIR   (a folder holding " + ", ".join(DATA_FILES) + ")",
              file=sys.stderr)
        return 2
    report_dir = Path(args[0])
    missing = [name for name in DATA_FILES if not (report_dir / name).exists()]
    if missing:
        print(f"error: {report_dir} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    print(write(report_dir))
    print(f"report: {report_dir / 'report.md'}, {report_dir / 'report.json'}, {report_dir / 'decay_curves.png'}, "
          f"{report_dir / 'retention_vs_lambda.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
