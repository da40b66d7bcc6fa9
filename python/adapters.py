"""The run's LoRA adapters through its two stages, and the reference policies its KL figures use.

RL trains the "default" adapter on the base weights. The downstream stage then either continues that
adapter (`--downstream-adapter continue`) or, as the official FRPO scripts do, merges it into the
base weights and trains a fresh adapter of its own rank on top (`fresh`, the default): the
downstream fine-tune then starts from the RL policy as a plain model, not from an RL adapter that
SFT may simply undo.

The merge replaces each LoRA-wrapped layer's weight tensor with W0 + delta and keeps W0 itself, so
the next arm (and the KL to the base model) gets the original weights back bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from python.checkpoint import adapter_state, load_adapter_state

RL_ADAPTER = "default"
DOWNSTREAM_ADAPTER = "downstream"


def lora_config(args, r, alpha, dropout):
    """A causal-LM LoRA of rank r on the run's --lora-targets modules."""
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=args.lora_targets.split(","),
                      task_type="CAUSAL_LM")


def add_downstream_adapter(model, lora_config):
    """Give the PEFT model its (inactive) fresh downstream adapter, drawn from torch's RNG now."""
    model.add_adapter(DOWNSTREAM_ADAPTER, lora_config)
    model.set_adapter(RL_ADAPTER)


class AdapterStages:
    """Which adapter is live and which weights are under it, for the RL stage or the downstream stage.

    fresh=False: one adapter throughout (the downstream stage continues training the RL adapter)."""

    def __init__(self, model, fresh: bool):
        self.model, self.fresh = model, fresh
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.original = {name: m.get_base_layer().weight.data for name, m in self.layers.items()}
        self.stage = "rl"
        self.initial_downstream = self._downstream_init() if fresh else None

    def _downstream_init(self) -> dict:
        self.model.set_adapter(DOWNSTREAM_ADAPTER)
        init = adapter_state(self.model)
        self.model.set_adapter(RL_ADAPTER)
        return init

    def enter_rl(self):
        """The original base weights under the RL adapter (whatever values it holds)."""
        if self.fresh and self.stage == "downstream":
            for name, m in self.layers.items():
                m.get_base_layer().weight.data = self.original[name]
            self.model.set_adapter(RL_ADAPTER)
        self.stage = "rl"

    @torch.no_grad()
    def enter_downstream(self, rl_adapter: dict):
        """fresh: the weights become base + the RL adapter's delta (rl_adapter: its values after RL)
        and the downstream adapter is the live one, holding its fresh init until the caller loads
        another state. continue: nothing changes."""
        if not self.fresh or self.stage == "downstream":
            self.stage = "downstream"
            return
        load_adapter_state(self.model, rl_adapter)  # the RL adapter is the live one here
        for name, m in self.layers.items():
            base = m.get_base_layer()
            base.weight.data = self.original[name] + m.get_delta_weight(RL_ADAPTER).to(base.weight.dtype)
        self.model.set_adapter(DOWNSTREAM_ADAPTER)
        load_adapter_state(self.model, self.initial_downstream)
        self.stage = "downstream"

    def downstream_start(self, rl_adapter: dict) -> dict:
        """The adapter state the downstream stage starts from: the fresh init, or the RL adapter."""
        return self.initial_downstream if self.fresh else rl_adapter

    @contextmanager
    def original_weights(self):
        """The block runs on the original base weights (fresh, downstream stage: without the merge)."""
        merged = {name: m.get_base_layer().weight.data for name, m in self.layers.items()}
        for name, m in self.layers.items():
            m.get_base_layer().weight.data = self.original[name]
        try:
            yield
        finally:
            for name, m in self.layers.items():
                m.get_base_layer().weight.data = merged[name]

    def references(self, rl_adapter: dict | None = None) -> dict:
        """{name: () -> context in which the model is that policy}: "base", the model before any RL,
        and with rl_adapter (the downstream stage) "rl", the policy as it was after RL."""
        model = self.model
        if self.stage == "rl" or not self.fresh:
            refs = {"base": model.disable_adapter}
            if rl_adapter is not None:
                refs["rl"] = lambda: adapter_loaded(model, rl_adapter)
            return refs

        @contextmanager
        def base():
            with self.original_weights(), model.disable_adapter():
                yield
        return {"base": base, "rl": model.disable_adapter}  # the merged weights alone are the RL policy


@contextmanager
def adapter_loaded(model, state):
    """The block runs with the LoRA parameters of `state`; the model's own are put back after."""
    own = adapter_state(model)
    load_adapter_state(model, state)
    try:
        yield
    finally:
        load_adapter_state(model, own)
