"""python/sweep_report.py's statistics on synthetic runs whose answers are known by construction."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sweep_report = pytest.importorskip("python.sweep_report", reason="needs numpy")

DOSES = [0, 1, 4]


def fake_run(tmp_path, seed, arm, rewards, lam=None, downstream=0.5):
    """A train.py report.json with one arm whose per-prompt stage-1 rewards at each dose are given."""
    out = tmp_path / f"seed{seed}" / arm
    out.mkdir(parents=True)
    result = {"name": arm, "loss_type": "grpo" if arm == "grpo" else "frpo", "lam": lam,
              "rewards_at_dose": {str(k): [float(x) for x in r] for k, r in zip(DOSES, rewards)},
              "downstream_after": downstream, "kl_to_base": 0.01, "kl_seq_downstream_to_rl": 0.2}
    (out / "report.json").write_text(json.dumps({"arms": [result], "config": {}}))
    return seed, arm, out


def test_identical_arms_differ_by_exactly_zero(tmp_path):
    rng = np.random.default_rng(1)
    runs = []
    for seed in range(3):
        rewards = rng.integers(0, 2, size=(len(DOSES), 50))
        runs += [fake_run(tmp_path, seed, "grpo", rewards), fake_run(tmp_path, seed, "frpo-lam1", rewards, lam=1.0)]
    stats = {s["name"]: s for s in sweep_report.statistics(sweep_report.load(runs), base_reward=0.2)}
    assert stats["frpo-lam1"]["diff_vs_grpo"] == {"mean": 0.0, "ci": [0.0, 0.0]}


def test_paired_difference_and_retention_area(tmp_path):
    """FRPO is right on exactly 10 more of 50 prompts at every dose on every seed: the paired
    difference is 0.2, and its CI excludes 0 (only how many of those 10 prompts a replicate draws
    varies)."""
    rng = np.random.default_rng(2)
    runs = []
    for seed in range(3):
        grpo = rng.integers(0, 2, size=(len(DOSES), 50))
        grpo[:, :10] = 0
        frpo = grpo.copy()
        frpo[:, :10] = 1
        runs += [fake_run(tmp_path, seed, "grpo", grpo), fake_run(tmp_path, seed, "frpo-lam1", frpo, lam=1.0)]
    stats = {s["name"]: s for s in sweep_report.statistics(sweep_report.load(runs), base_reward=0.1)}
    diff = stats["frpo-lam1"]["diff_vs_grpo"]
    assert diff["mean"] == pytest.approx(0.2)
    assert diff["ci"][0] > 0.1 and diff["ci"][1] < 0.3  # only how many of the 10 are resampled varies
    area = stats["grpo"]["retention_area"]
    all_grpo = np.array([json.loads((r[2] / "report.json").read_text())["arms"][0]["rewards_at_dose"]["0"]
                         for r in runs if r[1] == "grpo"])
    assert stats["grpo"]["reward_after_rl"]["mean"] == pytest.approx(all_grpo.mean())
    assert area["ci"][0] < area["mean"] < area["ci"][1]
    assert sweep_report.excludes_zero(diff["ci"]) == "yes, above"
    # an advantage held at every dose is no difference in what the downstream stage takes away
    assert stats["frpo-lam1"]["drop_vs_grpo"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats["frpo-lam1"]["drop_vs_grpo"]["ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    grpo_curve = np.mean([json.loads((r[2] / "report.json").read_text())["arms"][0]["rewards_at_dose"][str(k)]
                          for r in runs if r[1] == "grpo" for k in (DOSES[0],)]) - np.mean(
        [json.loads((r[2] / "report.json").read_text())["arms"][0]["rewards_at_dose"][str(DOSES[-1])]
         for r in runs if r[1] == "grpo"])
    assert stats["grpo"]["drop"]["mean"] == pytest.approx(grpo_curve)


def test_arms_must_share_seeds_and_doses(tmp_path):
    rewards = np.zeros((len(DOSES), 4))
    runs = [fake_run(tmp_path, 0, "grpo", rewards), fake_run(tmp_path, 1, "frpo-lam1", rewards, lam=1.0)]
    with pytest.raises(ValueError, match="frpo-lam1"):
        sweep_report.statistics(sweep_report.load(runs), base_reward=0.0)
