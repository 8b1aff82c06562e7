"""Per-domain gradient inner products without per-domain backward passes.

For a linear layer with inputs x_n and output gradients δ_n, the gradient of the rows of
domain i is G_i = Σ_{n∈i} δ_n x_nᵀ, so against a target gradient V:

    ⟨G_i, V⟩ = Σ_{n∈i} δ_nᵀ V x_n          (one GEMM, a row dot, a segment sum)

and when V = Δ_tᵀ X_t comes from few target rows, the "ghost" form
⟨G_i, V⟩ = Σ_{n∈i} Σ_t (x_n·x_t)(δ_n·δ_t) costs N·M·(d_in+d_out) instead of N·d_in·d_out.
"""
import math
from typing import NamedTuple, Optional

import torch

from fastmix.ops import _fake, backends, reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- argument checks
def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_data(name, t):
    """The first data argument: a float tensor of rows (..., d)."""
    _check_float(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim (..., d), got a 0-dim tensor")


def _check_same(name, t, like_name, like):
    _check_float(name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def _check_rows(name, t, like_name, like):
    """`t` (..., d) must share the leading dims of `like` (..., d')."""
    _check_same(name, t, like_name, like)
    if t.dim() < 1 or t.shape[:-1] != like.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; its leading dims must match "
            f"{like_name}'s {tuple(like.shape[:-1])}"
        )


def _check_matrix(name, t, shape, like_name, like):
    _check_same(name, t, like_name, like)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# A tensor's size in bytes is an int64: the largest float64 output it allows.
MAX_SEGMENTS = (2**63 - 1) // 8


def check_segment_ids(segment_ids, num_segments, device=None, validate_ids=True):
    """Raises, naming the argument, unless segment_ids is an integer tensor (on `device`, the
    data's, unless None) and num_segments an int >= 0; with `validate_ids`, also if an id is
    >= num_segments (a host sync on GPUs)."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if device is not None and segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but the data is on {device}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0 (a Python int), got {num_segments!r} "
                         f"of type {type(num_segments).__name__}")
    if num_segments > MAX_SEGMENTS:  # else torch's allocator fails without naming the argument
        raise ValueError(f"num_segments is {num_segments}, more than the {MAX_SEGMENTS} segments whose "
                         "(num_segments,) float64 output a tensor can hold")
    if validate_ids and segment_ids.numel() > 0:
        largest = int(segment_ids.max())
        if largest >= num_segments:
            raise ValueError(
                f"segment_ids contains {largest}, but num_segments is {num_segments} "
                "(ids must be < num_segments; negative ids mark padding)"
            )


def flat_segment_ids(segment_ids, num_segments, leading_shape, device=None, validate_ids=True):
    """segment_ids of the leading shape, or of its first dim (one id per sequence,
    broadcast over the rest), checked (check_segment_ids), as a flat int64 tensor of one id
    per row."""
    check_segment_ids(segment_ids, num_segments, device, validate_ids)
    leading = tuple(leading_shape)
    ids_shape = tuple(segment_ids.shape)
    if ids_shape != leading:
        if len(leading) < 1 or ids_shape != leading[:1]:
            raise ValueError(
                f"segment_ids must have shape {leading} (one id per row) or {leading[:1]} "
                f"(one id per sequence), got {ids_shape}"
            )
        segment_ids = segment_ids.reshape(ids_shape + (1,) * (len(leading) - 1)).expand(leading)
    ids = segment_ids.reshape(-1)
    return ids if ids.dtype == torch.int64 else ids.to(torch.int64)


# ---------------------------------------------------------------- backend calls
def _run_rowwise_bilinear(a, m, b, ids, num_segments, backend):
    """a (N, p), m (p, q), b (N, q) checked and flat; ids (N,) int64 or None."""
    name = backends.choose("rowwise_bilinear", a.device, backend)
    if name == "reference":
        return reference.rowwise_bilinear(a, m, b, ids, num_segments)
    if name == "triton":
        from fastmix.ops.triton.rowwise_bilinear import rowwise_bilinear_triton

        return rowwise_bilinear_triton(a, m, b, ids, num_segments)
    return torch.ops.fastmix.rowwise_bilinear(a, m, b, ids, num_segments)


def _run_ghost_dots(x, grad_out, target_x, target_grad_out, ids, num_segments, backend):
    name = backends.choose("ghost_dots", x.device, backend)
    if name == "reference":
        return reference.ghost_dots(x, grad_out, target_x, target_grad_out, ids, num_segments)
    if name == "triton":
        from fastmix.ops.triton.ghost_dots import ghost_dots_triton

        return ghost_dots_triton(x, grad_out, target_x, target_grad_out, ids, num_segments)
    return torch.ops.fastmix.ghost_dots(x, grad_out, target_x, target_grad_out, ids, num_segments)


def _run_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias, backend):
    name = backends.choose("weight_grad_dots", x.device, backend)
    if name == "reference":
        return reference.weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias)
    if name == "triton":
        from fastmix.ops.triton.weight_grad_dots import weight_grad_dots_triton

        return weight_grad_dots_triton(x, grad_out, offsets, target, target_bias, with_bias)
    return torch.ops.fastmix.weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias)


def ghost_is_cheaper(n_rows, n_target_rows, d_in, d_out, target_formed=False):
    """FLOPs of the ghost form vs the GEMM form (plus forming V, unless it exists)."""
    ghost = n_rows * n_target_rows * (d_in + d_out)
    dense = n_rows * d_in * d_out + (0 if target_formed else n_target_rows * d_in * d_out)
    return ghost < dense


# The fused op against the GEMM the backward runs anyway, per device type, measured on the
# 2-core CPU machine by interleaved calls against torch.mm (bench/RESULTS.md, "weight_grad_dots").
# Segments of FUSED_BLAS_ROWS rows or more (the CPU binding's threshold, csrc/torch/weight_grad.cpp)
# take MKL there, plus one pass over G_i and V per segment: about FUSED_BLAS_SEGMENT_COST
# multiply-adds per weight entry and segment (1.2x torch.mm at 128 rows, 1.1x at 256-512, 1.0x at
# 2048 or k = 1). Smaller segments run the op's own kernel: its GEMM costs FUSED_GEMM_OVERHEAD
# GEMMs more (0.25 on the CPU, 1.1-1.3x torch.mm at 64 rows; GPU: not measured, no device was
# lent, 0.1 assumes the Triton kernel within 10% of cuBLAS), and each domain boundary about
# FUSED_EPILOGUE_COST multiply-adds per weight entry (1.8-2.0x torch.mm at 4 rows per domain,
# nearer 3; kept at 5, which leaves domains of 6 rows or fewer to the current form).
FUSED_GEMM_OVERHEAD = {"cpu": 0.25, "cuda": 0.1}
FUSED_EPILOGUE_COST = 5
FUSED_BLAS_ROWS = 128
FUSED_BLAS_SEGMENT_COST = 32


def fused_extra_cost(n_rows, num_segments, d_in, d_out, device_type="cpu"):
    """Multiply-adds weight_grad_dots costs beyond the weight-gradient GEMM of the backward, for
    segments of n_rows / num_segments rows: on the CPU with segments of FUSED_BLAS_ROWS or more,
    a pass per segment; else its slower GEMM and the epilogue per domain. Plus a copy of the
    rows (the grouping permutation's, where one is needed)."""
    weights = d_in * d_out
    if device_type == "cpu" and num_segments > 0 and n_rows >= FUSED_BLAS_ROWS * num_segments:
        extra = FUSED_BLAS_SEGMENT_COST * num_segments
    else:
        overhead = FUSED_GEMM_OVERHEAD.get(device_type, FUSED_GEMM_OVERHEAD["cpu"])
        extra = overhead * n_rows + FUSED_EPILOGUE_COST * num_segments
    return extra * weights + n_rows * (d_in + d_out)


def fused_is_cheaper(n_rows, num_segments, d_in, d_out, device_type="cpu"):
    """Whether, on a training backward, folding the dots into the weight gradient
    (fused_extra_cost) costs less than the current form's extra GEMM-sized product
    (rowwise_bilinear: n_rows · d_in · d_out multiply-adds)."""
    return fused_extra_cost(n_rows, num_segments, d_in, d_out, device_type) < n_rows * d_in * d_out


def _rows(t):
    """`t` (..., d) as a 2-D (rows, d) matrix, also when d or a leading dim is 0."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# ---------------------------------------------------------------- public ops
def rowwise_bilinear(a, m, b, segment_ids=None, num_segments=None, *, backend=None,
                     validate_ids=True):
    """r_n = a_n · (m @ b_n) for a (..., p), m (p, q), b (..., q).

    Returns float32 (float64 for float64 inputs) of shape (N,) with N the number of rows,
    or, with `segment_ids` (the leading shape, or its first dim) and `num_segments`, the
    per-segment sums (num_segments,). Negative ids are padding; ids >= num_segments
    raise (`validate_ids=False` skips that check and its GPU sync; such rows are dropped).
    """
    _check_data("a", a)
    _check_rows("b", b, "a", a)
    _check_matrix("m", m, (a.shape[-1], b.shape[-1]), "a", a)
    ids = None
    if segment_ids is not None or num_segments is not None:
        if segment_ids is None or num_segments is None:
            raise ValueError("segment_ids and num_segments must be given together")
        ids = flat_segment_ids(segment_ids, num_segments, a.shape[:-1], a.device, validate_ids)
    return _run_rowwise_bilinear(_rows(a), m, _rows(b), ids, num_segments or 0, backend)


def domain_grad_dots(x, grad_out, segment_ids, num_segments, target, *, backend=None,
                     validate_ids=True):
    """Per-domain ⟨G_i, target⟩ for a linear layer: s_i = Σ_{rows r of domain i}
    grad_out[r] · (target @ x[r]).

    x (..., d_in), grad_out (..., d_out), target (d_out, d_in); segment_ids gives each
    row's domain (leading shape, or first dim for one id per sequence; negative = padding).
    Returns float32 (float64 for float64 inputs) of shape (num_segments,).
    """
    _check_data("x", x)
    _check_rows("grad_out", grad_out, "x", x)
    _check_matrix("target", target, (grad_out.shape[-1], x.shape[-1]), "x", x)
    ids = flat_segment_ids(segment_ids, num_segments, x.shape[:-1], x.device, validate_ids)
    return _run_rowwise_bilinear(_rows(grad_out), target, _rows(x), ids, num_segments, backend)


def domain_grad_dots_ghost(x, grad_out, segment_ids, num_segments, target_x, target_grad_out,
                           *, backend=None, validate_ids=True):
    """domain_grad_dots with target = target_grad_outᵀ @ target_x, given by its rows
    target_x (..., d_in) and target_grad_out (..., d_out). Uses the ghost form (the target
    never formed, nor any N x M product written) when it needs fewer FLOPs, else forms
    the target once and runs the GEMM form."""
    _check_data("x", x)
    _check_rows("grad_out", grad_out, "x", x)
    _check_same("target_x", target_x, "x", x)
    _check_rows("target_grad_out", target_grad_out, "target_x", target_x)
    if target_x.shape[-1] != x.shape[-1] or target_grad_out.shape[-1] != grad_out.shape[-1]:
        raise ValueError(
            f"target_x (..., {target_x.shape[-1]}) and target_grad_out "
            f"(..., {target_grad_out.shape[-1]}) must end in x's d_in={x.shape[-1]} "
            f"and grad_out's d_out={grad_out.shape[-1]}"
        )
    ids = flat_segment_ids(segment_ids, num_segments, x.shape[:-1], x.device, validate_ids)
    x2, g2, tx, tg = _rows(x), _rows(grad_out), _rows(target_x), _rows(target_grad_out)
    if ghost_is_cheaper(x2.shape[0], tx.shape[0], x2.shape[1], g2.shape[1]):
        return _run_ghost_dots(x2, g2, tx, tg, ids, num_segments, backend)
    # The formed target is a sum of products: kept in the accumulation dtype (the rows are
    # widened to match), never rounded back to a 16-bit input dtype.
    acc = reference.accumulation_dtype(x.dtype)
    target = tg.to(acc).T @ tx.to(acc)
    return _run_rowwise_bilinear(g2.to(acc), target, x2.to(acc), ids, num_segments, backend)


def _offsets_of_sorted(key, num_segments):
    """offsets (num_segments + 1,) of the keys' runs 0..num_segments-1, for keys in order."""
    counts = torch.bincount(key, minlength=num_segments + 1)[:num_segments]
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=key.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def _padding_last(segment_ids, num_segments):
    """The ids with every id outside [0, num_segments) (padding) as num_segments."""
    return torch.where((segment_ids < 0) | (segment_ids >= num_segments), num_segments, segment_ids)


def group_rows(segment_ids, num_segments):
    """(order, offsets) that group rows by domain with one permutation: rows[order] has the
    rows of domain i at [offsets[i], offsets[i + 1]), in their original order, and the
    padding (ids outside [0, num_segments)) after offsets[num_segments]. segment_ids is a
    flat integer tensor of one id per row."""
    key = _padding_last(segment_ids, num_segments)
    order = torch.argsort(key, stable=True)
    return order, _offsets_of_sorted(key, num_segments)


# Runs of one domain at least this long on average (a sequence's tokens, with one id per
# sequence) are scored as pieces in place: at the demo model's width, 64-row pieces cost
# weight_grad_dots less than a permutation's copies of the rows and the output gradient.
RUN_ROWS = 64


class RowGrouping(NamedTuple):
    """How weight_grad_dots meets rows with domain ids: rows[order] (the rows as they are, for
    None) cut into pieces at `offsets`; piece p belongs to domain piece_domains[p] (domain p,
    for None; num_segments or more: no domain)."""
    order: Optional[torch.Tensor]
    offsets: torch.Tensor
    piece_domains: Optional[torch.Tensor]

    def rows(self, t):
        """`t` (N, d), one row per id, in the grouping's order."""
        return t if self.order is None else t.index_select(0, self.order)  # 3-7x faster than t[order] on the CPU

    def domain_dots(self, piece_dots, num_segments):
        """The (num_segments,) dots of the domains from those of the pieces, in their dtype (the
        pieces summed in float64)."""
        if self.piece_domains is None:
            return piece_dots
        return reference.segment_sum(piece_dots.to(torch.float64), self.piece_domains, num_segments).to(piece_dots.dtype)


def row_grouping(segment_ids, num_segments):
    """The RowGrouping of rows with these flat ids (one per row): the rows as they are where
    they come grouped by domain (a grouped sampler's batch) or in runs of one domain of
    RUN_ROWS rows or more on average (one id per sequence of that many tokens: each run is a
    piece, scored in place); else one permutation (group_rows). Looks at the ids on the host
    (a sync on GPUs)."""
    check_segment_ids(segment_ids, num_segments, validate_ids=False)
    if segment_ids.dim() != 1:
        raise ValueError(f"segment_ids must be flat (one id per row), got shape {tuple(segment_ids.shape)}")
    n_rows = segment_ids.numel()
    key = _padding_last(segment_ids, num_segments)
    if n_rows > 1 and not bool((key[1:] >= key[:-1]).all()):
        run_starts = torch.nonzero(key[1:] != key[:-1]).reshape(-1) + 1
        if (run_starts.numel() + 1) * RUN_ROWS > n_rows:
            return RowGrouping(*group_rows(segment_ids, num_segments), None)
        offsets = torch.cat([run_starts.new_zeros(1), run_starts, run_starts.new_full((1,), n_rows)])
        return RowGrouping(None, offsets, key[offsets[:-1]])
    return RowGrouping(None, _offsets_of_sorted(key, num_segments), None)


def _check_offsets(offsets, n_rows, device, validate):
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with num_segments + 1 >= 1 entries, got shape "
                         f"{tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but the data is on {device}")
    offsets = offsets.to(torch.int64)
    if validate:  # a host sync on GPUs: validate_ids=False skips it
        steps = torch.diff(offsets, prepend=offsets.new_zeros(1), append=offsets.new_full((1,), n_rows))
        if bool((steps < 0).any()):
            raise ValueError(f"offsets must be non-decreasing within [0, {n_rows}] (the number of "
                             f"rows), got {offsets.tolist() if offsets.numel() <= 20 else 'other values'}")
    return offsets


def weight_grad_dots(x, grad_out, target, segment_ids=None, num_segments=None, *, offsets=None,
                     target_bias=None, bias=False, backend=None, validate_ids=True):
    """The weight gradient of a linear layer and its per-domain dots, in one pass.

    x (..., d_in), grad_out (..., d_out), target (d_out, d_in). Returns (grad_weight,
    grad_bias, dots): grad_weight = Σ_n grad_out_nᵀ x_n (d_out, d_in); grad_bias = Σ_n
    grad_out_n (d_out,) when `bias`, else None; dots[i] = ⟨G_i, target⟩ with G_i the
    gradient of domain i's rows, plus ⟨Σ_{n∈i} grad_out_n, target_bias⟩ when target_bias
    (d_out,) is given. All in float32 (float64 for float64 inputs); every row counts in the
    gradients, padding too.

    The domains: either `offsets` (num_segments + 1,) for rows already grouped (domain i
    = rows [offsets[i], offsets[i + 1]); rows outside offsets[0]..offsets[-1] are in no
    domain), or `segment_ids` (the leading shape, or its first dim; negative = padding)
    with `num_segments`, grouped here as `row_grouping` says: one permutation at most, none
    for ids grouped or in long runs of one domain.
    """
    _check_data("x", x)
    _check_rows("grad_out", grad_out, "x", x)
    _check_matrix("target", target, (grad_out.shape[-1], x.shape[-1]), "x", x)
    if target_bias is not None:
        _check_matrix("target_bias", target_bias, (grad_out.shape[-1],), "x", x)
    x2, g2 = _rows(x), _rows(grad_out)
    if offsets is not None:
        if segment_ids is not None or num_segments is not None:
            raise ValueError("give either offsets or segment_ids with num_segments, not both")
        grouping = RowGrouping(None, _check_offsets(offsets, x2.shape[0], x.device, validate_ids), None)
    else:
        if segment_ids is None or num_segments is None:
            raise ValueError("segment_ids and num_segments must be given together (or offsets)")
        ids = flat_segment_ids(segment_ids, num_segments, x.shape[:-1], x.device, validate_ids)
        grouping = row_grouping(ids, num_segments)
    grad_weight, grad_bias, piece_dots = _run_weight_grad_dots(
        grouping.rows(x2), grouping.rows(g2), grouping.offsets, target, target_bias, bool(bias), backend)
    dots = grouping.domain_dots(piece_dots, num_segments)
    return grad_weight, (grad_bias if bias else None), dots


# ---------------------------------------------------------------- torch.compile support
if backends.COMPILED:
    torch.library.register_fake("fastmix::rowwise_bilinear")(_fake.rowwise_bilinear)
    torch.library.register_fake("fastmix::ghost_dots")(_fake.ghost_dots)
    torch.library.register_fake("fastmix::weight_grad_dots")(_fake.weight_grad_dots)
