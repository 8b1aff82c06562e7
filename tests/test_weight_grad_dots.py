"""weight_grad_dots on every backend against the weight gradient and the per-domain gradients
formed explicitly in float64."""
import importlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmix.ops as ops
from conftest import device_backend_params
from fastmix.ops import backends
from fastmix.ops.alignment import RUN_ROWS

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Inputs are rounded to the dtype first, so only accumulation error remains: float32 (or
# float64) accumulation, relative to the sum of |terms| of each result.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
PARAMS = device_backend_params("weight_grad_dots")


def interpreted(backend):
    return backend == "triton" and backends.triton_interpreted()


def kernel_op(backend):
    """torch.ops.fastmix.weight_grad_dots, or its Triton twin (registered on import)."""
    if backend == "triton":
        importlib.import_module("fastmix.ops.triton.weight_grad_dots")
        return torch.ops.fastmix.weight_grad_dots_triton
    return torch.ops.fastmix.weight_grad_dots


def as_rows(t):
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def explicit(x, grad_out, ids, k, target, target_bias=None):
    """In float64 from the explicit per-domain gradients: (grad_weight, grad_bias, dots) and
    the scales (Σ|terms|) their errors are measured against."""
    x, g = as_rows(x).cpu().double(), as_rows(grad_out).cpu().double()
    target = target.cpu().double()
    bias_target = None if target_bias is None else target_bias.cpu().double()
    dots, dot_scale = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        rows = ids == i
        g_i = g[rows].T @ x[rows]
        dots[i] = (g_i * target).sum()
        dot_scale[i] = ((g[rows].abs().T @ x[rows].abs()) * target.abs()).sum()
        if bias_target is not None:
            dots[i] += g[rows].sum(0) @ bias_target
            dot_scale[i] += g[rows].abs().sum(0) @ bias_target.abs()
    return ((g.T @ x, g.sum(0), dots),
            (g.abs().T @ x.abs(), g.abs().sum(0), dot_scale))


def assert_close(got, want, scale, dtype, what):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert got.shape == want.shape, what
    err = (got.double().cpu() - want).abs()
    bound = TOLERANCE[dtype] * (scale + 1e-12)
    assert bool((err <= bound).all()), f"{what}: error {err.max().item()} above its bound"


def assert_matches(result, wanted, dtype, bias=True):
    (want_w, want_b, want_d), (scale_w, scale_b, scale_d) = wanted
    grad_weight, grad_bias, dots = result
    assert_close(grad_weight, want_w, scale_w, dtype, "grad_weight")
    if bias:
        assert_close(grad_bias, want_b, scale_b, dtype, "grad_bias")
    else:
        assert grad_bias is None
    assert_close(dots, want_d, scale_d, dtype, "dots")


def rows_ids(shape, k, device, generator=None):
    """Random domain ids with padding (-1) mixed in; the first row is a real domain."""
    ids = torch.randint(-1, k, shape, generator=generator)
    if ids.numel() and k > 0:
        ids.view(-1)[0] = int(torch.randint(0, k, (), generator=generator))
    return ids.to(device)


def random_inputs(shape, d_in, d_out, dtype, device, generator=None):
    def draw(*s):
        return torch.randn(*s, generator=generator).to(dtype).to(device)
    return draw(*shape, d_in), draw(*shape, d_out), draw(d_out, d_in), draw(d_out)


SHAPES = [  # (leading shape, d_in, d_out, k)
    ((1,), 1, 1, 1),  # one row, k=1
    ((7,), 5, 3, 1),
    ((33,), 17, 40, 5),
    ((2, 19), 24, 9, 3),  # 3-D input (batch, tokens, width)
    ((70,), 16, 33, 50),  # more domains than rows fill: many empty
]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,d_in,d_out,k", SHAPES)
def test_matches_the_explicit_gradients(seed, device, backend, dtype, shape, d_in, d_out, k):
    x, grad_out, target, target_bias = random_inputs(shape, d_in, d_out, dtype, device)
    ids = rows_ids(shape, k, device)
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=target_bias, bias=True,
                               backend=backend)
    assert_matches(got, explicit(x, grad_out, ids.reshape(-1).cpu(), k, target, target_bias), dtype)


# Sizes that cross every tile boundary with ragged tails: the C++ kernel's 6 x 32 register
# tiles and 256-row blocks (csrc/kernels/weight_grad_cpu.cpp), the CUDA
# kernel's 64-wide tiles and 16-row slices, Triton's GPU tiles (up to 128, 64 rows deep);
# under the interpreter Triton runs 16-wide blocks, which the smaller sizes cross as often.
CROSSING = {"full": (600, 70, 200, 9), "interpreted": (60, 40, 35, 4)}  # (n, d_in, d_out, k)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_bias", [True, False], ids=["bias-target", "no-bias-target"])
def test_crosses_every_tile_boundary(seed, device, backend, dtype, target_bias):
    n, d_in, d_out, k = CROSSING["interpreted" if interpreted(backend) else "full"]
    x, grad_out, target, bias_target = random_inputs((n,), d_in, d_out, dtype, device)
    bias_target = bias_target if target_bias else None
    ids = rows_ids((n,), k, device)
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=bias_target,
                               bias=target_bias, backend=backend)
    assert_matches(got, explicit(x, grad_out, ids.cpu(), k, target, bias_target), dtype, bias=target_bias)


# The CPU kernel's two ways of splitting the work between its threads (csrc/kernels/
# weight_grad_cpu.cpp), in segments under 128 rows (the kernel, not at::mm): many rows of a
# narrow layer split by rows, each thread with an output of its own, a boundary inside a
# segment; a wide layer (more than 2^17 output elements) split by output rows, each thread
# with a slice of the bias and of the dots' columns.
THREAD_SPLITS = {  # (n, d_in, d_out, k): full size, under the Triton interpreter
    "rows": {"full": (1000, 40, 30, 12), "interpreted": (100, 20, 10, 4)},
    "output": {"full": (300, 400, 350, 6), "interpreted": (40, 30, 20, 3)},
}


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", sorted(THREAD_SPLITS))
def test_both_thread_splits(seed, device, backend, dtype, split):
    n, d_in, d_out, k = THREAD_SPLITS[split]["interpreted" if interpreted(backend) else "full"]
    x, grad_out, target, target_bias = random_inputs((n,), d_in, d_out, dtype, device)
    ids = rows_ids((n,), k, device)
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=target_bias, bias=True, backend=backend)
    assert_matches(got, explicit(x, grad_out, ids.cpu(), k, target, target_bias), dtype)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_offsets_of_grouped_rows_and_rows_outside_them(seed, device, backend):
    """Rows before offsets[0] and after offsets[-1] count in the gradients, in no domain;
    equal offsets are empty domains."""
    n, d_in, d_out = 40, 12, 9
    x, grad_out, target, target_bias = random_inputs((n,), d_in, d_out, torch.float64, device)
    offsets = torch.tensor([3, 10, 10, 31, 35], device=device)
    ids = torch.full((n,), -1)
    for i in range(4):
        ids[offsets[i]:offsets[i + 1]] = i
    got = ops.weight_grad_dots(x, grad_out, target, offsets=offsets, target_bias=target_bias,
                               bias=True, backend=backend)
    assert_matches(got, explicit(x, grad_out, ids, 4, target, target_bias), torch.float64)
    assert float(got[2][1]) == 0.0  # the empty domain


# Segments of many rows next to runs of few: the CPU binding forms the large ones' pieces with
# at::mm (from 128 rows, csrc/torch/weight_grad.cpp) and sends the runs to the raw kernel. The
# rows outside the segments are a small run before them and a large piece after them. Ten large
# segments in a row: the first written straight into grad_weight, the others added to it.
MIXED_OFFSETS = [7, 307, 310, 310, 331, 631, 640, 1000]
LARGE_OFFSETS = list(range(0, 1281, 128))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_bias", [True, False], ids=["bias-target", "no-bias-target"])
@pytest.mark.parametrize("offsets", [MIXED_OFFSETS, [0, 300], [140, 290], LARGE_OFFSETS],
                         ids=["mixed", "one", "outside", "large"])
def test_large_and_small_segments(seed, device, backend, dtype, target_bias, offsets):
    scale = 10 if interpreted(backend) else 1  # the same layout in a tenth of the rows: the split is the CPU binding's
    n, d_in, d_out = 1400 // scale, 70, 40
    x, grad_out, target, bias_target = random_inputs((n,), d_in, d_out, dtype, device)
    bias_target = bias_target if target_bias else None
    offsets = torch.tensor(offsets, device=device) // scale
    ids = ops.reference.offsets_to_ids(offsets.cpu(), n)
    k = offsets.numel() - 1
    got = ops.weight_grad_dots(x, grad_out, target, offsets=offsets, target_bias=bias_target,
                               bias=target_bias, backend=backend)
    assert_matches(got, explicit(x, grad_out, torch.where(ids < k, ids, -1), k, target, bias_target),
                   dtype, bias=target_bias)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(seed, device, backend, dtype):
    batch, tokens, d_in, d_out, k = 3, 11, 12, 20, 4
    x = torch.randn(d_in, tokens, batch, device=device).to(dtype).permute(2, 1, 0)
    grad_out = torch.randn(batch, tokens, 2 * d_out, device=device).to(dtype)[..., ::2]
    target = torch.randn(d_in, d_out, device=device).to(dtype).T
    target_bias = torch.randn(2 * d_out, device=device).to(dtype)[::2]
    ids = rows_ids((2 * batch,), k, device)[::2]  # one id per sequence, strided
    assert not any(t.is_contiguous() for t in (x, grad_out, target, target_bias, ids))
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=target_bias, bias=True,
                               backend=backend)
    flat = ids.cpu().reshape(batch, 1).expand(batch, tokens).reshape(-1)
    assert_matches(got, explicit(x, grad_out, flat, k, target, target_bias), dtype)


EDGE_CASES = [  # (rows, d_in, d_out, k)
    pytest.param(0, 4, 3, 2, id="no-rows"),
    pytest.param(5, 0, 3, 2, id="no-inputs"),
    pytest.param(5, 4, 0, 2, id="no-outputs"),
    pytest.param(6, 4, 3, 0, id="no-domains"),
]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("n,d_in,d_out,k", EDGE_CASES)
def test_empty_sizes(seed, device, backend, n, d_in, d_out, k):
    x, grad_out, target, target_bias = random_inputs((n,), d_in, d_out, torch.float32, device)
    ids = rows_ids((n,), k, device) if k else torch.full((n,), -1, device=device)
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=target_bias, bias=True,
                               backend=backend)
    assert_matches(got, explicit(x, grad_out, ids.cpu(), k, target, target_bias), torch.float32)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("large", [False, True], ids=["small-segments", "large-segments"])
def test_float32_gradient_equals_torch_mm(seed, device, backend, large):
    """The gradient a training step would get: torch.mm's to 1e-6 relative, also when large
    segments take at::mm in the CPU binding."""
    n, d_in, d_out, k = (64, 48, 40, 5) if interpreted(backend) else (700, 130, 100, 7)
    x, grad_out, target, _ = random_inputs((n,), d_in, d_out, torch.float32, device)
    grouping = (dict(offsets=torch.tensor([0, n // 2, n // 2 + 9, n], device=device)) if large
                else dict(segment_ids=rows_ids((n,), k, device), num_segments=k))
    grad_weight, _, _ = ops.weight_grad_dots(x, grad_out, target, **grouping, backend=backend)
    want = grad_out.T @ x
    assert float((grad_weight - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_runs_of_one_domain_are_scored_in_place(seed, device, backend, dtype):
    """One id per sequence of RUN_ROWS tokens, the domains interleaved and a padding sequence:
    each run is a piece (no permutation), and the pieces' dots are summed per domain."""
    ids = torch.tensor([2, 0, 2, -1, 0], device=device)  # domains 1 and 3 empty
    x, grad_out, target, target_bias = random_inputs((5, RUN_ROWS), 12, 9, dtype, device)
    assert ops.row_grouping(ids.repeat_interleave(RUN_ROWS), 4).piece_domains is not None
    got = ops.weight_grad_dots(x, grad_out, target, ids, 4, target_bias=target_bias, bias=True,
                               backend=backend)
    flat = ids.cpu().repeat_interleave(RUN_ROWS)
    assert_matches(got, explicit(x, grad_out, flat, 4, target, target_bias), dtype)
    assert float(got[2][1]) == 0.0 and float(got[2][3]) == 0.0


def test_row_grouping_permutes_only_short_interleaved_runs():
    order, offsets, pieces = ops.row_grouping(torch.tensor([0, 0, 2, 2, -1]), 3)  # grouped already
    assert order is None and pieces is None and offsets.tolist() == [0, 2, 2, 4]
    order, offsets, pieces = ops.row_grouping(torch.tensor([2, 0, -1, 0]), 3)  # short runs: one permutation
    assert order.tolist() == [1, 3, 0, 2] and offsets.tolist() == [0, 2, 2, 3] and pieces is None
    runs = torch.tensor([1, 0, 1, 5]).repeat_interleave(RUN_ROWS)  # id 5 >= num_segments: padding
    order, offsets, pieces = ops.row_grouping(runs, 3)
    assert order is None and offsets.tolist() == [i * RUN_ROWS for i in range(5)]
    assert pieces.tolist() == [1, 0, 1, 3]  # 3 = num_segments: in no domain
    assert ops.row_grouping(runs[1:], 3).order is not None  # runs one row short on average


# ---------------------------------------------------------------- random problems
LIMITS = {"interpreted": dict(max_rows=80, max_width=40), "full": dict(max_rows=400, max_width=100)}


@pytest.mark.parametrize("device,backend", PARAMS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_problems_match_the_explicit_gradients(device, backend, data):
    """Property: for any sizes, dtype, ids and bias options the results are those of the
    float64 gradients formed explicitly, and the dots sum to ⟨grad_weight, target⟩ over the
    rows in some domain."""
    limits = LIMITS["interpreted" if interpreted(backend) else "full"]
    n = data.draw(st.integers(0, limits["max_rows"]))
    d_in, d_out = (data.draw(st.integers(0, limits["max_width"])) for _ in range(2))
    k, dtype = data.draw(st.integers(0, 8)), data.draw(st.sampled_from(DTYPES))
    with_bias, with_bias_target = data.draw(st.booleans()), data.draw(st.booleans())
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, grad_out, target, target_bias = random_inputs((n,), d_in, d_out, dtype, device, generator)
    target_bias = target_bias if with_bias_target else None
    ids = rows_ids((n,), k, device, generator) if k else torch.full((n,), -1, device=device)
    got = ops.weight_grad_dots(x, grad_out, target, ids, k, target_bias=target_bias,
                               bias=with_bias, backend=backend)
    assert_matches(got, explicit(x, grad_out, ids.cpu(), k, target, target_bias), dtype, bias=with_bias)


def test_group_rows_is_one_stable_permutation(seed):
    ids = torch.randint(-2, 5, (50,))
    order, offsets = ops.group_rows(ids, 4)  # id 4 is outside [0, 4): grouped with the padding
    assert sorted(order.tolist()) == list(range(50))
    grouped = ids[order]
    for i in range(4):
        piece = order[offsets[i]:offsets[i + 1]]
        assert bool((grouped[offsets[i]:offsets[i + 1]] == i).all())
        assert piece.tolist() == sorted(piece.tolist())  # original order kept
    assert bool(((grouped[offsets[4]:] < 0) | (grouped[offsets[4]:] >= 4)).all())


# ---------------------------------------------------------------- bad input
def good_args():
    return dict(x=torch.randn(6, 4), grad_out=torch.randn(6, 3), target=torch.randn(3, 4),
                segment_ids=torch.tensor([0, 1, 2, 0, -1, 1]), num_segments=3)


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.ones(6, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(grad_out=torch.randn(5, 3)), ValueError, "grad_out has shape"),
    (dict(target=torch.randn(4, 3)), ValueError, "target must have shape (3, 4)"),
    (dict(target_bias=torch.randn(4)), ValueError, "target_bias must have shape (3,), got (4,)"),
    (dict(target_bias=torch.randn(3, dtype=torch.float64)), TypeError,
     "target_bias has dtype torch.float64 but x has dtype torch.float32"),
    (dict(segment_ids=torch.tensor([0, 1, 3, 0, 0, 1])), ValueError, "segment_ids contains 3"),
    (dict(num_segments=None), ValueError, "segment_ids and num_segments must be given together (or offsets)"),
    (dict(offsets=torch.tensor([0, 6])), ValueError,
     "give either offsets or segment_ids with num_segments, not both"),
    (dict(segment_ids=None, num_segments=None, offsets=torch.tensor([0, 4, 2])), ValueError,
     "offsets must be non-decreasing within [0, 6] (the number of rows), got [0, 4, 2]"),
    (dict(segment_ids=None, num_segments=None, offsets=torch.tensor([0, 7])), ValueError,
     "offsets must be non-decreasing within [0, 6]"),
    (dict(segment_ids=None, num_segments=None, offsets=torch.tensor([0.0, 6.0])), TypeError,
     "offsets must be an integer tensor"),
    (dict(segment_ids=None, num_segments=None, offsets=torch.zeros(0, dtype=torch.int64)), ValueError,
     "offsets must be 1-D with num_segments + 1 >= 1 entries"),
])
def test_bad_input_names_the_argument(seed, change, error, message):
    args = good_args()
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        ops.weight_grad_dots(**args)


def good_kernel_args():
    return dict(x=torch.randn(4, 3), grad_out=torch.randn(4, 2), offsets=torch.tensor([0, 1, 3]),
                target=torch.randn(2, 3), target_bias=torch.randn(2), with_bias=True)


BAD_KERNEL_CALLS = [
    pytest.param(dict(grad_out=torch.randn(5, 2)), r"grad_out.shape\[0\] is 5 but must equal x.shape\[0\] \(4\)",
                 id="grad-out-rows"),
    pytest.param(dict(target=torch.randn(3, 3)), r"target.shape\[0\] is 3 but must equal grad_out.shape\[1\] \(2\)",
                 id="target-rows"),
    pytest.param(dict(target=torch.randn(2, 4)), r"target.shape\[1\] is 4 but must equal x.shape\[1\] \(3\)",
                 id="target-columns"),
    pytest.param(dict(target=torch.randn(2, 3, dtype=torch.float64)), "target has dtype .* but x has dtype",
                 id="target-dtype"),
    pytest.param(dict(target_bias=torch.randn(3)), r"target_bias.shape\[0\] is 3 but must equal grad_out.shape\[1\]",
                 id="target-bias-length"),
    pytest.param(dict(offsets=torch.tensor([0, 1], dtype=torch.int32)), "offsets must be int64", id="offsets-int32"),
    pytest.param(dict(offsets=torch.zeros(2, 2, dtype=torch.int64)), "offsets must be 1-D", id="offsets-2d"),
]


def require_kernel(backend):
    if backend == "cpu" and not backends.has_kernel("weight_grad_dots", "CPU"):
        pytest.skip("compiled extension not built")
    if backend == "triton" and not backends.TRITON_INSTALLED:
        pytest.skip("triton not installed")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("change,message", BAD_KERNEL_CALLS)
def test_kernel_ops_check_their_own_arguments(seed, change, message, backend):
    require_kernel(backend)
    args = good_kernel_args()
    kernel_op(backend)(**args)  # the unchanged call runs
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        kernel_op(backend)(**args)


def test_cpu_op_checks_the_offsets_values(seed):
    """The CPU binding reads the offsets (the CUDA one clamps them: reading costs a sync)."""
    require_kernel("cpu")
    args = good_kernel_args()
    args["offsets"] = torch.tensor([0, 3, 1])
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing within \[0, x.shape\[0\]\] = "
                                           r"\[0, 4\], got offsets\[2\] = 1 after 3"):
        kernel_op("cpu")(**args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("change,message", BAD_KERNEL_CALLS)
def test_fake_kernels_check_arguments_while_tracing(seed, change, message, backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_kernel(backend)
    args = good_kernel_args()
    args.update(change)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        kernel_op(backend)(**{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                              for k, v in args.items()})


# ---------------------------------------------------------------- torch.library contracts
def opcheck_cases(device):
    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    offsets = torch.tensor([1, 4, 4, 8], device=device)
    x, g, v, vb = rand(9, 5), rand(9, 4), rand(4, 5), rand(4)
    return [(x, g, offsets, v, vb, True), (x, g, offsets, v, None, False),
            (rand(5, 9).T, g, torch.tensor([0, 2, 4, 6, 8, 9], device=device)[::2], rand(5, 4).T, vb, True),
            (*(t.to(torch.bfloat16) for t in (x, g)), offsets, v.to(torch.bfloat16), None, True),
            (*(t.double() for t in (x, g)), offsets, v.double(), vb.double(), True)]


@pytest.mark.parametrize("device,backend", PARAMS)
def test_opcheck(seed, device, backend):
    for args in opcheck_cases(device):
        torch.library.opcheck(kernel_op(backend).default, args)


def test_traces_under_torch_compile(seed):
    """With offsets and validate_ids=False (no host sync) the op compiles into one graph."""
    def step(x, grad_out, offsets, target):
        grad_weight, _, dots = ops.weight_grad_dots(x, grad_out, target, offsets=offsets,
                                                    validate_ids=False)
        return grad_weight * 2, dots

    args = (torch.randn(10, 6), torch.randn(10, 5), torch.tensor([0, 3, 7, 10]), torch.randn(5, 6))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)
