"""Atomic checkpoints of a run (LoRA adapter, optimizer, RNG states, position, results, metrics)
and stop signals: SIGTERM raises Terminated, a KeyboardInterrupt, so that it takes Ctrl-C's path,
and both can be deferred while a training step is run and committed.
"""
from __future__ import annotations

import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and torchrun's agent send before a kill), raised as a
    KeyboardInterrupt so that every `except KeyboardInterrupt` treats it like Ctrl-C."""


def stop_exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_name(exc: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process killed by it: 143 SIGTERM, 130 Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _raise_terminated(signum, frame):
    raise Terminated


def _set_handlers(handlers: dict) -> dict:
    """Install {signal: handler}; the handlers they replace."""
    return {s: signal.signal(s, signal.SIG_DFL if h is None else h) for s, h in handlers.items()}


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in the main thread while the block runs (Python's default for
    SIGTERM is to die on the spot, without a checkpoint)."""
    try:
        previous = _set_handlers({signal.SIGTERM: _raise_terminated})
    except ValueError:  # not the main thread, which is the one that gets signals
        yield
        return
    try:
        yield
    finally:
        _set_handlers(previous)


@contextmanager
def deferred_interrupt():
    """Ctrl-C and SIGTERM inside the block are appended to the yielded list instead of raised; the
    block may act on them at safe points (stop_exception). Those left are raised when it ends."""
    pending = []
    try:
        previous = _set_handlers({s: lambda signum, frame: pending.append(signum) for s in STOP_SIGNALS})
    except ValueError:  # not the main thread: nothing to defer
        yield pending
        return
    try:
        yield pending
    finally:
        _set_handlers(previous)
    if pending:
        raise stop_exception(pending[0])


@contextmanager
def uninterruptible():
    """The block runs whole; Ctrl-C and SIGTERM inside it are dropped. For what ends the run anyway:
    the checkpoint written on a stop, the report of a finished run."""
    with deferred_interrupt() as pending:
        yield
        pending.clear()
