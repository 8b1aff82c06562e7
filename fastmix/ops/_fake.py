"""Fake (meta) implementations of the custom ops, for torch.compile and FakeTensor tracing.

They repeat the compiled bindings' argument checks (csrc/torch/alignment_args.h, svd.cpp)
with torch._check, so a bad call fails while tracing with the same message that names the
argument, instead of tracing a wrong shape and failing later inside the compiled graph.
Shared by the C++/CUDA ops and their Triton twins, which take the same arguments.
"""
import torch

from fastmix.ops.reference import accumulation_dtype

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(condition, message):
    torch._check(condition, lambda: message)


def _check_matrix(t, name, like, like_name):
    _check(t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    _check(t.dtype == like.dtype, f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}")
    _check(t.device == like.device, f"{name} is on {t.device} but {like_name} is on {like.device}")
    _check(t.dtype in _KERNEL_DTYPES, f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_dim(t, name, dim, expected, what):
    _check(t.shape[dim] == expected, f"{name}.shape[{dim}] is {t.shape[dim]} but must equal {what} ({expected})")


def _check_segments(ids, num_segments, n_rows, like):
    _check(ids.dim() == 1 and ids.shape[0] == n_rows,
           f"segment_ids must have shape ({n_rows},), got {tuple(ids.shape)}")
    _check(ids.dtype == torch.int64, f"segment_ids must be int64, got {ids.dtype}")
    _check(ids.device == like.device, f"segment_ids is on {ids.device} but the data is on {like.device}")
    _check(num_segments >= 0, f"num_segments must be >= 0, got {num_segments}")


def rowwise_bilinear(a, m, b, segment_ids, num_segments):
    for t, name in ((a, "a"), (m, "m"), (b, "b")):
        _check_matrix(t, name, a, "a")
    _check_dim(m, "m", 0, a.shape[1], "a.shape[1]")
    _check_dim(b, "b", 0, a.shape[0], "a.shape[0]")
    _check_dim(b, "b", 1, m.shape[1], "m.shape[1]")
    if segment_ids is not None:
        _check_segments(segment_ids, num_segments, a.shape[0], a)
    length = a.shape[0] if segment_ids is None else num_segments
    return a.new_empty(length, dtype=accumulation_dtype(a.dtype))


def ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments):
    for t, name in ((x, "x"), (grad_out, "grad_out"), (target_x, "target_x"), (target_grad_out, "target_grad_out")):
        _check_matrix(t, name, x, "x")
    _check_dim(grad_out, "grad_out", 0, x.shape[0], "x.shape[0]")
    _check_dim(target_x, "target_x", 1, x.shape[1], "x.shape[1]")
    _check_dim(target_grad_out, "target_grad_out", 0, target_x.shape[0], "target_x.shape[0]")
    _check_dim(target_grad_out, "target_grad_out", 1, grad_out.shape[1], "grad_out.shape[1]")
    _check_segments(segment_ids, num_segments, x.shape[0], x)
    return x.new_empty(num_segments, dtype=accumulation_dtype(x.dtype))


def batched_svd(a):
    _check(a.dim() == 3, f"a must be 3-D (batch, m, n), got shape {tuple(a.shape)}")
    _check(a.dtype in (torch.float32, torch.float64),
           f"a must be float32 or float64 (convert float16/bfloat16 first), got {a.dtype}")
    batch, m, n = a.shape
    p = min(m, n)
    return a.new_empty(batch, m, p), a.new_empty(batch, p), a.new_empty(batch, p, n)
