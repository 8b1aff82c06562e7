"""fused_linear: the forward of nn.Linear / Conv1D, whose backward gives plain autograd's .grad
and adds the per-domain dots ⟨G_i, V⟩ to a DomainDots sink, checked against the per-domain
gradients formed explicitly in float64."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastmix.ops as ops
from fastmix.ops.alignment import RUN_ROWS

LAYOUTS = ["out_in", "in_out"]


def make_layer(layout, d_in, d_out, dtype, bias=True):
    if layout == "out_in":
        layer = nn.Linear(d_in, d_out, bias=bias)
    else:  # Hugging Face's Conv1D: weight (d_in, d_out), always a bias
        layer = Conv1D(d_out, d_in)
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    return layer.to(dtype)


def fused_forward(layer, x, sink):
    layout = "in_out" if isinstance(layer, Conv1D) else "out_in"
    return ops.fused_linear(x, layer.weight, layer.bias, sink, weight_layout=layout)


def run(layer, x, loss_weight, sink=None, scale=1.0):
    """Forward (plain, or fused with `sink`) and backward of Σ loss_weight ⊙ y (times scale);
    returns the output and its gradient."""
    y = layer(x) if sink is None else fused_forward(layer, x, sink)
    seen = {}
    y.register_hook(lambda grad: seen.__setitem__("grad", grad))
    ((y.float() * loss_weight).sum() * scale).backward()
    return y, seen["grad"]


def grads_of(layer, x):
    out = {name: p.grad.clone() for name, p in layer.named_parameters()}
    out["input"] = x.grad.clone()
    return out


def zero(layer, x):
    layer.zero_grad(set_to_none=True)
    x.grad = None


def explicit_dots(layer, x, grad_out, ids, k, target, target_bias=None):
    """⟨G_i, target⟩ (+ ⟨Σ δ_n, target_bias⟩) per domain from the per-domain gradients in float64,
    and the scale Σ|terms| their error is measured against."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    g = grad_out.reshape(-1, grad_out.shape[-1]).double()
    ids = ids.reshape(ids.shape + (1,) * (x.dim() - 1 - ids.dim())).expand(x.shape[:-1]).reshape(-1)
    v = target.double() if isinstance(layer, nn.Linear) else target.double().T  # as (d_out, d_in)
    dots, scale = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        mask = ids == i
        dots[i] = ((g[mask].T @ rows[mask]) * v).sum()
        scale[i] = ((g[mask].abs().T @ rows[mask].abs()) * v.abs()).sum()
        if target_bias is not None:
            dots[i] += g[mask].sum(0) @ target_bias.double()
            scale[i] += g[mask].abs().sum(0) @ target_bias.double().abs()
    return dots, scale


def assert_grads_equal(got, want, tolerance):
    """Each gradient within `tolerance` of plain autograd's, relative to its largest entry."""
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs().max().item()
        assert err <= tolerance * max(w.abs().max().item(), 1e-30), f"{name}: error {err}"


def inputs(layout, dtype, shape=(3, 5), d_in=6, d_out=4, k=3):
    layer = make_layer(layout, d_in, d_out, dtype)
    x = torch.randn(*shape, d_in, dtype=dtype, requires_grad=True)
    loss_weight = torch.randn(*shape, d_out, dtype=dtype)
    target = torch.randn(layer.weight.shape, dtype=dtype)
    target_bias = torch.randn(d_out, dtype=dtype)
    return layer, x, loss_weight, target, target_bias


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-15)])
@pytest.mark.parametrize("per_token", [True, False])
def test_grad_equals_plain_autograd_and_dots_the_explicit_ones(seed, layout, dtype, tolerance, per_token):
    layer, x, loss_weight, target, target_bias = inputs(layout, dtype)
    k = 3
    ids = torch.randint(-1, k, x.shape[:-1] if per_token else x.shape[:1])  # -1: padding
    y_plain, _ = run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, ids, k, target_bias=target_bias)
    y, grad_out = run(layer, x, loss_weight, sink)
    assert torch.equal(y, y_plain)
    assert_grads_equal(grads_of(layer, x), want, tolerance)
    dots, scale = explicit_dots(layer, x, grad_out, ids, k, target, target_bias)
    assert sink.dots.dtype == torch.float64
    assert bool(((sink.dots - dots).abs() <= (2e-5 if dtype == torch.float32 else 1e-12) * scale + 1e-30).all())


def test_without_bias(seed):
    layer = make_layer("out_in", 5, 3, torch.float64, bias=False)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    loss_weight = torch.randn(7, 3, dtype=torch.float64)
    run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    ids, target = torch.randint(0, 2, (7,)), torch.randn(3, 5, dtype=torch.float64)
    sink = ops.DomainDots(target, ids, 2)
    _, grad_out = run(layer, x, loss_weight, sink)
    assert_grads_equal(grads_of(layer, x), want, 1e-15)
    dots, scale = explicit_dots(layer, x, grad_out, ids, 2, target)
    assert bool(((sink.dots - dots).abs() <= 1e-12 * scale).all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_accumulation_adds_grads_and_dots(seed, layout):
    layer, x, loss_weight, target, target_bias = inputs(layout, torch.float64)
    x2 = torch.randn_like(x).requires_grad_()
    ids, ids2 = torch.randint(0, 3, (3,)), torch.randint(0, 3, (3,))
    run(layer, x, loss_weight)
    run(layer, x2, -loss_weight)
    want = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    sink = ops.DomainDots(target, ids, 3, target_bias=target_bias)
    _, g1 = run(layer, x, loss_weight, sink)
    first = sink.dots.clone()
    sink.segment_ids = ids2  # the next micro-batch's domains, read at its forward
    _, g2 = run(layer, x2, -loss_weight, sink)
    assert_grads_equal({name: p.grad for name, p in layer.named_parameters()}, want, 1e-15)
    d1, s1 = explicit_dots(layer, x, g1, ids, 3, target, target_bias)
    d2, s2 = explicit_dots(layer, x2, g2, ids2, 3, target, target_bias)
    assert bool(((first - d1).abs() <= 1e-12 * s1).all())
    assert bool(((sink.dots - d1 - d2).abs() <= 1e-12 * (s1 + s2)).all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_autocast(seed, layout):
    layer, x, loss_weight, target, target_bias = inputs(layout, torch.float32, shape=(4, 8), d_in=16, d_out=8)
    ids = torch.randint(0, 3, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, _ = run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, ids, 3, target_bias=target_bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grad_out = run(layer, x, loss_weight, sink)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_plain)
    got = grads_of(layer, x)
    assert all(got[name].dtype == w.dtype for name, w in want.items())
    assert_grads_equal(got, want, 2e-2)  # both round the gradient to bfloat16, summed in other orders
    # the dots of the bfloat16 rows the layer multiplied, accumulated in float32
    dots, scale = explicit_dots(layer, x.to(torch.bfloat16), grad_out, ids, 3, target, target_bias)
    assert bool(((sink.dots - dots).abs() <= 2e-5 * scale).all())


def test_grad_scaler_scale_is_divided_out_of_the_dots(seed):
    layer, x, loss_weight, target, target_bias = inputs("out_in", torch.float32)
    ids = torch.randint(0, 3, (3,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    y = fused_forward(layer, x, sink := ops.DomainDots(target, ids, 3, target_bias=target_bias,
                                                       loss_scale=scaler.get_scale()))
    seen = {}
    y.register_hook(lambda grad: seen.__setitem__("grad", grad))
    scaler.scale((y * loss_weight).sum()).backward()
    dots, scale = explicit_dots(layer, x, seen["grad"] / scaler.get_scale(), ids, 3, target, target_bias)
    assert bool(((sink.dots - dots).abs() <= 2e-5 * scale).all())
    scaled_grad = layer.weight.grad.clone()  # .grad keeps the scale, for the scaler to unscale
    zero(layer, x)
    run(layer, x, loss_weight, scale=scaler.get_scale())
    assert_grads_equal({"weight": scaled_grad}, {"weight": layer.weight.grad}, 1e-6)


def test_non_contiguous_input(seed):
    layer = make_layer("out_in", 6, 4, torch.float64)
    base = torch.randn(5, 3, 6, dtype=torch.float64)
    x = base.transpose(0, 1).requires_grad_()  # (3, 5, 6), not contiguous
    assert not x.is_contiguous()
    loss_weight = torch.randn(3, 5, 4, dtype=torch.float64)
    run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    ids, target = torch.randint(0, 2, (3, 5)), torch.randn(4, 6, dtype=torch.float64)
    sink = ops.DomainDots(target, ids, 2)
    _, grad_out = run(layer, x, loss_weight, sink)
    assert_grads_equal(grads_of(layer, x), want, 1e-15)
    dots, scale = explicit_dots(layer, x, grad_out, ids, 2, target)
    assert bool(((sink.dots - dots).abs() <= 1e-12 * scale).all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_place_op_after_the_layer(seed, layout):
    """The output is an ordinary view of the op's output, as F.linear's is: an in-place op after
    the layer (ReLU(inplace=True)) and a hook on the view's base both work."""
    layer, x, loss_weight, target, target_bias = inputs(layout, torch.float64)
    ((torch.relu_(layer(x)) * loss_weight).sum()).backward()
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, torch.randint(0, 3, (3,)), 3, target_bias=target_bias)
    y = fused_forward(layer, x, sink)
    seen = {}
    y._base.register_hook(lambda grad: seen.__setitem__("grad", grad))
    ((torch.relu_(y) * loss_weight).sum()).backward()
    assert_grads_equal(grads_of(layer, x), want, 1e-15)
    assert seen["grad"].shape == (15, 4)  # the rows (3 x 5) by d_out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_grad_only_computes_the_input_gradient_alone(seed, layout):
    layer, x, loss_weight, target, target_bias = inputs(layout, torch.float64)
    run(layer, x, loss_weight)
    want = x.grad.clone()
    zero(layer, x)
    sink = ops.DomainDots(target, torch.randint(0, 3, (3,)), 3, target_bias=target_bias)
    sink.input_grad_only = True
    run(layer, x, loss_weight, sink)
    assert torch.allclose(x.grad, want, rtol=0, atol=1e-15)
    assert all(p.grad is None for p in layer.parameters()) and sink.dots is None


@pytest.mark.parametrize("ids_of,k", [
    (lambda n: torch.zeros(n, dtype=torch.long), 1),  # one domain
    (lambda n: torch.arange(n) % 2 * 2, 4),  # domains 1 and 3 empty
    (lambda n: torch.arange(n) * 3 // n, 3),  # already grouped: no permutation
    (lambda n: torch.full((n,), -1), 2),  # all padding
])
def test_domain_layouts(seed, ids_of, k):
    layer, x, loss_weight, target, target_bias = inputs("in_out", torch.float64, shape=(9,))
    ids = ids_of(9)
    run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, ids, k, target_bias=target_bias)
    _, grad_out = run(layer, x, loss_weight, sink)
    assert_grads_equal(grads_of(layer, x), want, 1e-15)
    dots, scale = explicit_dots(layer, x, grad_out, ids, k, target, target_bias)
    assert sink.dots.shape == (k,)
    assert bool(((sink.dots - dots).abs() <= 1e-12 * scale).all())
    for i in set(range(k)) - set(ids.tolist()):
        assert sink.dots[i] == 0


def test_grouping_of_ids_per_sequence_and_of_offsets():
    target = torch.zeros(2, 2)
    ids = torch.tensor([1, 0, 1, -1])  # one per sequence of RUN_ROWS tokens, the domains interleaved
    order, offsets, pieces = ops.DomainDots(target, ids, 3).grouping((4, RUN_ROWS))
    assert order is None and offsets.tolist() == [0, RUN_ROWS, 2 * RUN_ROWS, 3 * RUN_ROWS, 4 * RUN_ROWS]
    assert pieces.tolist() == [1, 0, 1, 3]  # 3 = num_segments: padding, in no domain
    order, offsets, pieces = ops.DomainDots(target, ids, 3).grouping((4, RUN_ROWS - 1))  # shorter runs
    assert order is not None and pieces is None
    order, offsets, pieces = ops.DomainDots(target, offsets=torch.tensor([0, 3, 5])).grouping((2, 3))
    assert order is None and pieces is None and offsets.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="offsets ends at 5, past the input's 4 rows"):
        ops.DomainDots(target, offsets=torch.tensor([0, 3, 5])).grouping((4,))


@pytest.mark.parametrize("layout", LAYOUTS)
# 320 rows summed piece by piece, not in the GEMM's order: fp64 agrees to 1e-12, not to the last bit
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_long_runs_of_one_domain_are_scored_in_place(seed, layout, dtype, tolerance):
    """Sequences of one domain each, their domains interleaved, one of padding: the pieces give
    plain autograd's .grad and the explicit dots."""
    layer, x, loss_weight, target, target_bias = inputs(layout, dtype, shape=(5, RUN_ROWS))
    ids = torch.tensor([2, 0, 2, -1, 0])
    y_plain, _ = run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, ids, 4, target_bias=target_bias)  # domains 1 and 3 empty
    assert sink.grouping(x.shape[:-1]).piece_domains is not None
    y, grad_out = run(layer, x, loss_weight, sink)
    assert torch.equal(y, y_plain)
    assert_grads_equal(grads_of(layer, x), want, tolerance)
    dots, scale = explicit_dots(layer, x, grad_out, ids, 4, target, target_bias)
    assert bool(((sink.dots - dots).abs() <= tolerance * scale).all()), (sink.dots, dots)
    assert sink.dots[1] == 0 and sink.dots[3] == 0


def test_offsets_for_rows_grouped_by_the_caller(seed):
    layer, x, loss_weight, target, target_bias = inputs("out_in", torch.float64, shape=(8,))
    run(layer, x, loss_weight)
    want = grads_of(layer, x)
    zero(layer, x)
    sink = ops.DomainDots(target, offsets=torch.tensor([0, 3, 3, 7]), target_bias=target_bias)
    _, grad_out = run(layer, x, loss_weight, sink)
    assert_grads_equal(grads_of(layer, x), want, 1e-15)
    ids = torch.tensor([0, 0, 0, 2, 2, 2, 2, -1])  # the last row is in no domain
    dots, scale = explicit_dots(layer, x, grad_out, ids, 3, target, target_bias)
    assert bool(((sink.dots - dots).abs() <= 1e-12 * scale).all())


# ---------------------------------------------------------------- bad input
def call(x=None, weight=None, bias=None, sink=None, layout="out_in"):
    x = torch.randn(4, 3) if x is None else x
    weight = torch.randn(2, 3) if weight is None else weight
    sink = ops.DomainDots(torch.randn(2, 3), torch.tensor([0, 1, 0, 1]), 2) if sink is None else sink
    return ops.fused_linear(x, weight, bias, sink, weight_layout=layout)


@pytest.mark.parametrize("make,error,message", [
    (lambda: call(x=torch.randn(4, 5)), ValueError, "x has 5 features but weight"),
    (lambda: call(layout="io"), ValueError, "weight_layout must be one of"),
    (lambda: call(bias=torch.randn(3)), ValueError, "bias must have shape (2,)"),
    (lambda: call(sink=torch.randn(2, 3)), TypeError, "sink must be a DomainDots"),
    (lambda: call(sink=ops.DomainDots(torch.randn(3, 2), torch.tensor([0, 1, 0, 1]), 2)), ValueError,
     "sink.target must have the weight's shape (2, 3)"),
    (lambda: call(sink=ops.DomainDots(torch.randn(2, 3), torch.tensor([0, 1, 0]), 2)), ValueError,
     "segment_ids must have shape (4,)"),
    (lambda: ops.DomainDots(torch.randn(2, 3), torch.tensor([0.0, 1.0]), 2), TypeError,
     "segment_ids must be an integer tensor"),
    (lambda: ops.DomainDots(torch.randn(2, 3), torch.tensor([0, 2]), 2), ValueError,
     "segment_ids contains 2, but num_segments is 2"),
    (lambda: ops.DomainDots(torch.randn(2, 3), torch.tensor([0, 1])), ValueError,
     "segment_ids and num_segments must be given together"),
    (lambda: ops.DomainDots(torch.randn(2, 3), torch.tensor([0, 1]), 2, loss_scale=0), ValueError,
     "loss_scale must be a number > 0"),
    (lambda: call(sink=ops.DomainDots(torch.randn(2, 3), offsets=torch.tensor([0, 5]))), ValueError,
     "offsets ends at 5, past the input's 4 rows"),
])
def test_bad_input_names_the_argument(make, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
