"""LossConfig: the options that choose the formula, built by keyword and validated in one place.

Every public entry point (loss, linear_loss) builds one; a bad option fails here, naming itself."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from frpo_kernels import checks, loss_types

LOSS_TYPES = loss_types.NAMES  # the registry's names (loss_types.py)
IS_LEVELS = loss_types.IS_LEVELS


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
    # TRL 1.16's GRPOConfig options, with its defaults (but use_bias_correction_kl: False here, True there)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = False
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    num_items_in_batch: float | None = None

    def __post_init__(self):
        kind = loss_types.get(self.loss_type)
        if self.importance_sampling_level not in kind.levels:
            raise ValueError(f"importance_sampling_level must be one of {kind.levels}, "
                             f"got {self.importance_sampling_level!r}")
        if kind.advised_level not in (None, self.importance_sampling_level):
            warnings.warn(f"loss_type={self.loss_type!r} with importance_sampling_level="
                          f"{self.importance_sampling_level!r}: {kind.level_advice} (TRL warns alike)", stacklevel=5)
        self._check_lam()
        self._check_trl_options(kind)
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
        optional = ("delta", "kl_radius", "off_policy_mask_threshold", "num_items_in_batch")
        for name in ("beta", "epsilon_low", "epsilon_high", "temperature") + _TRL_NUMBERS + (
                () if self.auto_lam else ("lam",)) + tuple(
                name for name in optional if getattr(self, name) is not None):  # NumPy scalars: plain floats
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check_trl_options(self, kind):
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            checks.check_number(name, getattr(self, name), lambda x: x > 0, "a finite number > 0")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            checks.check_number(name, getattr(self, name), lambda x: True, "a finite number")
        checks.check_number("top_entropy_quantile", self.top_entropy_quantile, lambda x: 0 <= x <= 1,
                            "a number in [0, 1] (the share of tokens, by entropy, the policy loss keeps)")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be True or False, got {self.use_bias_correction_kl!r}")
        if self.off_policy_mask_threshold is not None:
            checks.check_number("off_policy_mask_threshold", self.off_policy_mask_threshold, lambda x: True,
                                "a finite number (the mean KL above which a negative-advantage row is dropped)")
        if self.num_items_in_batch is not None:
            object.__setattr__(self, "num_items_in_batch", checks.item_number("num_items_in_batch",
                                                                              self.num_items_in_batch))
            checks.check_number("num_items_in_batch", self.num_items_in_batch, lambda x: x > 0,
                                "a finite number > 0 (the token count the loss divides by)")
            if not kind.normaliser.takes_num_items:
                takers = loss_types.names_where(lambda entry: entry.normaliser.takes_num_items)
                raise ValueError(f"num_items_in_batch applies to loss_type in {takers}; loss_type="
                                 f"{self.loss_type!r} divides by {kind.normaliser.divides_by}")

    @property
    def kind(self) -> loss_types.LossType:
        """This loss type's registry entry."""
        return loss_types.get(self.loss_type)

    @property
    def masks_tokens(self) -> bool:
        """Whether the per-token loss is multiplied by a mask decided during the loss (off-policy rows,
        low-entropy tokens): a mask needs the log-probs (or entropies) before the gradient."""
        return self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1

    @property
    def needs_entropy(self) -> bool:
        """The loss reads the per-token entropy (its mask or its bonus)."""
        return self.top_entropy_quantile < 1 or self.entropy_coef != 0

    def _check_lam(self):
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise ValueError(f'lam must be a real number or "auto", got {self.lam!r}')
            if not loss_types.get(self.loss_type).group_coupled:
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
        return self.jackknife and self.kind.group_coupled


_TRL_NUMBERS = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                "vespo_lambda_neg", "top_entropy_quantile", "entropy_coef")
