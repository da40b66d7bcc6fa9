"""Atomic checkpoints of a run (LoRA adapter, optimizer, RNG states, position, results, metrics)
and a guard that defers Ctrl-C while an optimizer step is being committed.
"""
from __future__ import annotations

import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainable(model).items()}


@torch.no_grad()
def load_adapter_state(model, state: dict[str, torch.Tensor]):
    params = trainable(model)
    if params.keys() != state.keys():
        raise ValueError("checkpoint adapter does not match this model's LoRA parameters "
                         "(different --lora-* flags or model?)")
    for name, p in params.items():
        p.copy_(state[name])


def save_atomic(obj, path: Path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block is raised when the block ends, so a step is committed whole."""
    pending = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread: nothing to defer
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
