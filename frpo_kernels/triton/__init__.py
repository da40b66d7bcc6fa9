"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1) for the per-token kernel
contract in frpo_kernels/reference.py. ops.py is the backend module; kernels.py the kernels."""
