"""Where a run is and what it has found: the state a checkpoint holds, and the live run (model,
optimizer, output folder) that saves it and records metrics."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from python import checkpoint as ckpt

PHASES = ("rl", "eval_rl", "sft", "eval_sft")


@dataclass
class RunState:
    """Everything needed to continue exactly where a run stopped (rank 0 saves it; all ranks load it)."""
    arm: int = 0                  # index of the arm in progress
    phase: int = 0                # index into PHASES
    step: int = 0                 # steps of the phase already done
    global_step: int = 0          # optimizer steps over the whole run
    base: dict | None = None      # the base model's eval
    results: list[dict] = field(default_factory=list)  # one per arm started: the arm plus its evals
    metrics: list[dict] = field(default_factory=list)  # one row per optimizer step
    rng: dict | None = None       # RNG states at the last step boundary
    rl_adapter: dict | None = None  # the arm's adapter after RL: merged for (or continued by) the
                                    # downstream stage, and the reference of its KL

    def before(self, arm: int, phase: int) -> bool:
        """(arm, phase) is already done."""
        return (arm, phase) < (self.arm, self.phase)

    def complete(self, num_arms: int) -> bool:
        return (self.arm, self.phase) >= (num_arms - 1, len(PHASES))

    def position_text(self) -> str:
        if self.phase == len(PHASES):
            return f"the end of arm {self.arm}"
        return f"arm {self.arm}, phase {PHASES[self.phase]}, step {self.step}"

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        return cls(**saved)


@dataclass
class Run:
    """A run in progress on this process: what it trains on, where it writes, and its state."""
    args: object                  # the parsed flags
    config: dict                  # what the checkpoint and report record of them
    ctx: object                   # this process's place in a torchrun job (ranks.Dist)
    model: object                 # the PEFT model
    tokenizer: object
    task: object                  # stage 1 (tasks.Task)
    downstream: object            # tasks.Downstream
    state: RunState
    initial_adapter: dict = field(default_factory=dict)  # every arm's RL starts from it
    stages: object = None         # adapters.AdapterStages: the weights and adapter each stage trains
    optimizer: object = None

    @property
    def out(self) -> Path:
        return self.args.out

    @property
    def lead(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.ctx.rank == 0

    @property
    def params(self) -> list:
        return list(ckpt.trainable(self.model).values())

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    def save(self):
        """Checkpoint (rank 0; every rank holds the same adapter, optimizer state and run state)."""
        if not self.lead:
            return
        ckpt.save_atomic({"config": self.config, "state": self.state.to_dict(),
                          "adapter": ckpt.adapter_state(self.model),
                          "optimizer": None if self.optimizer is None else self.optimizer.state_dict()},
                         self.out / "checkpoint.pt")

    def record(self, row: dict):
        self.state.metrics.append(row)
        if self.lead:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def log(self, *args, **kwargs):
        if self.lead:
            print(*args, **kwargs)


def write_metrics(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
