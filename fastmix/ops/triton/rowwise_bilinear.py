"""rowwise_bilinear in Triton: r_n = a_n · (m @ b_n), per row or segment-summed.

Each program owns BLOCK_N rows; for each BLOCK_P slice of m's rows it builds the
(BLOCK_N, BLOCK_P) tile of b @ mᵀ with tensor-core dots and folds it into the row sums
against a at once, so the N x p product never reaches memory."""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastmix.ops import _fake
from fastmix.ops.reference import accumulation_dtype
from fastmix.ops.triton.common import (
    dot_settings, gpu_configs, launch, store_rows, tile_product,
)


@triton.jit
def _rowwise_bilinear_kernel(a_ptr, m_ptr, b_ptr, ids_ptr, out_ptr, n_rows, p, q, num_segments,
                             HAS_SEGMENTS: tl.constexpr, ACC: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # offsets pass 2**31
    row_mask = rows < n_rows
    totals = tl.zeros((BLOCK_N,), dtype=ACC)
    for p0 in range(0, p, BLOCK_P):
        cols = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        col_mask = cols < p
        products = tl.zeros((BLOCK_N, BLOCK_P), dtype=ACC)
        products = tile_product(products, b_ptr, rows, row_mask, m_ptr, cols, col_mask, q,
                                BLOCK_D, INPUT_PRECISION, WIDEN)
        a_tile = tl.load(a_ptr + rows[:, None] * p + cols[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        totals += tl.sum(products * a_tile.to(ACC), axis=1)
    store_rows(out_ptr, ids_ptr, rows, row_mask, totals, num_segments, HAS_SEGMENTS)


_tuned = triton.autotune(
    configs=gpu_configs(BLOCK_N=(64, 128), BLOCK_P=(64, 128), BLOCK_D=(32, 64)),
    key=["p", "q", "HAS_SEGMENTS"],
    reset_to_zero=["out_ptr"],
)(_rowwise_bilinear_kernel)


@torch.library.custom_op("fastmix::rowwise_bilinear_triton", mutates_args=())
def rowwise_bilinear_triton(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor,
                            segment_ids: Optional[torch.Tensor], num_segments: int) -> torch.Tensor:
    _fake.check_rowwise_bilinear(a, m, b, segment_ids, num_segments)  # the kernel trusts the shapes
    acc_dtype = accumulation_dtype(a.dtype)
    length = a.shape[0] if segment_ids is None else num_segments
    out = torch.zeros(length, dtype=acc_dtype, device=a.device)
    if a.shape[0] == 0:
        return out
    a, m, b = a.contiguous(), m.contiguous(), b.contiguous()
    ids = out if segment_ids is None else segment_ids.contiguous()  # unused when no segments
    launch(_rowwise_bilinear_kernel, _tuned, a.shape[0],
           {"BLOCK_N": 16, "BLOCK_P": 16, "BLOCK_D": 16},
           a, m, b, ids, out, a.shape[0], a.shape[1], b.shape[1], num_segments,
           HAS_SEGMENTS=segment_ids is not None, **dot_settings(a.dtype))
    return out


rowwise_bilinear_triton.register_fake(_fake.rowwise_bilinear)
