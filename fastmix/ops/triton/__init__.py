"""Triton kernels, one file per op, each with its launch wrapper registered as a
torch.library custom op (fastmix::<op>_triton). Importing this package imports triton."""
