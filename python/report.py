"""The robustness report: printed table, report.md, report.json and PNG plots in the run folder.

Retention = (reward after downstream - base) / (reward after RL - base): the share of the RL gain
that survives the downstream fine-tune (undefined when RL gained nothing).
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def retention(arm: dict) -> float:
    gain = arm["reward_after_rl"] - arm["reward_base"]
    if gain <= 1e-9:
        return float("nan")
    return (arm["reward_after_downstream"] - arm["reward_base"]) / gain


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def table(arms: list[dict], base: dict) -> str:
    header = ["arm", "RL steps", "train reward at RL end", "reward base", "after RL", "after downstream", "drop",
              "retention", "downstream before", "downstream after", "KL to base"]
    rows = [[a["name"], a.get("rl_steps_done"), a.get("train_reward_end"), a["reward_base"], a["reward_after_rl"],
             a["reward_after_downstream"], a["reward_after_rl"] - a["reward_after_downstream"], retention(a),
             a["downstream_before"], a["downstream_after"], a["kl_to_base"]] for a in arms]
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    note = (f"base model: stage-1 reward {_fmt(base['reward'])}, downstream skill {_fmt(base['downstream'])} "
            f"(eval-set means)")
    return "\n".join(lines) + "\n" + note


def rl_budget(config: dict) -> str:
    """The RL stage's budget in words: fixed steps, or a target training reward with its cap."""
    size = f"{config['prompts_per_step']} prompts x G={config['group_size']}"
    if config.get("rl_target_reward") is not None:
        return (f"RL until the mean sampled reward over {config['rl_target_window']} steps reaches "
                f"{config['rl_target_reward']:g} (at most {config['rl_max_steps']} steps) x {size}")
    return f"{config['rl_steps']} RL steps x {size}"


def downstream_stage(config: dict) -> str:
    if config.get("downstream_adapter", "continue") == "fresh":
        return (f"{config['sft_steps']} SFT steps of a fresh LoRA (r={config['sft_lora_r']}) on the weights with the "
                f"RL adapter merged in")
    return f"{config['sft_steps']} SFT steps continuing the RL adapter"


def measures_table(arms: list[dict]) -> str:
    """The task's named measures (e.g. refusal rate) of each arm after RL and after the downstream stage."""
    if not any(a.get("measures_at_dose") for a in arms):
        return ""
    lines = []
    for a in arms:
        doses = sorted(a["measures_at_dose"], key=int)
        for k in (doses[0], doses[-1]):
            values = ", ".join(f"{name} {_fmt(v)}" for name, v in a["measures_at_dose"][k].items())
            lines.append(f"- {a['name']}, {'after RL' if k == doses[0] else f'after {k} downstream steps'}: {values}")
    return "\n".join(lines)


def write(out: Path, arms: list[dict], base: dict, config: dict, metrics: list[dict], timing: dict) -> str:
    arms_json = [a | {"retention": None if math.isnan(retention(a)) else retention(a)} for a in arms]
    report = {"arms": arms_json, "base": base, "config": config, "timing": timing}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = table(arms, base)
    md = ["# FRPO robustness report", "",
          f"Task `{config['task']}` (downstream: `{config['downstream']}`), model `{config['model']}`, "
          f"seed {config['seed']}, {rl_budget(config)}, then {downstream_stage(config)}.", "", text, "",
          measures_table(arms), "",
          "Rewards are eval-split means (greedy decoding). Drop = after RL - after downstream; "
          "retention = (after downstream - base) / (after RL - base). KL to base: mean per-token "
          "KL(policy || base) on the policy's eval completions after RL.", "",
          "Timing (mean seconds per RL step): " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()
                                                             if isinstance(v, float)), "",
          "![reward curves](reward_curves.png)", "", "![retention](retention.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    plot(out, arms, metrics)
    return text


def plot(out: Path, arms: list[dict], metrics: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rl, ax_sft, ax_dose) = plt.subplots(1, 3, figsize=(14, 3.8))
    for arm in arms:
        rl = [m for m in metrics if m["arm"] == arm["name"] and m["stage"] == "rl"]
        sft = [m for m in metrics if m["arm"] == arm["name"] and m["stage"] == "sft"]
        ax_rl.plot([m["step"] for m in rl], [m["reward_mean"] for m in rl], marker=".", label=arm["name"])
        ax_sft.plot([m["step"] for m in sft], [m["loss"] for m in sft], marker=".", label=arm["name"])
        doses = sorted(arm.get("reward_at_dose", {}).items(), key=lambda kv: int(kv[0]))
        ax_dose.plot([int(k) for k, _ in doses], [v for _, v in doses], marker="o", label=arm["name"])
    ax_dose.axhline(arms[0]["reward_base"], color="gray", linestyle="--", label="base model")
    ax_rl.set(title="RL stage: mean sampled reward", xlabel="step", ylabel="reward")
    ax_sft.set(title="downstream SFT: loss", xlabel="step", ylabel="NLL per token")
    ax_dose.set(title="stage-1 eval reward during downstream SFT", xlabel="downstream steps", ylabel="reward")
    for ax in (ax_rl, ax_sft, ax_dose):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(arms), 3.8))
    stages = [("reward_base", "base"), ("reward_after_rl", "after RL"), ("reward_after_downstream", "after downstream")]
    width = 0.8 / len(stages)
    for j, (key, label) in enumerate(stages):
        ax.bar([i + (j - 1) * width for i in range(len(arms))], [a[key] for a in arms], width, label=label)
    top = max(0.0, max(max(a[key] for key, _ in stages) for a in arms))  # (safety rewards may all be < 0)
    bottom = min(0.0, min(min(a[key] for key, _ in stages) for a in arms) * 1.1)  # safety rewards go to -1
    for i, arm in enumerate(arms):
        r = retention(arm)
        ax.text(i, top * 1.03 + 0.02, "retention " + ("n/a" if math.isnan(r) else f"{r:.0%}"),
                ha="center", fontsize=8)
    ax.set_xticks(range(len(arms)), [a["name"] for a in arms])
    # headroom above the bars for the retention labels and the legend
    ax.set(ylabel="stage-1 eval reward", title="stage-1 reward and retention per arm", ylim=(bottom, top * 1.3 + 0.1))
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=100)
    plt.close(fig)
