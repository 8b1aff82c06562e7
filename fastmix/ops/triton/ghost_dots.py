"""ghost_dots in Triton: s_i = Σ_{seg(n)=i} Σ_t (x_n · tx_t)(g_n · tg_t).

Each program owns BLOCK_N rows and walks the target rows BLOCK_M at a time, building both
(BLOCK_N, BLOCK_M) dot tiles in registers and reducing their product at once: the N x M
matrices are never written."""
import torch
import triton
import triton.language as tl

from fastmix.ops import _fake
from fastmix.ops.reference import accumulation_dtype
from fastmix.ops.triton.common import (
    dot_settings, gpu_configs, launch, store_rows, tile_product,
)


@triton.jit
def _ghost_dots_kernel(x_ptr, g_ptr, tx_ptr, tg_ptr, ids_ptr, out_ptr, n_rows, n_target,
                       d_in, d_out, num_segments, HAS_SEGMENTS: tl.constexpr, ACC: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # offsets pass 2**31
    row_mask = rows < n_rows
    totals = tl.zeros((BLOCK_N,), dtype=ACC)
    for t0 in range(0, n_target, BLOCK_M):
        targets = (t0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        target_mask = targets < n_target
        x_dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        x_dots = tile_product(x_dots, x_ptr, rows, row_mask, tx_ptr, targets, target_mask, d_in,
                              BLOCK_D, INPUT_PRECISION, WIDEN)
        g_dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        g_dots = tile_product(g_dots, g_ptr, rows, row_mask, tg_ptr, targets, target_mask, d_out,
                              BLOCK_D, INPUT_PRECISION, WIDEN)
        totals += tl.sum(x_dots * g_dots, axis=1)
    store_rows(out_ptr, ids_ptr, rows, row_mask, totals, num_segments, HAS_SEGMENTS)


_tuned = triton.autotune(
    configs=gpu_configs(BLOCK_N=(64, 128), BLOCK_M=(32, 64), BLOCK_D=(32, 64)),
    key=["d_in", "d_out", "n_target"],
    reset_to_zero=["out_ptr"],
)(_ghost_dots_kernel)


@torch.library.custom_op("fastmix::ghost_dots_triton", mutates_args=())
def ghost_dots_triton(x: torch.Tensor, grad_out: torch.Tensor, target_x: torch.Tensor,
                      target_grad_out: torch.Tensor, segment_ids: torch.Tensor,
                      num_segments: int) -> torch.Tensor:
    _fake.check_ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids,
                           num_segments)  # the kernel trusts the shapes
    acc_dtype = accumulation_dtype(x.dtype)
    out = torch.zeros(num_segments, dtype=acc_dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    tensors = [t.contiguous() for t in (x, grad_out, target_x, target_grad_out, segment_ids)]
    launch(_ghost_dots_kernel, _tuned, x.shape[0],
           {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16},
           *tensors, out, x.shape[0], target_x.shape[0], x.shape[1], grad_out.shape[1],
           num_segments, HAS_SEGMENTS=True, **dot_settings(x.dtype))
    return out


ghost_dots_triton.register_fake(_fake.ghost_dots)
