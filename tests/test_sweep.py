"""python/sweep.py end to end on the tiny preset: GRPO, a fixed-lambda FRPO arm and lam=auto with the
radius measured on the GRPO runs, two seeds, two runs at a time; the report folder is parsed back
(data files, the primary test, no absolute path), python/sweep_report.py redoes it from the data
files alone, and the same command again redoes nothing."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytest.importorskip("peft", reason="python/sweep.py runs python/train.py, which needs peft")
pytest.importorskip("matplotlib", reason="the sweep report draws its plots with matplotlib")

from python import sweep as sweep_script  # noqa: E402
from python.sweep_report import DATA_FILES, WallClock  # noqa: E402

SWEEP = [sys.executable, str(ROOT / "python" / "sweep.py"), "--preset", "tiny", "--seeds", "0..1", "--lams", "1",
         "--jobs", "2", "--threads", "1", "--sft-steps", "2", "--primary-arm", "frpo-lam1"]


def sweep(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(SWEEP + ["--out", str(out), "--kl-radius", "measured"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = sweep(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_report_parses_back(tiny_sweep):
    out, _ = tiny_sweep
    report = json.loads((out / "report.json").read_text())
    arms = {a["name"]: a for a in report["arms"]}
    assert list(arms) == ["grpo", "frpo-lam1", "frpo-auto"]
    for arm in arms.values():
        assert arm["seeds"] == [0, 1] and arm["dose_steps"] == [0, 1, 2]
        for key in ("reward_after_rl", "retention_area", "diff_vs_grpo", "downstream_after"):
            lo, hi = arm[key]["ci"]
            assert lo <= arm[key]["mean"] + 1e-12 and arm[key]["mean"] <= hi + 1e-12, key
        assert len(arm["reward_at_dose"]["mean"]) == len(arm["reward_at_dose"]["ci"]) == 3
    assert arms["frpo-lam1"]["lam"] == 1.0 and arms["frpo-auto"]["lam"] == "auto"
    # the radius is the GRPO runs' mean KL(after downstream || after RL) per completion
    grpo_kl = [json.loads((out / f"seed{s}" / "grpo" / "report.json").read_text())["arms"][0]["kl_seq_downstream_to_rl"]
               for s in (0, 1)]
    assert arms["frpo-auto"]["kl_radius"] == pytest.approx(sum(grpo_kl) / 2, rel=1e-5)
    assert 0.01 <= arms["frpo-auto"]["lam_groups_mean"] <= 100
    assert report["config"]["sft_steps"] == 2 and report["wall_s"] > 0
    assert report["config"]["downstream_adapter"] == "fresh" and report["config"]["task"] == "arithmetic_v2"
    for name in ("report.md", "decay_curves.png", "retention_vs_lambda.png", *DATA_FILES):
        assert (out / name).stat().st_size > 0, name
    assert "| frpo-auto |" in (out / "report.md").read_text()
    primary = report["primary"]
    assert primary["arm"] == "frpo-lam1" and primary["vs"] == "grpo" and primary["dose"] == 2
    assert [s["seed"] for s in report["primary_per_seed"]] == [0, 1]
    assert primary["n_seeds"] + len(primary["excluded_seeds"]) == 2
    assert [c["arm"] for c in report["secondary"]] == ["frpo-auto"]
    rows = (out / "per_prompt.csv").read_text().splitlines()
    assert rows[0] == "seed,arm,dose,prompt_id,reward" and len(rows) == 1 + 2 * 3 * 3 * report_eval_size(out)


def report_eval_size(out: Path) -> int:
    return len((out / "prompts.csv").read_text().splitlines()) - 1


def test_report_folder_names_no_absolute_path_and_recomputes(tiny_sweep, tmp_path):
    """The report folder's files (those a results/science/<task>/ folder commits) hold no absolute
    path, though --out was one; the report recomputed from its data files alone is the same."""
    out, _ = tiny_sweep
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in DATA_FILES + ("report.json",):
        shutil.copy(out / name, folder / name)
    for name in DATA_FILES + ("report.json", "report.md"):
        text = (out / name).read_text()
        assert str(out) not in text and str(ROOT) not in text, name
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "sweep_report.py"), str(folder)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "report.json").read_text() == (out / "report.json").read_text()


def test_seed_ranges():
    assert sweep_script.parse_seeds("0..7") == list(range(8))
    assert sweep_script.parse_seeds("0..3,8,2") == [0, 1, 2, 3, 8]
    args = sweep_script.parse_args(["--seeds", "0..7"])
    assert args.seed_list == list(range(8)) and args.lam_list == [2.0, 0.5] and args.preset == "full"
    assert [r.arm for r in sweep_script.plan(args)][::8] == ["grpo", "frpo-lam2", "frpo-lam0.5"]


def test_rerun_redoes_nothing(tiny_sweep):
    out, _ = tiny_sweep
    logs = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/metrics.jsonl")}
    assert len(logs) == 6
    proc = sweep(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" not in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def test_bad_radius_is_refused():
    proc = subprocess.run(SWEEP[:2] + ["--kl-radius", "-1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--kl-radius must be a number > 0 or 'measured'" in proc.stderr


def test_sigterm_stops_every_run_at_a_checkpoint_and_the_same_command_finishes(tmp_path):
    """What SLURM or Kubernetes send before a kill: every run still going saves a checkpoint, the
    sweep says how to continue, its time so far is kept, and the same command completes the sweep."""
    out = tmp_path / "sweep"
    command = SWEEP + ["--out", str(out), "--kl-radius", "0.5"]
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not list(out.glob("seed*/*/checkpoint.pt")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=240) == 143, (tmp_path / "log.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "The same command continues the sweep" in (tmp_path / "log.txt").read_text()
    assert json.loads((out / "wall_time.json").read_text())["seconds"] > 0
    assert not (out / "report.json").exists()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["grpo", "frpo-lam1", "frpo-auto"]
    assert report["arms"][2]["kl_radius"] == 0.5


def test_wall_clock_keeps_time_a_kill_would_lose(tmp_path, monkeypatch):
    """tick() saves once `every` seconds have passed, so a sweep killed outright (no finally) loses at
    most that much; save() adds to what an earlier invocation recorded."""
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    (tmp_path / "wall_time.json").write_text(json.dumps({"seconds": 1000.0}))
    clock = WallClock(tmp_path, every=60.0)
    now[0] += 59.0
    clock.tick()
    assert json.loads((tmp_path / "wall_time.json").read_text())["seconds"] == 1000.0
    now[0] += 2.0
    clock.tick()
    assert json.loads((tmp_path / "wall_time.json").read_text())["seconds"] == 1061.0
    now[0] += 10.0
    assert clock.save() == 1071.0
    assert not (tmp_path / "wall_time.tmp").exists()
