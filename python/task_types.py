"""What a stage-1 task and a downstream task are: examples, splits, and how a completion is scored."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Example:
    prompt: str           # the user message (rendered with a chat template or plain Q/A later)
    answer: str           # the truth (RL) or the target completion (SFT)
    kind: str = ""        # e.g. "disallowed" / "allowed" for the refusal task


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    reward: Callable[[str, Example], float]      # completion text -> reward
    max_new_tokens: int
    # named figures read off the eval rewards of one kind of prompt: {name: (kind, rewards -> value)}
    measures: dict[str, tuple[str, Callable[[list[float]], float]]] = field(default_factory=dict)
    # (prompt, target reply) pairs showing the behaviour, for --warm-start-steps (python/warm_start.py)
    demonstrations: list[Example] = field(default_factory=list)


@dataclass
class Downstream:
    name: str
    train: list[Example]
    eval: list[Example]
    score: Callable[[str, Example], float]       # completion text -> 1.0 if the skill is shown
    max_new_tokens: int


def measure_values(task: Task, rewards: list[float]) -> dict[str, float]:
    """task.measures on the per-prompt eval rewards (in task.eval order)."""
    out = {}
    for name, (kind, fn) in task.measures.items():
        picked = [r for r, e in zip(rewards, task.eval) if e.kind == kind]
        out[name] = fn(picked) if picked else float("nan")
    return out
