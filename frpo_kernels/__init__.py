"""frpo_kernels: FRPO and GRPO-family RL losses with fused per-token log-prob kernels.

Public API only; see README.md.
"""
from frpo_kernels.group_stats import GroupStats, group_stats
from frpo_kernels.loss import group_advantages, linear_loss, loss, token_logprobs
from frpo_kernels.ops.linear_logprobs import linear_token_logprobs

__all__ = ["loss", "linear_loss", "token_logprobs", "linear_token_logprobs", "group_advantages", "group_stats",
           "GroupStats"]
__version__ = "0.1.0"
