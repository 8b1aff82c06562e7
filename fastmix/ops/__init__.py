"""Public ops. Each has a pure-torch reference and fast backends ("cpu", "cuda",
"triton"); `backend=None` picks the fastest one available for the inputs' device."""
from fastmix.ops.alignment import (
    domain_grad_dots, domain_grad_dots_ghost, group_rows, row_grouping, rowwise_bilinear,
    weight_grad_dots,
)
from fastmix.ops.fused_linear import DomainDots, fused_linear
from fastmix.ops.linalg import batched_svd, ridge_leverage_scores

__all__ = ["DomainDots", "batched_svd", "domain_grad_dots", "domain_grad_dots_ghost", "fused_linear",
           "group_rows", "ridge_leverage_scores", "row_grouping", "rowwise_bilinear", "weight_grad_dots"]
