"""A linear layer whose backward also scores domains: the weight gradient, the bias gradient
and the per-domain dots ⟨G_i, V⟩ come out of one weight_grad_dots pass, so a training step's
own backward carries the scores without a second GEMM-sized product over its rows.

    sink = DomainDots(target, domain_ids, num_domains)        # target: the weight's shape
    y = fused_linear(x, layer.weight, layer.bias, sink)        # as F.linear(x, weight, bias)
    y.sum().backward()                                         # .grad as plain autograd's
    sink.dots                                                  # (k,) summed over backwards

`weight_layout="in_out"` takes a weight stored (d_in, d_out), as Hugging Face's Conv1D keeps it
(y = x @ weight + bias). Under autocast the inputs are cast as F.linear's would be; the dots
are computed in float32 (float64 for float64 data or target) whatever the autocast dtype.
"""
import math

import torch
import torch.nn.functional as F

from fastmix.ops.alignment import (
    FLOAT_DTYPES, RowGrouping, check_segment_ids, flat_segment_ids, row_grouping, weight_grad_dots,
)

WEIGHT_LAYOUTS = ("out_in", "in_out")


def _integer_tensor(name, t):
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


class DomainDots:
    """Where fused_linear's backward delivers ⟨G_i, target⟩ for each domain i: `dots` sums them
    over every backward through the layer (as `.grad` sums gradients), divided by `loss_scale`
    (a GradScaler's scale, which `.grad` keeps).

    target: the weight's shape; target_bias (d_out,) adds ⟨Σ_{n∈i} δ_n, target_bias⟩. The
    domains: `segment_ids` (the input's leading shape, e.g. (B, T) for packed sequences, or its
    first dim; negative = padding) with `num_segments`, or `offsets` (k + 1,) for rows already
    grouped by domain (domain i = rows [offsets[i], offsets[i + 1])). `validate_ids=False`
    skips the check that ids are < num_segments (a host sync on GPUs).

    `input_grad_only = True` makes the backward compute the input's gradient alone: no weight or
    bias gradient, no dots. For a pass that wants no parameter gradient (AlignmentProbe.backward,
    which scores such layers from their output gradients instead)."""

    def __init__(self, target, segment_ids=None, num_segments=None, *, offsets=None, target_bias=None,
                 loss_scale=1.0, validate_ids=True):
        if not isinstance(target, torch.Tensor) or target.dtype not in FLOAT_DTYPES:
            raise TypeError(f"target must be a float tensor, got "
                            f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
        if target_bias is not None and (not isinstance(target_bias, torch.Tensor) or target_bias.dtype != target.dtype):
            raise TypeError(f"target_bias must be a tensor of target's dtype {target.dtype}")
        if offsets is not None:
            if segment_ids is not None or num_segments is not None:
                raise ValueError("give either offsets or segment_ids with num_segments, not both")
            _integer_tensor("offsets", offsets)
            if offsets.dim() != 1 or offsets.numel() < 1:
                raise ValueError(f"offsets must be 1-D with num_segments + 1 >= 1 entries, got shape "
                                 f"{tuple(offsets.shape)}")
        else:
            if segment_ids is None or num_segments is None:
                raise ValueError("segment_ids and num_segments must be given together (or offsets)")
            check_segment_ids(segment_ids, num_segments, validate_ids=validate_ids)
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale > 0:
            raise ValueError(f"loss_scale must be a number > 0, got {loss_scale!r}")
        self.target, self.target_bias = target, target_bias
        self.segment_ids, self.num_segments, self.offsets = segment_ids, num_segments, offsets
        self.loss_scale = float(loss_scale)
        self.input_grad_only = False
        self._sum = None

    @property
    def dots(self):
        """(k,) float64 sums over the backwards so far, or None before the first."""
        return None if self._sum is None else self._sum / self.loss_scale

    def add_pieces(self, piece_dots, grouping):
        """Adds one backward's dots, given per piece of its RowGrouping (called by
        fused_linear's backward)."""
        dots = grouping.domain_dots(piece_dots.to(torch.float64), self.num_segments)
        self._sum = dots if self._sum is None else self._sum + dots

    def grouping(self, leading_shape):
        """The RowGrouping of inputs whose leading dims are `leading_shape` (row_grouping's, for
        segment_ids)."""
        if self.offsets is not None:
            offsets = self.offsets.to(torch.int64)
            n_rows = math.prod(leading_shape)
            if offsets.numel() and int(offsets[-1]) > n_rows:
                raise ValueError(f"offsets ends at {int(offsets[-1])}, past the input's {n_rows} rows")
            return RowGrouping(None, offsets, None)
        ids = flat_segment_ids(self.segment_ids, self.num_segments, leading_shape, validate_ids=False)
        return row_grouping(ids, self.num_segments)


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to costs a dispatch per layer


class _FusedLinear(torch.autograd.Function):
    """On rows (N, d_in): fused_linear flattens the input outside, so that the output is a view
    of this Function's output, not of a tensor made inside it (an in-place op after the layer,
    or a hook on the view's base, then works as after F.linear)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, sink, in_out, grouping):
        ctx.save_for_backward(rows, weight)
        ctx.sink, ctx.in_out, ctx.grouping = sink, in_out, grouping
        ctx.has_bias = bias is not None
        if not in_out:
            return F.linear(rows, weight, bias)
        return rows @ weight if bias is None else torch.addmm(bias, rows, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grads):
        rows, weight = ctx.saved_tensors
        sink, in_out = ctx.sink, ctx.in_out
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = grads @ (weight.T if in_out else weight)
        if sink.input_grad_only:
            return grad_rows, None, None, None, None, None
        target = sink.target.T if in_out else sink.target
        # the dots keep float32 (or float64) accuracy: 16-bit rows are widened, never the target rounded
        work = torch.promote_types(torch.promote_types(rows.dtype, target.dtype), torch.float32)
        grouping = ctx.grouping
        target_bias = None if sink.target_bias is None else _cast(sink.target_bias, work)
        grad_weight, grad_bias, piece_dots = weight_grad_dots(
            _cast(grouping.rows(rows), work), _cast(grouping.rows(grads), work), _cast(target, work),
            offsets=grouping.offsets, target_bias=target_bias, bias=ctx.has_bias and ctx.needs_input_grad[2],
            validate_ids=False)
        sink.add_pieces(piece_dots, grouping)
        grad_weight = (grad_weight.T if in_out else grad_weight) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_weight, grad_bias, None, None, None


def fused_linear(x, weight, bias, sink, *, weight_layout="out_in"):
    """F.linear(x, weight, bias) (or x @ weight + bias for weight_layout="in_out") whose
    backward adds the per-domain dots of the weight's (and bias's) gradient to `sink`, a
    DomainDots, computing `.grad` in the same pass."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise TypeError("x must be a float tensor of shape (..., d_in)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    in_out = weight_layout == "in_out"
    d_in, d_out = weight.shape[::-1] if not in_out else weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but weight (layout {weight_layout}) takes d_in={d_in}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if not isinstance(sink, DomainDots):
        raise TypeError(f"sink must be a DomainDots, got {type(sink).__name__}")
    if sink.target.shape != weight.shape:
        raise ValueError(f"sink.target must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(sink.target.shape)}")
    if sink.target_bias is not None and tuple(sink.target_bias.shape) != (d_out,):
        raise ValueError(f"sink.target_bias must have shape ({d_out},), got {tuple(sink.target_bias.shape)}")
    for name, t in (("sink.target", sink.target), ("sink.segment_ids", sink.segment_ids),
                    ("sink.offsets", sink.offsets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    grouping = sink.grouping(x.shape[:-1])
    out_shape = x.shape[:-1] + (d_out,)
    rows = x.reshape(-1, d_in)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # cast as autocast casts F.linear's inputs
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _FusedLinear.apply(rows, weight, bias, sink, in_out, grouping).reshape(out_shape)
    return _FusedLinear.apply(rows, weight, bias, sink, in_out, grouping).reshape(out_shape)
