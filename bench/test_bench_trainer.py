"""One GRPO training step, FRPOTrainer (frpo_kernels.integrations.trl: loss from the final hidden states
and the LM head through frpo_kernels.linear_loss) against TRL's stock GRPOTrainer: peak resident-memory
growth of trainer.train() and its wall time.

Each (trainer, loss_type) runs bench/trainer_step.py in its own fresh Python process (imports, the glibc
heap kept after frees and torch's caches of one trainer never count against the other): a random
Llama (hidden 64, 2 layers, tie_word_embeddings=False, the same seed in every process) with a
word-level tokenizer of V tokens, one prompt x 8 completions (per_device_train_batch_size=8,
num_generations=8), completions forced to exactly max_completion_length tokens (min_new_tokens; the
lengths are checked), max_steps=1, beta=0, use_cpu, a toy reward. Rows: GRPOTrainer loss_type="grpo",
FRPOTrainer loss_type="grpo" (the same objective: apples to apples) and, in the full run, FRPOTrainer
loss_type="frpo".

RSS growth = the kernel's high-water mark of resident memory during train() (VmHWM, reset through
/proc/self/clear_refs right before train()) minus the RSS right before it; the model, tokenizer and
trainer construction are in the baseline, and everything train() touches (generation, scoring, the
autograd graph, gradients, AdamW state) is in the growth. Phases (generation + scoring, loss forward,
backward, optimizer step) are also reported, each as its own peak above the RSS at its start and
the RSS it keeps; see trainer_step.py.

TRL 1.16's own GRPOTrainer does not build [B, T, V] logits either: its model forward is patched with
trl.kernels.ChunkedLogProbFunction (tiles of all B x (P + T - 1) positions x 32768 vocab columns; on
CPU its torch fallback, whose backward keeps ~10 tile-sized temporaries alive at once).

Quick by default (V=16384, 16-token completions, the two grpo rows, one round: about half a minute,
~10 s of each process importing TRL); FRPO_BENCH_FULL=1: V=151,936, 128-token completions, all three
rows, 3 rounds (FRPO_BENCH_TRAINER_ROUNDS overrides) run interleaved, each row reporting the largest
RSS growth and the smallest (best-of) seconds of its rounds: generation, the same code in both
trainers, takes most of train() here and its time alone varies by 1.5x with the machine's load.
Printed: a table of RSS growth (also above the gradients + AdamW state of the parameters, 3 x 4 bytes
each, which every trainer's step keeps), train(), generation (+ scoring: the same code in both
trainers) and loss forward+backward wall seconds, each with its ratio to GRPOTrainer's, and the
phases. Nothing here asserts on time or memory (the machine is
shared); it asserts that each process ran its one step with completions of the forced length and
reported its numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FULL

pytest.importorskip("trl")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = 151936 if FULL else 16384
COMPLETION = 128 if FULL else 16
CASES = [("grpo", "grpo"), ("frpo", "grpo")] + ([("frpo", "frpo")] if FULL else [])
NAMES = {"grpo": "GRPOTrainer", "frpo": "FRPOTrainer"}
# rounds of every case, interleaved (GRPO, FRPO, FRPO-frpo, GRPO, ...) so that the shared machine's load
# drifts over all cases alike; FRPO_BENCH_TRAINER_ROUNDS overrides
ROUNDS = int(os.environ.get("FRPO_BENCH_TRAINER_ROUNDS", 3 if FULL else 1))
_rounds = {}


def _run(case):
    """trainer_step.py's RESULT for (trainer, loss_type), from a fresh process."""
    trainer, loss_type = case
    cmd = [sys.executable, os.path.join(HERE, "trainer_step.py"), "--trainer", trainer, "--loss-type", loss_type,
           "--vocab", str(VOCAB), "--completion-length", str(COMPLETION)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{' '.join(cmd)} printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _all_rounds(case):
    """Every round's row of `case`; the first call runs all ROUNDS x CASES, interleaved, once per session."""
    if not _rounds:
        for _ in range(ROUNDS):
            for c in CASES:
                _rounds.setdefault(c, []).append(_run(c))
    return _rounds[case]


def summary(rows):
    """One row from a case's rounds: memory the largest of the rounds, seconds the smallest (best of)."""
    out = dict(rows[0], growth_mib=max(r["growth_mib"] for r in rows),
               growth_range=(min(r["growth_mib"] for r in rows), max(r["growth_mib"] for r in rows)),
               train_s=min(r["train_s"] for r in rows), train_cpu_s=min(r["train_cpu_s"] for r in rows),
               rounds=len(rows))
    phases = []
    for k, p in enumerate(rows[0]["phases"]):
        same = [r["phases"][k] for r in rows]
        phases.append(dict(p, peak_above_start_mib=max(q["peak_above_start_mib"] for q in same),
                           kept_mib=max(q["kept_mib"] for q in same), seconds=min(q["seconds"] for q in same)))
    out["phases"] = phases
    return out


def _phase_line(row):
    return "  ".join(f"{p['phase']} {p['peak_above_start_mib']:.0f} (kept {p['kept_mib']:.0f}, {p['seconds']:.1f} s)"
                     for p in row["phases"])


def optimizer_floor_mib(row):
    """Gradients + AdamW's two moments, fp32, of all parameters: what any trainer's step keeps."""
    return 3 * 4 * row["params"] / 2**20


def phase_seconds(row, *names):
    return sum(p["seconds"] for p in row["phases"] if p["phase"] in names)


def loss_seconds(row):
    """Wall seconds of the loss forward and the backward (the phases where the two trainers differ)."""
    return phase_seconds(row, "loss forward", "backward")


def table(rows, base):
    """RSS growth, growth above the gradients + AdamW state, train() and loss fwd+bwd seconds, each with
    its ratio to `base` (GRPOTrainer, loss_type grpo)."""
    columns = [("RSS growth MiB", lambda r: r["growth_mib"], "{:.0f}"),
               ("above grads+AdamW MiB", lambda r: r["growth_mib"] - optimizer_floor_mib(r), "{:.0f}"),
               ("train() s", lambda r: r["train_s"], "{:.1f}"),
               ("generate s", lambda r: phase_seconds(r, "generate+score"), "{:.1f}"),
               ("loss fwd+bwd s", loss_seconds, "{:.1f}")]
    lines = [f"{'trainer':<12} {'loss_type':>9} " + " ".join(f"{name} {'/ GRPO':>6}" for name, _, _ in columns)]
    for r in rows:
        cells = " ".join(f"{fmt.format(get(r)):>{len(name)}} {get(r) / get(base):5.2f}x" for name, get, fmt in columns)
        lines.append(f"{r['trainer']:<12} {r['loss_type']:>9} {cells}")
    lines.append(f"grads+AdamW = 3 x 4 bytes x {base['params']:,} parameters = {optimizer_floor_mib(base):.1f} MiB; "
                 "phases, MiB peak above the phase's start (MiB kept, wall s):")
    for r in rows:
        lines.append(f"  {r['trainer']} {r['loss_type']}: {_phase_line(r)}")
    if rows[0].get("rounds", 1) > 1:
        lines.append("RSS growth over the rounds, MiB: " + ", ".join(
            f"{r['trainer']} {r['loss_type']} {r['growth_range'][0]:.0f}-{r['growth_range'][1]:.0f}" for r in rows))
    return lines


@pytest.mark.parametrize("case", CASES, ids=[f"{NAMES[t]}-{lt}" for t, lt in CASES])
def test_bench_trainer_step(case):
    """ROUNDS train() steps of one trainer, each in a fresh process (interleaved with the other cases)."""
    rows = _all_rounds(case)
    for row in rows:
        assert row["steps"] == 1
        assert row["completion_lengths"] == [COMPLETION], row["completion_lengths"]  # really COMPLETION tokens
        assert row["growth_mib"] > 0 and row["train_s"] > 0
        print(f"\n  {row['trainer']} loss_type={row['loss_type']} V={row['vocab']} {row['generations']}x"
              f"{row['completion_length']}: RSS growth {row['growth_mib']:.0f} MiB (before train() "
              f"{row['rss_before_mib']:.0f} MiB), train() {row['train_s']:.1f} s ({row['train_cpu_s']:.1f} CPU s, "
              f"{row['threads']} threads, {row['method']})\n  phases: {_phase_line(row)}")


def test_bench_trainer_ratios():
    """The table: FRPOTrainer's RSS growth and train() time relative to GRPOTrainer's (printed only)."""
    rows = [summary(_all_rounds(case)) for case in CASES]
    base = rows[0]
    assert (base["trainer"], base["loss_type"]) == ("GRPOTrainer", "grpo")
    print(f"\n  one step, V={VOCAB}, 8x{COMPLETION} tokens, hidden 64, 2 layers, fp32 CPU, each trainer in its own "
          f"process; {ROUNDS} round(s) interleaved: RSS the largest, seconds the best of them\n  "
          + "\n  ".join(table(rows, base)))
