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
    lam: float | str = 1.0     # or "auto": per-group lam from kl_radius (lam_auto.py)
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
    kl_radius: float | None = None

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        self._check_lam()
        checks.check_number("beta", self.beta, lambda x: True, "a finite number")
        checks.check_number("epsilon_low", self.epsilon_low, lambda x: x >= 0, "a finite number >= 0")
        checks.check_number("epsilon_high", self.epsilon_high, lambda x: x >= 0, "a finite number >= 0")
        if self.delta is not None:
            checks.check_number("delta", self.delta, lambda x: x > 1, "a finite number > 1")
        checks.check_temperature(self.temperature)
        for name in ("jackknife", "baseline"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "max_completion_length",  # NumPy integers become plain ints
                           checks.optional_positive_int("max_completion_length", self.max_completion_length))
        checks.check_scale_rewards_name(self.scale_rewards)
        for name in ("beta", "epsilon_low", "epsilon_high", "temperature") + (
                () if self.auto_lam else ("lam",)) + (() if self.delta is None else ("delta",)) + (
                () if self.kl_radius is None else ("kl_radius",)):  # NumPy scalars become plain floats
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check_lam(self):
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise ValueError(f'lam must be a real number or "auto", got {self.lam!r}')
            if self.loss_type != "frpo":
                raise ValueError(f'lam="auto" is FRPO\'s per-group temperature; loss_type={self.loss_type!r} '
                                 'needs a numeric lam')
            if self.kl_radius is None:
                raise ValueError('lam="auto" needs kl_radius (the KL radius rho that sets each group\'s lam)')
        else:
            checks.check_number("lam", self.lam, lambda x: x > 0, "a finite number > 0")
            if self.kl_radius is not None:
                raise ValueError(f'kl_radius={self.kl_radius!r} applies only with lam="auto", got lam={self.lam!r}')
        if self.kl_radius is not None:
            checks.check_number("kl_radius", self.kl_radius, lambda x: x > 0, "a finite number > 0")

    @property
    def auto_lam(self) -> bool:
        """lam="auto": each group's lam solves its KL constraint (lam_auto.py)."""
        return isinstance(self.lam, str)

    @property
    def frpo_jackknife(self) -> bool:
        """Whether groups need >= 2 members (FRPO's leave-one-out means)."""
        return self.jackknife and self.loss_type == "frpo"
