"""Public ops. Each has a pure-torch reference and fast backends ("cpu", "cuda",
"triton"); `backend=None` picks the fastest one available for the inputs' device."""
from fastmix.ops.alignment import domain_grad_dots, domain_grad_dots_ghost, rowwise_bilinear

__all__ = ["domain_grad_dots", "domain_grad_dots_ghost", "rowwise_bilinear"]
