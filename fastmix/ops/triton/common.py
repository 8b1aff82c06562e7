"""Pieces shared by the Triton kernels: the fused tile product, the row epilogue, and
launch settings (fixed small tiles under TRITON_INTERPRET=1, autotuned on GPUs)."""
import torch
import triton
import triton.language as tl

from fastmix.ops.backends import triton_interpreted


@triton.jit
def tile_product(acc, a_ptr, rows, row_mask, b_ptr, cols, col_mask, depth,
                 BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc + A[rows] @ B[cols]ᵀ with A (·, depth) and B (·, depth) row-major.
    WIDEN casts the tiles to float32 before the dot (exact for 16-bit inputs)."""
    for d0 in range(0, depth, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < depth
        a_tile = tl.load(a_ptr + rows[:, None] * depth + d[None, :],
                         mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b_tile_t = tl.load(b_ptr + cols[None, :] * depth + d[:, None],
                           mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        if WIDEN:
            a_tile, b_tile_t = a_tile.to(tl.float32), b_tile_t.to(tl.float32)
        acc = tl.dot(a_tile, b_tile_t, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def store_rows(out_ptr, ids_ptr, rows, row_mask, totals, num_segments,
               HAS_SEGMENTS: tl.constexpr):
    """Writes per-row results, or adds each to its segment (ids outside [0, k) skipped)."""
    if HAS_SEGMENTS:
        ids = tl.load(ids_ptr + rows, mask=row_mask, other=-1)
        valid = row_mask & (ids >= 0) & (ids < num_segments)
        tl.atomic_add(out_ptr + tl.where(valid, ids, 0), totals, mask=valid)
    else:
        tl.store(out_ptr + rows, totals, mask=row_mask)


def dot_settings(dtype):
    """Constexprs of tile_product for inputs of `dtype`. float32 follows torch's matmul
    precision (IEEE unless the user allowed TF32). The interpreter's dot misreads
    bfloat16 (numpy has no such type), so there the tiles are widened first."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
        "WIDEN": triton_interpreted() and dtype == torch.bfloat16,
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def gpu_configs(**blocks):
    """Autotune candidates: every combination of the given block sizes, 4 and 8 warps."""
    configs = [{}]
    for name, values in blocks.items():
        configs = [dict(c, **{name: v}) for c in configs for v in values]
    return [triton.Config(c, num_warps=w, num_stages=3) for c in configs for w in (4, 8)]


def launch(kernel, tuned_kernel, grid_rows, interpreted_blocks, *args, **constexprs):
    """Runs the autotuned kernel on GPUs; under the interpreter, fixed small tiles.
    args[0] is a tensor on the device to run on."""
    if triton_interpreted():
        blocks = dict(interpreted_blocks)
        grid = (triton.cdiv(grid_rows, blocks["BLOCK_N"]),)
        kernel[grid](*args, **constexprs, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_N"]),)  # noqa: E731
        # Triton launches on the current device and its stream, not the tensors' device
        with torch.cuda.device(args[0].device):
            tuned_kernel[grid](*args, **constexprs)
