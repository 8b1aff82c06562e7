"""Fake (meta) implementations of the custom ops, for torch.compile and FakeTensor tracing.

They repeat the compiled bindings' argument checks (csrc/torch/alignment_args.h, svd.cpp)
with torch._check, so a bad call fails while tracing with the same message that names the
argument, instead of tracing a wrong shape and failing later inside the compiled graph.
Shared by the C++/CUDA ops and their Triton twins, which take the same arguments; the
Triton ops also run the check_* functions eagerly, as the compiled bindings do, since
their kernels would otherwise read out of bounds on a bad call.
"""
import torch

from fastmix.ops.reference import accumulation_dtype

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(condition, message):
    """Raises RuntimeError with message() unless condition holds. The Triton ops run these
    checks on every call: a plain True skips torch._check's cost, and the message is only
    formatted on failure."""
    if condition is not True:
        torch._check(condition, message)


def _check_matrix(t, name, like, like_name):
    _check(t.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(t.shape)}")
    _check(t.dtype == like.dtype,
           lambda: f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}")
    _check(t.device == like.device, lambda: f"{name} is on {t.device} but {like_name} is on {like.device}")
    _check(t.dtype in _KERNEL_DTYPES,
           lambda: f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_dim(t, name, dim, expected, what):
    _check(t.shape[dim] == expected,
           lambda: f"{name}.shape[{dim}] is {t.shape[dim]} but must equal {what} ({expected})")


def _check_segments(ids, num_segments, n_rows, like):
    _check(ids.dim() == 1 and ids.shape[0] == n_rows,
           lambda: f"segment_ids must have shape ({n_rows},), got {tuple(ids.shape)}")
    _check(ids.dtype == torch.int64, lambda: f"segment_ids must be int64, got {ids.dtype}")
    _check(ids.device == like.device,
           lambda: f"segment_ids is on {ids.device} but the data is on {like.device}")
    _check(num_segments >= 0, lambda: f"num_segments must be >= 0, got {num_segments}")


def check_rowwise_bilinear(a, m, b, segment_ids, num_segments):
    """Raises RuntimeError naming the argument unless the arguments fit the kernel."""
    for t, name in ((a, "a"), (m, "m"), (b, "b")):
        _check_matrix(t, name, a, "a")
    _check_dim(m, "m", 0, a.shape[1], "a.shape[1]")
    _check_dim(b, "b", 0, a.shape[0], "a.shape[0]")
    _check_dim(b, "b", 1, m.shape[1], "m.shape[1]")
    if segment_ids is not None:
        _check_segments(segment_ids, num_segments, a.shape[0], a)


def rowwise_bilinear(a, m, b, segment_ids, num_segments):
    check_rowwise_bilinear(a, m, b, segment_ids, num_segments)
    length = a.shape[0] if segment_ids is None else num_segments
    return a.new_empty(length, dtype=accumulation_dtype(a.dtype))


def check_ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments):
    """Raises RuntimeError naming the argument unless the arguments fit the kernel."""
    for t, name in ((x, "x"), (grad_out, "grad_out"), (target_x, "target_x"), (target_grad_out, "target_grad_out")):
        _check_matrix(t, name, x, "x")
    _check_dim(grad_out, "grad_out", 0, x.shape[0], "x.shape[0]")
    _check_dim(target_x, "target_x", 1, x.shape[1], "x.shape[1]")
    _check_dim(target_grad_out, "target_grad_out", 0, target_x.shape[0], "target_x.shape[0]")
    _check_dim(target_grad_out, "target_grad_out", 1, grad_out.shape[1], "grad_out.shape[1]")
    _check_segments(segment_ids, num_segments, x.shape[0], x)


def ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments):
    check_ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments)
    return x.new_empty(num_segments, dtype=accumulation_dtype(x.dtype))


def check_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias):
    """Raises RuntimeError naming the argument unless the arguments fit the kernel."""
    for t, name in ((x, "x"), (grad_out, "grad_out"), (target, "target")):
        _check_matrix(t, name, x, "x")
    _check_dim(grad_out, "grad_out", 0, x.shape[0], "x.shape[0]")
    _check_dim(target, "target", 0, grad_out.shape[1], "grad_out.shape[1]")
    _check_dim(target, "target", 1, x.shape[1], "x.shape[1]")
    if target_bias is not None:
        _check(target_bias.dim() == 1, lambda: f"target_bias must be 1-D, got shape {tuple(target_bias.shape)}")
        _check(target_bias.dtype == x.dtype,
               lambda: f"target_bias has dtype {target_bias.dtype} but x has dtype {x.dtype}")
        _check(target_bias.device == x.device,
               lambda: f"target_bias is on {target_bias.device} but x is on {x.device}")
        _check_dim(target_bias, "target_bias", 0, grad_out.shape[1], "grad_out.shape[1]")
    _check(offsets.dim() == 1 and offsets.shape[0] >= 1,
           lambda: f"offsets must be 1-D with num_segments + 1 >= 1 entries, got shape {tuple(offsets.shape)}")
    _check(offsets.dtype == torch.int64, lambda: f"offsets must be int64, got {offsets.dtype}")
    _check(offsets.device == x.device, lambda: f"offsets is on {offsets.device} but the data is on {x.device}")


def weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias):
    check_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias)
    acc = accumulation_dtype(x.dtype)
    return (x.new_empty(grad_out.shape[1], x.shape[1], dtype=acc),
            x.new_empty(grad_out.shape[1] if with_bias else 0, dtype=acc),
            x.new_empty(offsets.shape[0] - 1, dtype=acc))


def batched_svd(a):
    _check(a.dim() == 3, lambda: f"a must be 3-D (batch, m, n), got shape {tuple(a.shape)}")
    _check(a.dtype in (torch.float32, torch.float64),
           lambda: f"a must be float32 or float64 (convert float16/bfloat16 first), got {a.dtype}")
    batch, m, n = a.shape
    p = min(m, n)
    return a.new_empty(batch, m, p), a.new_empty(batch, p), a.new_empty(batch, p, n)
