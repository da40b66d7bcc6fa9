"""python/sweep_report.py on synthetic runs whose answers are known by construction: the statistics,
the pre-registered paired test, RL failures, and the report folder's data files (per_prompt.csv
round trip; the report recomputed from the data files alone, the run folders gone)."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sweep_report = pytest.importorskip("python.sweep_report", reason="needs numpy")
from python import stats  # noqa: E402

DOSES = [0, 1, 4]
CONFIG = {"task": "arithmetic_v2", "operands": "10-99", "model": "tiny", "downstream": "reverse_words", "rl_steps": 4,
          "prompts_per_step": 2, "group_size": 8, "lr": 0.001, "sft_steps": 4, "sft_batch": 4, "sft_lr": 0.001,
          "downstream_adapter": "fresh", "sft_lora_r": 16, "out": "/somewhere/absolute", "seed": 0}


def fake_run(tmp_path, seed, arm, rewards, lam=None, downstream=0.5):
    """A train.py report.json with one arm whose per-prompt stage-1 rewards at each dose are given."""
    out = tmp_path / "runs" / f"seed{seed}" / arm
    out.mkdir(parents=True)
    result = {"name": arm, "loss_type": "grpo" if arm == "grpo" else "frpo", "lam": lam, "lr": 0.001,
              "rewards_at_dose": {str(k): [float(x) for x in r] for k, r in zip(DOSES, rewards)},
              "rl_steps_done": 4, "train_reward_end": 0.3, "downstream_before": 0.0,
              "downstream_after": downstream, "kl_to_base": 0.01, "kl_seq_downstream_to_rl": 0.2}
    (out / "report.json").write_text(json.dumps({"arms": [result], "config": CONFIG}))
    return seed, arm, out


def fake_sweep(tmp_path, runs, base_reward, n_prompts, seeds, primary="frpo-lam1"):
    """The report folder of fake runs (collect, then write), as sweep.py makes it."""
    base = tmp_path / "base_eval.json"
    base.write_text(json.dumps({"key": {}, "eval": {"reward": base_reward, "downstream": 0.0,
                                                    "rewards": [base_reward] * n_prompts}}))
    report_dir = tmp_path / "report"
    info = {"command": f"python python/sweep.py --out {tmp_path / 'runs'}", "seeds": seeds,
            "arms": list(dict.fromkeys(r[1] for r in runs)), "primary_arm": primary, "wall_s": 60.0}
    sweep_report.collect(report_dir, runs, base, info)
    sweep_report.write(report_dir)
    return report_dir


def paired_runs(tmp_path, n_seeds=4, n_prompts=50, gain=10, rng_seed=2):
    """GRPO and FRPO per seed; FRPO right on `gain` more prompts than GRPO at every dose."""
    rng = np.random.default_rng(rng_seed)
    runs = []
    for seed in range(n_seeds):
        grpo = rng.integers(0, 2, size=(len(DOSES), n_prompts))
        grpo[:, :gain] = 0
        frpo = grpo.copy()
        frpo[:, :gain] = 1
        runs += [fake_run(tmp_path, seed, "grpo", grpo), fake_run(tmp_path, seed, "frpo-lam1", frpo, lam=1.0)]
    return runs


def test_identical_arms_differ_by_exactly_zero(tmp_path):
    rng = np.random.default_rng(1)
    runs = []
    for seed in range(3):
        rewards = rng.integers(0, 2, size=(len(DOSES), 50))
        runs += [fake_run(tmp_path, seed, "grpo", rewards), fake_run(tmp_path, seed, "frpo-lam1", rewards, lam=1.0)]
    stats_ = {s["name"]: s for s in sweep_report.statistics(sweep_report.load(runs), base_reward=0.2)}
    assert stats_["frpo-lam1"]["diff_vs_grpo"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    c = sweep_report.compare(sweep_report.load(runs), "frpo-lam1", base_reward=0.2)
    assert c["mean_diff"] == 0.0 and c["p_one_sided"] == 0.5 and c["ci"] == [0.0, 0.0]


def test_paired_difference_and_retention_area(tmp_path):
    """FRPO is right on exactly 10 more of 50 prompts at every dose on every seed: the paired
    difference is 0.2, and its CI excludes 0 (only how many of those 10 prompts a replicate draws
    varies)."""
    runs = paired_runs(tmp_path, n_seeds=3)
    stats_ = {s["name"]: s for s in sweep_report.statistics(sweep_report.load(runs), base_reward=0.1)}
    diff = stats_["frpo-lam1"]["diff_vs_grpo"]
    assert diff["mean"] == pytest.approx(0.2)
    assert diff["ci"][0] > 0.1 and diff["ci"][1] < 0.3
    area = stats_["grpo"]["retention_area"]
    all_grpo = np.array([json.loads((r[2] / "report.json").read_text())["arms"][0]["rewards_at_dose"]["0"]
                         for r in runs if r[1] == "grpo"])
    assert stats_["grpo"]["reward_after_rl"]["mean"] == pytest.approx(all_grpo.mean())
    assert area["ci"][0] < area["mean"] < area["ci"][1]
    assert sweep_report.excludes_zero(diff["ci"]) == "yes, above"
    # an advantage held at every dose is no difference in what the downstream stage takes away
    assert stats_["frpo-lam1"]["drop_vs_grpo"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats_["frpo-lam1"]["drop_vs_grpo"]["ci"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_arms_must_share_seeds_and_doses(tmp_path):
    rewards = np.zeros((len(DOSES), 4))
    runs = [fake_run(tmp_path, 0, "grpo", rewards), fake_run(tmp_path, 1, "frpo-lam1", rewards, lam=1.0)]
    with pytest.raises(ValueError, match="frpo-lam1"):
        sweep_report.statistics(sweep_report.load(runs), base_reward=0.0)


def test_primary_is_the_paired_t_test_over_seeds(tmp_path):
    """Per-seed differences of known size: the report's primary is their mean, the t-test on them
    and a bootstrap CI of their mean."""
    n_prompts, runs, diffs = 20, [], [0.10, 0.05, 0.20, -0.05, 0.15]
    for seed, d in enumerate(diffs):
        grpo = np.zeros((len(DOSES), n_prompts))
        grpo[0] = 1.0  # both arms learned (reward after RL 1.0), then lost it
        frpo = grpo.copy()
        frpo[-1, :round(d * n_prompts)] = 1.0 if d > 0 else 0.0
        if d < 0:
            grpo[-1, :round(-d * n_prompts)] = 1.0
        runs += [fake_run(tmp_path, seed, "grpo", grpo), fake_run(tmp_path, seed, "frpo-lam1", frpo, lam=1.0)]
    report_dir = fake_sweep(tmp_path, runs, base_reward=0.1, n_prompts=n_prompts, seeds=list(range(len(diffs))))
    primary = json.loads((report_dir / "report.json").read_text())["primary"]
    expected = stats.paired_t_test(diffs)
    assert set(primary) >= {"arm", "vs", "dose", "mean_diff", "ci", "p_one_sided", "n_seeds"}
    assert primary["arm"] == "frpo-lam1" and primary["vs"] == "grpo" and primary["dose"] == DOSES[-1]
    assert primary["n_seeds"] == 5 and primary["excluded_seeds"] == []
    assert primary["mean_diff"] == pytest.approx(np.mean(diffs))
    assert primary["p_one_sided"] == pytest.approx(expected["p_one_sided"])
    assert 0.0 < primary["p_one_sided"] < 0.5
    assert primary["ci"] == pytest.approx(stats.bootstrap_mean_ci(diffs))
    assert min(diffs) <= primary["ci"][0] < primary["mean_diff"] < primary["ci"][1] <= max(diffs)
    assert "## Primary measure (pre-registered in PROTOCOL.md)" in (report_dir / "report.md").read_text()


def test_rl_failures_are_left_out_and_listed(tmp_path):
    """Seed 1's FRPO arm ends RL at the base reward: the primary test leaves seed 1 out and says so,
    the failure is listed with its numbers, and the test on every seed is reported too."""
    runs, n_prompts = [], 20
    for seed in range(4):
        grpo = np.zeros((len(DOSES), n_prompts))
        grpo[0, :10] = 1.0
        frpo = grpo.copy()
        frpo[-1, :2] = 1.0
        if seed == 1:
            frpo[0] = 0.0  # 0.0 after RL: not above the base (0.02) by RL_FAILURE_MARGIN
        runs += [fake_run(tmp_path, seed, "grpo", grpo), fake_run(tmp_path, seed, "frpo-lam1", frpo, lam=1.0)]
    report_dir = fake_sweep(tmp_path, runs, base_reward=0.02, n_prompts=n_prompts, seeds=[0, 1, 2, 3])
    report = json.loads((report_dir / "report.json").read_text())
    assert report["primary"]["excluded_seeds"] == [1] and report["primary"]["n_seeds"] == 3
    assert report["primary_all_seeds"]["n_seeds"] == 4
    assert [(f["seed"], f["arm"]) for f in report["rl_failures"]] == [(1, "frpo-lam1")]
    assert report["rl_failures"][0]["reward_after_rl"] == 0.0
    md = (report_dir / "report.md").read_text()
    assert "RL failure: left out" in md and "| 1 | frpo-lam1 | 0.000 | 0.020 |" in md


def test_per_prompt_csv_round_trip(tmp_path):
    runs = paired_runs(tmp_path, n_seeds=2, n_prompts=7)
    report_dir = fake_sweep(tmp_path, runs, base_reward=0.1, n_prompts=7, seeds=[0, 1])
    with (report_dir / "per_prompt.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["seed", "arm", "dose", "prompt_id", "reward"]
    assert len(rows) == 2 * 2 * len(DOSES) * 7
    arms, _, _, prompts = sweep_report.load_dir(report_dir)
    assert len(prompts) == 7 and prompts[0]["prompt"].endswith("Write the equation with its result.")
    for seed, arm, out in runs:
        saved = json.loads((out / "report.json").read_text())["arms"][0]["rewards_at_dose"]
        loaded = arms[arm]["results"][arms[arm]["seeds"].index(seed)]["rewards_at_dose"]
        assert loaded == saved


def test_report_recomputed_from_the_data_files_alone(tmp_path):
    """The run folders deleted, `python python/sweep_report.py DIR` writes the same report.json, and no
    file of the folder names an absolute path (the sweep's --out was one)."""
    runs = paired_runs(tmp_path, n_seeds=3, n_prompts=12)
    report_dir = fake_sweep(tmp_path, runs, base_reward=0.1, n_prompts=12, seeds=[0, 1, 2])
    first = (report_dir / "report.json").read_text()
    shutil.rmtree(tmp_path / "runs")
    for name in ("report.json", "report.md", "decay_curves.png", "retention_vs_lambda.png"):
        (report_dir / name).unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "sweep_report.py"), str(report_dir)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (report_dir / "report.json").read_text() == first
    assert (report_dir / "decay_curves.png").stat().st_size > 0
    for path in report_dir.iterdir():
        if path.suffix in (".md", ".json", ".csv"):
            text = path.read_text()
            assert str(tmp_path) not in text and "/somewhere/absolute" not in text, path.name


def test_missing_data_file_is_named(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "sweep_report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "per_prompt.csv" in proc.stderr


def test_relative_paths():
    inside = ROOT / "runs" / "sweep"
    assert sweep_report.relative_paths(f"--out {inside} --seeds 0..7") == "--out runs/sweep --seeds 0..7"
    assert sweep_report.relative_paths(f"--report-to={inside}") == "--report-to=runs/sweep"
    assert sweep_report.relative_paths("--out /tmp/elsewhere/x y") == "--out <elsewhere>/x y"


def test_grpo_only_pilot_report(tmp_path):
    """The pilot's sweep (--lams ""): GRPO alone, no primary test, the report still written."""
    rng = np.random.default_rng(3)
    runs = [fake_run(tmp_path, seed, "grpo", rng.integers(0, 2, size=(len(DOSES), 9))) for seed in (100, 101)]
    report_dir = fake_sweep(tmp_path, runs, base_reward=0.1, n_prompts=9, seeds=[100, 101], primary="frpo-lam2")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["primary"] is None and report["secondary"] == [] and [a["name"] for a in report["arms"]] == ["grpo"]
    assert "No primary arm in this sweep." in (report_dir / "report.md").read_text()
