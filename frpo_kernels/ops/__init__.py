"""autograd.Functions over the kernel backends (one file per op)."""
