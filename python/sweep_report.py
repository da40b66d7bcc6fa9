"""The sweep's statistics, report.md / report.json and its two plots.

Per arm, over seeds: the stage-1 eval reward after RL and after each downstream dose (k SFT
steps), the retention area (mean reward over the dose points minus the base reward), and its paired
difference to GRPO of the same seed. 95 % CIs come from a bootstrap that resamples seeds and,
within each, eval prompts; every arm shares the resampled indices, so differences are paired.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BOOTSTRAP = 2000


def load(runs: list[tuple[int, str, Path]]) -> dict:
    """{arm: {"seeds": [...], "results": [train.py's arm result per seed]}} in run order."""
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


def statistics(arms: dict, base_reward: float) -> list[dict]:
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
        lam_groups = [r.get("lam_groups_mean") for r in results]
        out.append({
            "name": name, "loss_type": first["loss_type"], "lam": first["lam"], "kl_radius": first.get("kl_radius"),
            "seeds": arm["seeds"],
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
            "lam_groups_mean": None if None in lam_groups else float(np.mean(lam_groups)),
        })
    return out


def excludes_zero(ci) -> str:
    return "yes, above" if ci[0] > 0 else "yes, below" if ci[1] < 0 else "no"


def _ci(s: dict, digits=3) -> str:
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def table(stats: list[dict]) -> str:
    doses = stats[0]["dose_steps"]
    header = ["arm", "after RL", *[f"k={k}" for k in doses[1:]], "retention area", "vs GRPO (paired)",
              "CI excludes 0", f"drop (after RL - k={doses[-1]})", "drop vs GRPO (paired)", "downstream after",
              "KL to base after RL", "KL(after SFT || after RL)"]
    grpo = lambda s, text: "-" if s["name"] == "grpo" else text  # noqa: E731
    rows = [[s["name"], _ci(s["reward_after_rl"]), *[f"{m:.3f}" for m in s["reward_at_dose"]["mean"][1:]],
             _ci(s["retention_area"]), grpo(s, _ci(s["diff_vs_grpo"])), grpo(s, excludes_zero(s["diff_vs_grpo"]["ci"])),
             _ci(s["drop"]), grpo(s, _ci(s["drop_vs_grpo"])), _ci(s["downstream_after"]),
             f"{s['kl_to_base_after_rl']:.4f}", f"{s['kl_downstream_to_rl']:.3f}"] for s in stats]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(stats: list[dict]) -> str:
    """Which arms keep more than GRPO, in words, with what they cost in RL reward and downstream skill."""
    grpo = next(s for s in stats if s["name"] == "grpo")
    lines = []
    for s in stats:
        if s["name"] == "grpo":
            continue
        d = s["diff_vs_grpo"]
        word = {"yes, above": "keeps MORE stage-1 reward than GRPO", "yes, below": "keeps LESS than GRPO",
                "no": "is not distinguishable from GRPO"}[excludes_zero(d["ci"])]
        drop = s["drop_vs_grpo"]
        lines.append(f"- **{s['name']}** {word} (retention area {d['mean']:+.3f} vs GRPO, 95 % CI "
                     f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]); drop through the downstream stage {drop['mean']:+.3f} vs "
                     f"GRPO (CI [{drop['ci'][0]:+.3f}, {drop['ci'][1]:+.3f}]); reward after RL "
                     f"{s['reward_after_rl']['mean'] - grpo['reward_after_rl']['mean']:+.3f} and downstream skill "
                     f"{s['downstream_after']['mean'] - grpo['downstream_after']['mean']:+.3f} vs GRPO.")
    return "\n".join(lines)


def write(out: Path, runs: list[tuple[int, str, Path]], command: str, wall_s: float) -> str:
    arms = load(runs)
    base = json.loads((out / "base_eval.json").read_text())["eval"]
    stats = statistics(arms, base["reward"])
    config = json.loads((runs[0][2] / "report.json").read_text())["config"]
    config = {k: v for k, v in config.items() if k not in ("out", "seed", "loss", "lam", "lams", "kl_radius",
                                                          "resume", "lam_list")}
    report = {"arms": stats, "base": {k: base[k] for k in ("reward", "downstream")}, "config": config,
              "command": command, "wall_s": wall_s, "bootstrap": BOOTSTRAP}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(stats)
    md = ["# Does FRPO keep more? Sweep report", "",
          f"Command: `{command}` ({wall_s / 60:.1f} min wall in all, resumed parts included).", "",
          f"Model `{config['model']}`, task `{config['task']}` -> downstream `{config['downstream']}`; "
          f"{config['rl_steps']} RL steps x {config['prompts_per_step']} prompts x G={config['group_size']} "
          f"(lr {config['lr']}), then {config['sft_steps']} downstream SFT steps (batch {config['sft_batch']}, "
          f"lr {config['sft_lr']}). Seeds {stats[0]['seeds']}; stage-1 eval: {len(arms['grpo']['results'][0]['rewards_at_dose']['0'])} "
          f"prompts, greedy. Base model: stage-1 reward {base['reward']:.3f}, downstream skill {base['downstream']:.3f}.", "",
          text, "",
          "k=N: stage-1 reward after N downstream steps (seed means). Retention area: mean stage-1 reward over "
          "the dose points (after RL and every k) minus the base reward. vs GRPO: the retention area minus "
          "GRPO's on the same seed. Drop: reward after RL minus reward after the last dose (what the "
          "downstream stage took away; it ignores how much RL gained). [lo, hi]: 95 % bootstrap CI over seeds and eval prompts (downstream: over "
          "seeds). KL(after SFT || after RL): per completion, on the stage-1 eval prompts.", "",
          "## What it says", "", verdict(stats), "",
          "![decay curves](decay_curves.png)", "", "![retention vs lambda](retention_vs_lambda.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    plot(out, stats, base["reward"])
    return text


def add_wall_time(out: Path, seconds: float) -> float:
    """The sweep's wall time over all its invocations (a resumed sweep adds to the earlier ones)."""
    path = out / "wall_time.json"
    total = seconds + (json.loads(path.read_text())["seconds"] if path.exists() else 0.0)
    path.write_text(json.dumps({"seconds": total}) + "\n")
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
