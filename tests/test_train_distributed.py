"""python/train.py under torchrun: 2 gloo processes give the one-process run at the same global batch.

The same small config (uneven shards: 3 prompts and 5 SFT examples per step over 2 ranks; FRPO with a
KL term; the safety task, whose rewards vary from the first step) runs once in one process and once
with `python -m torch.distributed.run --nproc_per_node 2 --standalone`; the per-step losses and
rewards in metrics.jsonl and the evaluations in report.json must agree (float32 reduction order
differs between the two, so losses to 1e-5 relative). Also: a prompt's sampled completions do not
depend on the other prompts in its batch (what makes the sharded rollouts equal the one-process ones).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytest.importorskip("python.train", reason="python/train.py needs transformers, peft and tqdm")
from python import model_loading, rollout, tasks  # noqa: E402

CONFIG = ["--preset", "tiny", "--loss", "frpo", "--task", "safety", "--beta", "0.05", "--prompts-per-step", "3",
          "--sft-batch", "5", "--rl-steps", "3", "--sft-steps", "2", "--eval-limit", "6", "--seed", "0"]


def run(out: Path, nproc: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    proc = subprocess.run(launcher + [str(ROOT / "python" / "train.py"), *CONFIG, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "report.json").read_text()), proc.stdout


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_two_processes_match_one(tmp_path):
    rows1, report1, _ = run(tmp_path / "one", 1)
    rows2, report2, stdout2 = run(tmp_path / "two", 2)
    assert "2 processes (gloo)" in stdout2
    assert stdout2.count("| frpo(lam=2)") == 1  # only rank 0 prints the report
    assert [(r["stage"], r["step"]) for r in rows1] == [(r["stage"], r["step"]) for r in rows2]
    assert len(rows1) == 5
    for a, b in zip(rows1, rows2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
        if a["stage"] == "rl":  # the same completions: same rewards and lengths
            for key in ("reward_mean", "reward_std", "completion_len"):
                assert b[key] == pytest.approx(a[key], abs=1e-9), (key, a, b)
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
    assert any(r["stage"] == "rl" and r["reward_std"] > 0 for r in rows1)  # the RL loss saw a signal
    assert report2["config"]["world_size"] == 2 and report1["config"]["world_size"] == 1
    for arm1, arm2 in zip(report1["arms"], report2["arms"]):
        for key in ("reward_base", "reward_after_rl", "reward_after_downstream", "downstream_before",
                    "downstream_after"):
            assert arm2[key] == pytest.approx(arm1[key], abs=1e-9), key
        for key in ("kl_to_base", "kl_after_downstream"):
            assert arm2[key] == pytest.approx(arm1[key], rel=1e-3, abs=1e-7), key


def test_samples_do_not_depend_on_the_batch():
    torch.set_num_threads(1)
    model, tokenizer = model_loading.tiny_model(tasks.corpus_text(), seed=0)
    prompts = ["What is 12 + 7?", "Reverse: apple river", "What is 3 + 4?"]
    seeds = [rollout.sample_seed(0, "rl", 5, i) for i in range(3)]
    together = rollout.sample(model, tokenizer, prompts, 4, 12, 1.0, 0.9, seeds=seeds).texts
    alone = [t for p, s in zip(prompts, seeds) for t in rollout.sample(model, tokenizer, [p], 4, 12, 1.0, 0.9,
                                                                       seeds=[s]).texts]
    assert together == alone
    again = rollout.sample(model, tokenizer, prompts, 4, 12, 1.0, 0.9, seeds=seeds).texts
    assert again == together
    other = rollout.sample(model, tokenizer, prompts, 4, 12, 1.0, 0.9,
                           seeds=[rollout.sample_seed(1, "rl", 5, i) for i in range(3)]).texts
    assert other != together
