"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1) for the per-token kernel
contract in frpo_kernels/backends/torch_reference.py. launch.py is the backend module (checks, launches); kernels.py the kernels."""
