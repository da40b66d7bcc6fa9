"""LossConfig: the options that choose the formula, built by keyword and validated in one place.

Every public entry point (loss, linear_loss) builds one; a bad option fails here, naming itself."""
from __future__ import annotations

from dataclasses import dataclass

from frpo_kernels import checks

LOSS_TYPES = ("frpo", "grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "frpo"
    lam: float = 1.0
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    jackknife: bool = True
    baseline: bool = True
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    scale_rewards: bool | str = False
    temperature: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        checks.check_number("lam", self.lam, lambda x: x > 0, "a finite number > 0")
        checks.check_number("beta", self.beta, lambda x: True, "a finite number")
        checks.check_number("epsilon_low", self.epsilon_low, lambda x: x >= 0, "a finite number >= 0")
        checks.check_number("epsilon_high", self.epsilon_high, lambda x: x >= 0, "a finite number >= 0")
        if self.delta is not None:
            checks.check_number("delta", self.delta, lambda x: x > 1, "a finite number > 1")
        checks.check_temperature(self.temperature)
        for name in ("jackknife", "baseline"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        m = self.max_completion_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_completion_length must be a positive int, got {m!r}")
        checks.check_scale_rewards_name(self.scale_rewards)
        for name in ("lam", "beta", "epsilon_low", "epsilon_high", "temperature") + (
                () if self.delta is None else ("delta",)):  # NumPy scalars become plain floats
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def frpo_jackknife(self) -> bool:
        """Whether groups need >= 2 members (FRPO's leave-one-out means)."""
        return self.jackknife and self.loss_type == "frpo"
