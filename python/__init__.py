"""Runnable programs over the public frpo_kernels API: train.py (LoRA RL, a downstream fine-tune,
a robustness report) and sweep.py (seeds x arms of it). A package, so that its module names
(evaluation, report, tasks, ...) never shadow installed ones."""
