"""Adapters from frpo_kernels to training frameworks. Each submodule imports its framework lazily:
`from frpo_kernels.integrations.trl import FRPOConfig, FRPOTrainer` needs `trl` installed."""
