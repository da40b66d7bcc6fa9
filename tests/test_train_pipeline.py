"""End-to-end smoke test of python/train.py on the tiny preset: both arms, the report files, an
interrupted run (--stop-after-steps, SIGTERM mid-step, mid-eval and from outside) that --resume
continues to the same losses as an uninterrupted one, and --resume of a run that is already complete.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "python" / "train.py"
sys.path.insert(0, str(ROOT))
train = pytest.importorskip("python.train", reason="python/train.py needs transformers, peft and tqdm")

TINY = ["--preset", "tiny", "--seed", "3"]  # the full_run fixture's flags (plus --out)
ARM_KEYS = {"name", "loss_type", "lam", "reward_base", "reward_after_rl", "reward_after_downstream",
            "downstream_before", "downstream_after", "kl_to_base"}


def losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["arm"], r["stage"], r["step"], r["loss"], r.get("reward_mean")) for r in rows]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def test_tiny_pipeline_writes_report(full_run):
    report = json.loads((full_run / "report.json").read_text())
    assert [a["loss_type"] for a in report["arms"]] == ["grpo", "frpo"]
    for arm in report["arms"]:
        assert ARM_KEYS <= arm.keys()
        for key in ARM_KEYS - {"name", "loss_type", "lam"}:
            assert isinstance(arm[key], float), key
        assert 0.0 <= arm["reward_after_rl"] <= 1.0 and arm["kl_to_base"] >= 0.0
    assert report["arms"][1]["lam"] == 2.0
    assert report["config"]["task"] == "arithmetic_v2" and report["config"]["seed"] == 3
    assert report["config"]["downstream_adapter"] == "fresh" and report["arms"][0]["downstream_adapter"] == "fresh"
    assert [a["rl_steps_done"] for a in report["arms"]] == [report["config"]["rl_steps"]] * 2
    for name in ("report.md", "reward_curves.png", "retention.png", "checkpoint.pt"):
        assert (full_run / name).stat().st_size > 0, name
    config = report["config"]
    steps = 2 * (config["rl_steps"] + config["sft_steps"])
    assert len(losses(full_run)) == steps
    assert "| frpo(lam=2)" in (full_run / "report.md").read_text()


def test_dose_curve_in_report(full_run):
    """The stage-1 reward after 0, 1 and 3 downstream steps (the tiny preset's dose points): the ends
    of the curve are the evals after RL and after the downstream stage, one score per eval prompt."""
    report = json.loads((full_run / "report.json").read_text())
    eval_limit = report["config"]["eval_limit"]
    for arm in report["arms"]:
        assert sorted(arm["reward_at_dose"], key=int) == ["0", "1", "3"]
        assert arm["reward_at_dose"]["0"] == arm["reward_after_rl"]
        assert arm["reward_at_dose"]["3"] == arm["reward_after_downstream"]
        for k, scores in arm["rewards_at_dose"].items():
            assert len(scores) == eval_limit and sum(scores) / len(scores) == arm["reward_at_dose"][k]
        assert arm["kl_seq_downstream_to_rl"] > 0  # the downstream steps moved the policy


def test_resume_inside_the_dose_loop_gives_the_same_report(full_run, tmp_path):
    """Stopped after 2 downstream steps (past dose 1): the resumed run reports the same dose curve and
    the same KL to the after-RL policy, whose adapter the checkpoint carries."""
    config = json.loads((full_run / "report.json").read_text())["config"]
    argv = TINY + ["--out", str(tmp_path)]
    assert train.main(argv + ["--stop-after-steps", str(config["rl_steps"] + 2)]) == 130
    assert train.main(argv + ["--resume"]) == 0
    resumed = json.loads((tmp_path / "report.json").read_text())["arms"]
    assert resumed == json.loads((full_run / "report.json").read_text())["arms"]


def test_base_eval_file_is_shared(full_run, tmp_path, capsys):
    base = tmp_path / "base.json"
    argv = TINY + ["--rl-steps", "1", "--sft-steps", "1", "--loss", "grpo", "--base-eval", str(base)]
    assert train.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "base: from" not in capsys.readouterr().out
    assert train.main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert f"base: from {base}" in capsys.readouterr().out
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("a", "b")]
    assert reports[0]["base"] == reports[1]["base"] == json.loads(base.read_text())["eval"]


def test_resume_reproduces_uninterrupted_losses(full_run, tmp_path, capsys):
    config = json.loads((full_run / "report.json").read_text())["config"]
    # stop inside the second arm's RL stage: checkpoints, phase boundaries and RNG all matter
    stop = config["rl_steps"] + config["sft_steps"] + 2
    argv = TINY + ["--out", str(tmp_path)]
    assert train.main(argv + ["--stop-after-steps", str(stop)]) == 130
    assert "--resume" in capsys.readouterr().out
    assert len(losses(tmp_path)) == stop
    assert train.main(argv + ["--resume"]) == 0
    assert losses(tmp_path) == losses(full_run)


@pytest.fixture
def sigterm_fails_the_test():
    """A SIGTERM that train.main leaves unhandled fails the test here instead of killing pytest."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM was not handled by train.py")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def sigterm_on_call(n: int, function):
    """function, wrapped to send this process SIGTERM as its n-th call starts."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)
    return wrapped


def test_sigterm_mid_step_and_mid_eval_resume_exactly(full_run, tmp_path, monkeypatch, capsys,
                                                      sigterm_fails_the_test):
    argv = TINY + ["--out", str(tmp_path)]
    # in RL step 1, between its loss and its optimizer step: the step is finished, then the run stops
    monkeypatch.setattr(train.frpo_kernels, "linear_loss", sigterm_on_call(2, train.frpo_kernels.linear_loss))
    assert train.main(argv) == 143
    assert "checkpoint saved to" in capsys.readouterr().out
    assert [row[:3] for row in losses(tmp_path)] == [("grpo", "rl", 0), ("grpo", "rl", 1)]
    monkeypatch.undo()
    # in the eval after RL (the resumed run's first): the run stops at once; --resume redoes the eval
    monkeypatch.setattr(train.evaluation, "evaluate", sigterm_on_call(1, train.evaluation.evaluate))
    assert train.main(argv + ["--resume"]) == 143
    assert "at arm 0, phase eval_rl, step 0; continue with the same command plus --resume" in capsys.readouterr().out
    assert len(losses(tmp_path)) == json.loads((full_run / "report.json").read_text())["config"]["rl_steps"]
    monkeypatch.undo()
    assert train.main(argv + ["--resume"]) == 0
    assert losses(tmp_path) == losses(full_run)


def test_sigterm_from_outside_saves_a_checkpoint_that_resumes_exactly(full_run, tmp_path):
    # what SLURM, Kubernetes and torchrun send before a kill, at whatever point the run has reached
    # once its first checkpoint exists (mid-step or not)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with log.open("w") as output:
        proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *TINY, "--out", str(out)],
                                stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "checkpoint saved to" in log.read_text() and "--resume" in log.read_text()
    assert 0 < len(losses(out)) < len(losses(full_run))
    assert train.main(TINY + ["--out", str(out), "--resume"]) == 0
    assert losses(out) == losses(full_run)


def resume_complete_run(run: Path, capsys) -> str:
    """--resume on a finished run: exit status 0 and exactly one line of output, returned."""
    assert train.main(TINY + ["--out", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1, lines
    assert "complete" in lines[0] and str(run / "report.md") in lines[0]
    return lines[0]


def test_resume_of_complete_run_writes_missing_report(full_run, tmp_path, capsys):
    # what a run killed after its last checkpoint but before its report leaves behind
    run = shutil.copytree(full_run, tmp_path / "run")
    (run / "report.md").unlink()
    resume_complete_run(run, capsys)
    def without_timing(path):  # the rewritten report has the steps' timing but not the run's wall time
        return [line for line in path.read_text().splitlines() if not line.startswith("Timing")]

    assert without_timing(run / "report.md") == without_timing(full_run / "report.md")
    assert losses(run) == losses(full_run)


def test_resume_of_complete_run_says_so(full_run, tmp_path, capsys):
    run = shutil.copytree(full_run, tmp_path / "run")
    before = {f.name: f.stat().st_mtime_ns for f in run.iterdir()}
    resume_complete_run(run, capsys)
    assert {f.name: f.stat().st_mtime_ns for f in run.iterdir()} == before  # nothing rewritten


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--lam", "auto"], "lam auto needs --kl-radius > 0"),
    (["--lams", "1,auto", "--kl-radius", "0"], "lam auto needs --kl-radius > 0"),
    (["--lam", "1", "--kl-radius", "0.3"], "--kl-radius is used only by an FRPO arm with lam auto"),
    (["--lams", "1,-2"], "--lam/--lams take numbers > 0 or auto"),
    (["--eval-downstream-at", "1,x"], "--eval-downstream-at takes comma-separated step counts"),
    (["--sft-steps", "4", "--eval-downstream-at", "1,8"], "every step count must be in [0, --sft-steps=4]"),
    (["--rl-target-reward", "0.5"], "--rl-target-reward takes --rl-max-steps (its cap) and no --rl-steps"),
    (["--rl-target-reward", "0.5", "--rl-max-steps", "4", "--rl-steps", "2"], "and no --rl-steps"),
    (["--rl-max-steps", "4"], "--rl-max-steps is the cap of --rl-target-reward"),
    (["--task", "refusal", "--operands", "10-99"], "--operands is a setting of --task arithmetic_v2"),
    (["--operands", "0-9"], "--operands: operands: LO-HI"),
    (["--frpo-small-lam-lr", "-1"], "--frpo-small-lam-lr must be > 0"),
    (["--sft-lora-r", "0"], "--sft-lora-r must be >= 1"),
    (["--task", "arithmetic", "--warm-start-steps", "1"], "task arithmetic has no demonstrations"),
    (["--warm-start-steps", "-1"], "--warm-start-steps must be >= 0"),
])
def test_bad_arguments_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_scripts_run_from_anywhere_without_shadowing(tmp_path):
    """python/ is a package: its scripts run by path from any folder, and the folder Python puts first
    on sys.path for a script (python/) is taken off it, so that its module names never shadow
    installed packages (HF's evaluate, say)."""
    for script, module in (("train.py", "python.evaluation"), ("sweep.py", "python.sweep_report")):
        path = TRAIN_PY.parent / script
        probe = (f"import runpy, sys; sys.path.insert(0, {str(path.parent)!r}); sys.argv = [{str(path)!r}, '--help']\n"
                 f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
                 f"assert {str(path.parent)!r} not in sys.path, sys.path\nassert {module!r} in sys.modules\n")
        proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage:" in proc.stdout


def test_resume_without_checkpoint_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--out", str(tmp_path), "--resume"])
    assert "run without --resume first" in capsys.readouterr().err


def test_missing_model_path_says_so(tmp_path):
    from python import model_loading

    with pytest.raises(model_loading.ModelNotFound, match="no such file or directory"):
        model_loading.load_model(str(tmp_path / "no-such-model"))


def test_rl_and_sft_never_build_vocab_logits(tmp_path, monkeypatch):
    """RL and SFT score completions from hidden states (linear_loss / linear_token_logprobs): the
    logits-taking entry points are never called."""
    def refuse(*args, **kwargs):
        raise AssertionError("train.py built [B, T, V] logits for the loss")
    monkeypatch.setattr(train.frpo_kernels, "loss", refuse)
    monkeypatch.setattr(train.frpo_kernels, "token_logprobs", refuse)
    assert train.main(TINY + ["--out", str(tmp_path), "--rl-steps", "1", "--sft-steps", "1"]) == 0


@pytest.mark.parametrize("task", ["refusal", "arithmetic", "safety"])
def test_every_task_runs_on_the_tiny_preset(task, tmp_path):
    """(arithmetic_v2, the default, is the full_run fixture's.) Its measures (refusal rate, ...) go
    into the report at every dose."""
    argv = TINY + ["--task", task, "--loss", "grpo", "--rl-steps", "1", "--sft-steps", "1", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    arm = json.loads((tmp_path / "report.json").read_text())["arms"][0]
    assert sorted(arm["rewards_at_dose"]) == ["0", "1"]
    if task == "refusal":
        assert set(arm["measures_at_dose"]["1"]) == {"refusal rate (disallowed)", "over-refusal (allowed)",
                                                     "answered correctly (allowed)"}
        assert "refusal rate (disallowed)" in (tmp_path / "report.md").read_text()


def test_warm_start_makes_the_base_model(tmp_path):
    """--warm-start-steps: the base eval is of the warm-started model (another base reward than without),
    keyed by the warm start in --base-eval (a task without demonstrations: test_bad_arguments_...)."""
    argv = TINY + ["--task", "refusal", "--loss", "grpo", "--rl-steps", "1", "--sft-steps", "1",
                   "--base-eval", str(tmp_path / "base.json")]
    assert train.main(argv + ["--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "base.json").read_text())
    assert train.main(argv + ["--warm-start-steps", "3", "--warm-start-lr", "0.05", "--out", str(tmp_path / "ws")]) == 0
    warm = json.loads((tmp_path / "base.json").read_text())
    assert warm["key"] == dict(plain["key"], warm_start_steps=3, warm_start_lr=0.05)
    assert warm["eval"]["rewards"] != plain["eval"]["rewards"]


def test_downstream_adapter_continue_trains_the_rl_adapter(tmp_path):
    """continue: the downstream stage trains the RL adapter on (the checkpoint's adapter is the RL one);
    fresh (the default): a new adapter of rank --sft-lora-r."""
    import torch

    argv = TINY + ["--loss", "grpo", "--rl-steps", "1", "--sft-steps", "1"]
    assert train.main(argv + ["--downstream-adapter", "continue", "--out", str(tmp_path / "c")]) == 0
    assert train.main(argv + ["--sft-lora-r", "4", "--out", str(tmp_path / "f")]) == 0
    kept = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["adapter"]
    fresh = torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=False)["adapter"]
    assert all(".default." in k for k in kept) and all(".downstream." in k for k in fresh)
    assert {v.shape[0] for k, v in fresh.items() if "lora_A" in k} == {4}
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["config"]["downstream_adapter"] == report["arms"][0]["downstream_adapter"] == "continue"
    assert "continuing the RL adapter" in (tmp_path / "c" / "report.md").read_text()


def test_rl_until_a_target_reward(tmp_path):
    """--rl-target-reward R --rl-max-steps N: RL stops once the mean sampled reward of the last
    --rl-target-window steps reaches R (every arithmetic_v2 reward is >= 0, so 0 is reached as soon as
    the window is full), or after N steps; a run stopped right where the target is reached resumes
    without an extra step."""
    argv = TINY + ["--loss", "grpo", "--rl-target-reward", "0", "--rl-max-steps", "5", "--rl-target-window", "2",
                   "--sft-steps", "1"]
    assert train.main(argv + ["--out", str(tmp_path / "a")]) == 0
    arm = json.loads((tmp_path / "a" / "report.json").read_text())["arms"][0]
    assert arm["rl_steps_done"] == 2 and arm["rl_target_reached"] is True
    budget = "until the mean sampled reward over 2 steps reaches 0 (at most 5 steps)"
    assert budget in (tmp_path / "a" / "report.md").read_text()
    assert train.main(argv + ["--out", str(tmp_path / "b"), "--stop-after-steps", "2"]) == 130
    assert train.main(argv + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    capped = TINY + ["--loss", "grpo", "--rl-target-reward", "2", "--rl-max-steps", "3", "--sft-steps", "1"]
    assert train.main(capped + ["--out", str(tmp_path / "c")]) == 0
    arm = json.loads((tmp_path / "c" / "report.json").read_text())["arms"][0]
    assert arm["rl_steps_done"] == 3 and arm["rl_target_reached"] is False


def test_frpo_small_lam_lr():
    args = train.parse_args(["--preset", "tiny", "--lams", "0.5,2,auto", "--kl-radius", "0.3",
                             "--frpo-small-lam-lr", "5e-4"])
    assert {a["name"]: a["lr"] for a in train.make_arms(args)} == {
        "grpo": 1e-3, "frpo(lam=0.5)": 5e-4, "frpo(lam=2)": 1e-3, "frpo(lam=auto,rho=0.3)": 1e-3}
    args = train.parse_args(["--preset", "tiny", "--lams", "0.5"])
    assert [a["lr"] for a in train.make_arms(args)] == [1e-3, 1e-3]


def test_presets():
    default, full = train.parse_args([]), train.parse_args(["--preset", "full"])
    assert default.task == full.task == "arithmetic_v2" and default.downstream_adapter == "fresh"
    assert default.dose_steps == [0, 4, 8] and full.dose_steps == [0, 4, 8, 16, 32]
    assert default.eval_limit == 40 and full.eval_limit is None
