"""The autograd wrappers: torch.autograd.Functions (one file per op) that call a kernel backend
of frpo_kernels/backends/; no kernels live here."""
