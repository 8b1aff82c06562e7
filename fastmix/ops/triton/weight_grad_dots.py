"""weight_grad_dots in Triton: a grouped weight-gradient GEMM with the per-domain dots in its
epilogue.

Each program owns a (BLOCK_O, BLOCK_I) tile of the weight gradient. It walks the rows piece
by piece (the rows before the first domain, each domain, the rows after the last), builds the
piece's tile of G_i = Δ_iᵀ X_i with tensor-core dots, and while it is in registers adds it
to the gradient and dots it with the same tile of the target: the per-domain gradients never
reach memory, and the scores cost one read of the target tile."""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastmix.ops import _fake, reference
from fastmix.ops.backends import triton_interpreted
from fastmix.ops.reference import accumulation_dtype
from fastmix.ops.triton.common import dot_settings, gpu_configs


@triton.jit
def _weight_grad_dots_kernel(x_ptr, g_ptr, v_ptr, vb_ptr, bounds_ptr, gw_ptr, gb_ptr, dots_ptr,
                             d_in, d_out, num_segments, HAS_TARGET_BIAS: tl.constexpr,
                             WITH_BIAS: tl.constexpr, ACC: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_o, pid_i = tl.program_id(0), tl.program_id(1)
    outs = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    out_mask, in_mask = outs < d_out, ins < d_in
    tile_mask = out_mask[:, None] & in_mask[None, :]
    target = tl.load(v_ptr + outs[:, None] * d_in + ins[None, :], mask=tile_mask, other=0.0).to(ACC)
    bias_target = tl.zeros((BLOCK_O,), dtype=ACC)
    if HAS_TARGET_BIAS:
        bias_target = tl.load(vb_ptr + outs, mask=out_mask & (pid_i == 0), other=0.0).to(ACC)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    bias_total = tl.zeros((BLOCK_O,), dtype=ACC)
    for j in range(0, num_segments + 2):  # piece j: rows [bounds[j], bounds[j + 1])
        lo = tl.load(bounds_ptr + j)
        hi = tl.load(bounds_ptr + j + 1)
        piece = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
        bias_piece = tl.zeros((BLOCK_O,), dtype=ACC)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_mask = rows < hi
            g_tile = tl.load(g_ptr + rows[:, None] * d_out + outs[None, :],
                             mask=row_mask[:, None] & out_mask[None, :], other=0.0)
            x_tile = tl.load(x_ptr + rows[:, None] * d_in + ins[None, :],
                             mask=row_mask[:, None] & in_mask[None, :], other=0.0)
            if WIDEN:
                g_tile, x_tile = g_tile.to(tl.float32), x_tile.to(tl.float32)
            piece = tl.dot(tl.trans(g_tile), x_tile, piece, input_precision=INPUT_PRECISION)
            if WITH_BIAS or HAS_TARGET_BIAS:
                bias_piece += tl.sum(g_tile.to(ACC), axis=0)
        # The epilogue: the piece joins the gradient and, for a domain, dots with the target.
        total += piece
        bias_total += bias_piece
        if (j >= 1) & (j <= num_segments):
            dot = tl.sum(tl.sum(piece * target, axis=1), axis=0)
            if HAS_TARGET_BIAS:
                dot += tl.sum(bias_piece * bias_target, axis=0)  # zero outside column tile 0
            tl.atomic_add(dots_ptr + j - 1, dot)
    tl.store(gw_ptr + outs[:, None] * d_in + ins[None, :], total, mask=tile_mask)
    if WITH_BIAS:
        tl.store(gb_ptr + outs, bias_total, mask=out_mask & (pid_i == 0))


_tuned = triton.autotune(
    configs=gpu_configs(BLOCK_O=(64, 128), BLOCK_I=(64, 128), BLOCK_N=(32, 64)),
    key=["d_in", "d_out", "num_segments", "HAS_TARGET_BIAS", "WITH_BIAS"],
    reset_to_zero=["dots_ptr"],
)(_weight_grad_dots_kernel)


def piece_bounds(offsets, n_rows):
    """[0, offsets clamped non-decreasing into [0, n_rows], n_rows]: the kernel's pieces."""
    clamped = torch.cummax(offsets.clamp(0, n_rows), 0).values
    ends = offsets.new_tensor([0]), offsets.new_tensor([n_rows])
    return torch.cat([ends[0], clamped, ends[1]])


@torch.library.custom_op("fastmix::weight_grad_dots_triton", mutates_args=())
def weight_grad_dots_triton(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor,
                            target: torch.Tensor, target_bias: Optional[torch.Tensor],
                            with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _fake.check_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias)  # the kernel trusts the shapes
    acc = accumulation_dtype(x.dtype)
    n_rows, d_in, d_out = x.shape[0], x.shape[1], grad_out.shape[1]
    grad_weight = torch.empty(d_out, d_in, dtype=acc, device=x.device)
    grad_bias = torch.zeros(d_out if with_bias else 0, dtype=acc, device=x.device)
    dots = torch.zeros(offsets.shape[0] - 1, dtype=acc, device=x.device)
    if d_in == 0 or d_out == 0:  # no program to launch, but the bias may have rows to sum
        return reference.weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias)
    x, grad_out, target = x.contiguous(), grad_out.contiguous(), target.contiguous()
    bias = target.new_zeros(1) if target_bias is None else target_bias.contiguous()
    bounds = piece_bounds(offsets, n_rows)
    args = (x, grad_out, target, bias, bounds, grad_weight, grad_bias, dots, d_in, d_out,
            offsets.shape[0] - 1)
    constexprs = dict(HAS_TARGET_BIAS=target_bias is not None, WITH_BIAS=with_bias,
                      **dot_settings(x.dtype))
    if triton_interpreted():
        blocks = {"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_N": 16}
        grid = (triton.cdiv(d_out, 16), triton.cdiv(d_in, 16))
        _weight_grad_dots_kernel[grid](*args, **constexprs, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(d_out, meta["BLOCK_O"]), triton.cdiv(d_in, meta["BLOCK_I"]))  # noqa: E731
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _tuned[grid](*args, **constexprs)
    return grad_weight, grad_bias, dots


weight_grad_dots_triton.register_fake(_fake.weight_grad_dots)
