"""frpo_kernels: FRPO and GRPO-family RL losses with fused per-token log-prob kernels.

Public API only; see README.md.
"""
from frpo_kernels.loss import group_advantages, loss, token_logprobs

__all__ = ["loss", "token_logprobs", "group_advantages"]
__version__ = "0.1.0"
