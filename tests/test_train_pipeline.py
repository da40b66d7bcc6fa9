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
    assert report["config"]["task"] == "arithmetic" and report["config"]["seed"] == 3
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
