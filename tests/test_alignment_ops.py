"""The alignment ops on every backend against per-domain gradients formed explicitly."""
import importlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmix.ops as ops
from conftest import HAS_GPU, backends_for, device_backend_params
from fastmix.ops import backends

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Inputs are rounded to the dtype first, so only accumulation error remains: float32
# (or float64) accumulation of O(d) products, relative to Σ|terms|.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def sum_by_domain(values, ids, k):
    """Σ of `values` per domain id in [0, k); padding (negative ids) dropped."""
    keep = ids >= 0
    return torch.zeros(k, dtype=values.dtype).index_add_(0, ids[keep], values[keep])


def as_rows(t):
    """`t` (..., d) as a (rows, d) matrix, also when a size is 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def explicit_domain_dots(x, grad_out, ids, k, target):
    """⟨G_i, target⟩ with G_i = Σ_{n∈i} δ_n x_nᵀ formed explicitly in float64, and the
    scale Σ_{n∈i} |δ_n|ᵀ |target| |x_n| (the sum of |terms|) the error is measured against."""
    x, g, target = as_rows(x).cpu().double(), as_rows(grad_out).cpu().double(), target.cpu().double()
    dots = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        rows = ids == i
        dots[i] = ((g[rows].T @ x[rows]) * target).sum()
    return dots, sum_by_domain(((g.abs() @ target.abs()) * x.abs()).sum(-1), ids, k)


def explicit_rows(a, m, b):
    """r_n = a_n · (m @ b_n) in float64, and its Σ|terms| Σ_{o,i} |a_no m_oi b_ni|."""
    a, m, b = (t.cpu().double() for t in (a, m, b))
    return (a * (b @ m.T)).sum(-1), (a.abs() * (b.abs() @ m.abs().T)).sum(-1)


def explicit_ghost_dots(x, grad_out, target_x, target_grad_out, ids, k):
    """The domain dots with the target Σ_t δ_t x_tᵀ formed explicitly in float64, and the
    scale of the ghost form's rounding: Σ_{n∈i} Σ_t (|x_n|·|x_t|) (|δ_n|·|δ_t|) per domain (a
    computed dot errs relative to the sum of its terms' sizes, not to its own size, which
    cancellation can make tiny)."""
    x, g, tx, tg = (as_rows(t).cpu().double() for t in (x, grad_out, target_x, target_grad_out))
    want, _ = explicit_domain_dots(x, g, ids, k, tg.T @ tx)
    terms = ((x.abs() @ tx.abs().T) * (g.abs() @ tg.abs().T)).sum(-1)
    return want, sum_by_domain(terms, ids, k)


def assert_matches(got, want, scale, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    err = (got.double().cpu() - want).abs()
    bound = TOLERANCE[dtype] * (scale + 1e-12)
    assert bool((err <= bound).all()), f"error {err.tolist()} above {bound.tolist()}"


def rows_ids(shape, k, device, per_sequence=False, generator=None):
    """Random domain ids with padding (-1) mixed in, per sequence or per row. The first is
    a real domain, so a draw is never all padding (unless there are no domains)."""
    ids = torch.randint(-1, k, shape[:1] if per_sequence else shape, generator=generator)
    if ids.numel() and k > 0:
        ids.view(-1)[0] = int(torch.randint(0, k, (), generator=generator))
    return ids.to(device)


def flat_ids(ids, leading_shape):
    return ids.reshape(ids.shape + (1,) * (len(leading_shape) - ids.dim())).expand(leading_shape).reshape(-1).cpu()


def kernel_op(name, backend):
    """The op a backend runs, to call directly: torch.ops.fastmix.<name> for "cpu"/"cuda",
    fastmix::<name>_triton for "triton" (registered when its module is imported)."""
    if backend == "triton":
        importlib.import_module(f"fastmix.ops.triton.{name}")
        return getattr(torch.ops.fastmix, f"{name}_triton")
    return getattr(torch.ops.fastmix, name)


def interpreted(backend):
    return backend == "triton" and backends.triton_interpreted()


SHAPES = [  # (leading shape, d_in, d_out, k)
    ((1,), 1, 1, 1),  # one row, k=1
    ((7,), 5, 3, 1),
    ((33,), 17, 40, 5),
    ((2, 19), 24, 9, 3),  # 3-D input (batch, tokens, width)
    ((70,), 16, 33, 50),  # more domains than fit: many empty
]


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,d_in,d_out,k", SHAPES)
def test_domain_grad_dots(seed, device, backend, dtype, shape, d_in, d_out, k):
    x = torch.randn(*shape, d_in, device=device).to(dtype)
    grad_out = torch.randn(*shape, d_out, device=device).to(dtype)
    target = torch.randn(d_out, d_in, device=device).to(dtype)
    ids = rows_ids(shape, k, device)
    got = ops.domain_grad_dots(x, grad_out, ids, k, target, backend=backend)
    want, scale = explicit_domain_dots(x, grad_out, flat_ids(ids, shape), k, target)
    assert_matches(got, want, scale, dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence-ids", "per-row-ids"])
def test_non_contiguous_inputs_and_ids(seed, device, backend, dtype, per_sequence):
    batch, tokens, d_in, d_out, k = 3, 11, 12, 20, 4
    x = torch.randn(d_in, tokens, batch, device=device).to(dtype).permute(2, 1, 0)
    grad_out = torch.randn(batch, tokens, 2 * d_out, device=device).to(dtype)[..., ::2]
    target = torch.randn(d_in, d_out, device=device).to(dtype).T
    ids = rows_ids((2 * batch, tokens), k, device, per_sequence)[::2]  # every other row
    assert not any(t.is_contiguous() for t in (x, grad_out, target, ids))
    got = ops.domain_grad_dots(x, grad_out, ids, k, target, backend=backend)
    want, scale = explicit_domain_dots(x, grad_out, flat_ids(ids, (batch, tokens)), k, target)
    assert_matches(got, want, scale, dtype)


# Sizes that cross every tile and loop boundary of each kernel more than once, with ragged
# tails: the C++ kernels' 64-row chunks, 6 x 16 register tiles and kDepth = 256 slices of
# q (csrc/kernels/alignment_cpu.cpp), the CUDA kernels' 64-row tiles and 16-deep slices,
# and Triton's autotuned GPU tiles (up to 128 rows, 64 deep). Under the interpreter Triton
# runs fixed 16-wide blocks (fastmix/ops/triton/*.py), which the smaller sizes cross as often.
BILINEAR_CROSSING = {"full": (300, 150, 300, 7), "interpreted": (50, 40, 50, 7)}  # (n, p, q, k)
GHOST_CROSSING = {"full": (300, 150, 96, 96, 5), "interpreted": (50, 40, 40, 36, 5)}  # (n, m, d_in, d_out, k)


def crossing_sizes(sizes, backend):
    return sizes["interpreted" if interpreted(backend) else "full"]


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", ["small", "crossing"])
def test_rowwise_bilinear_rows_and_segments(seed, device, backend, dtype, size):
    n, p, q, k = (45, 21, 18, 6) if size == "small" else crossing_sizes(BILINEAR_CROSSING, backend)
    a, b = torch.randn(n, p, device=device).to(dtype), torch.randn(n, q, device=device).to(dtype)
    m = torch.randn(p, q, device=device).to(dtype)
    want_rows, scale_rows = explicit_rows(a, m, b)
    assert_matches(ops.rowwise_bilinear(a, m, b, backend=backend), want_rows, scale_rows, dtype)

    ids = rows_ids((n,), k, device)
    got = ops.rowwise_bilinear(a, m, b, ids, k, backend=backend)
    assert_matches(got, sum_by_domain(want_rows, ids.cpu(), k), sum_by_domain(scale_rows, ids.cpu(), k), dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ghost_dots_crosses_every_tile_boundary(seed, device, backend, dtype):
    """Called directly: at these sizes domain_grad_dots_ghost would form the target instead."""
    n, m, d_in, d_out, k = crossing_sizes(GHOST_CROSSING, backend)
    x, grad_out = torch.randn(n, d_in, device=device).to(dtype), torch.randn(n, d_out, device=device).to(dtype)
    tx, tg = torch.randn(m, d_in, device=device).to(dtype), torch.randn(m, d_out, device=device).to(dtype)
    ids = rows_ids((n,), k, device)
    got = kernel_op("ghost_dots", backend)(x, grad_out, tx, tg, ids, k)
    assert_matches(got, *explicit_ghost_dots(x, grad_out, tx, tg, ids.cpu(), k), dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_rows", [3, 40], ids=["ghost-form", "gemm-form"])
def test_domain_grad_dots_ghost(seed, device, backend, dtype, target_rows):
    shape, d_in, d_out, k = (2, 13), 24, 20, 3
    x = torch.randn(*shape, d_in, device=device).to(dtype)
    grad_out = torch.randn(*shape, d_out, device=device).to(dtype)
    target_x = torch.randn(target_rows, d_in, device=device).to(dtype)
    target_grad_out = torch.randn(target_rows, d_out, device=device).to(dtype)
    assert ops.alignment.ghost_is_cheaper(shape[0] * shape[1], target_rows, d_in, d_out) == (target_rows == 3)
    ids = rows_ids(shape, k, device)
    got = ops.domain_grad_dots_ghost(x, grad_out, ids, k, target_x, target_grad_out, backend=backend)
    want, scale = explicit_ghost_dots(x, grad_out, target_x, target_grad_out, flat_ids(ids, shape), k)
    assert_matches(got, want, scale, dtype)


GHOST_EDGE_CASES = [  # (leading shape, target rows, k, one id per sequence)
    pytest.param((1,), 1, 1, False, id="one-row-one-domain"),
    pytest.param((4,), 3, 10, False, id="empty-domains"),
    pytest.param((0,), 3, 2, False, id="no-rows"),
    pytest.param((10,), 0, 3, False, id="no-target-rows"),
    pytest.param((3, 7), 4, 3, True, id="per-sequence-ids"),
]


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@pytest.mark.parametrize("shape,target_rows,k,per_sequence", GHOST_EDGE_CASES)
def test_ghost_form_edge_cases(seed, device, backend, shape, target_rows, k, per_sequence):
    """Empty domains and empty inputs give exact zeros (their scale is 0)."""
    d_in, d_out = 16, 12
    assert ops.alignment.ghost_is_cheaper(math.prod(shape), target_rows, d_in, d_out)
    x, grad_out = torch.randn(*shape, d_in, device=device), torch.randn(*shape, d_out, device=device)
    tx, tg = torch.randn(target_rows, d_in, device=device), torch.randn(target_rows, d_out, device=device)
    ids = rows_ids(shape, k, device, per_sequence)
    got = ops.domain_grad_dots_ghost(x, grad_out, ids, k, tx, tg, backend=backend)
    assert_matches(got, *explicit_ghost_dots(x, grad_out, tx, tg, flat_ids(ids, shape), k), torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ghost_form_non_contiguous_inputs(seed, device, backend, dtype):
    n, m, d_in, d_out, k = 20, 3, 16, 12, 3
    assert ops.alignment.ghost_is_cheaper(n, m, d_in, d_out)
    x = torch.randn(n, d_in, device=device).to(dtype)
    grad_out = torch.randn(n, 2 * d_out, device=device).to(dtype)[:, ::2]
    tx = torch.randn(d_in, m, device=device).to(dtype).T
    tg = torch.randn(m, d_out, device=device).to(dtype)
    ids = rows_ids((2 * n,), k, device)[::2]
    assert not any(t.is_contiguous() for t in (grad_out, tx, ids))
    got = ops.domain_grad_dots_ghost(x, grad_out, ids, k, tx, tg, backend=backend)
    assert_matches(got, *explicit_ghost_dots(x, grad_out, tx, tg, ids.cpu(), k), dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
def test_zero_width_gives_zeros(seed, device, backend):
    x, grad_out = torch.randn(5, 0, device=device), torch.randn(5, 3, device=device)
    ids = torch.tensor([0, 1, 2, 0, -1], device=device)
    got = ops.domain_grad_dots(x, grad_out, ids, 3, torch.randn(3, 0, device=device), backend=backend)
    assert got.shape == (3,) and bool((got == 0).all())


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
def test_no_rows_gives_zeros(seed, device, backend):
    x, grad_out = torch.randn(0, 4, device=device), torch.randn(0, 3, device=device)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    got = ops.domain_grad_dots(x, grad_out, ids, 5, torch.randn(3, 4, device=device), backend=backend)
    assert got.shape == (5,) and bool((got == 0).all())


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear")
                         + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_no_segments_gives_an_empty_result(seed, device, backend):
    """num_segments = 0: every row is padding; the result is empty, not an index error."""
    a = torch.randn(3, 4, device=device)
    ids = torch.full((3,), -1, device=device)
    got = ops.rowwise_bilinear(a, torch.randn(4, 4, device=device), a, ids, 0, backend=backend)
    assert got.shape == (0,)
    got = ops.domain_grad_dots_ghost(a, a, ids, 0, a[:1], a[:1], backend=backend)
    assert got.shape == (0,)


# ---------------------------------------------------------------- random problems
# The interpreter runs Triton a block at a time in Python: smaller problems keep it quick.
PROBLEM_LIMITS = {"interpreted": dict(max_rows=200, max_width=64),
                  "full": dict(max_rows=300, max_width=128)}


@st.composite
def alignment_problems(draw, max_rows, max_width):
    """(leading shape, d_in, d_out, k, ids per sequence, dtype, seed), empty sizes included."""
    leading = draw(st.one_of(st.tuples(st.integers(0, max_rows)),
                             st.tuples(st.integers(0, 8), st.integers(0, max_rows // 8))))
    per_sequence = len(leading) == 2 and draw(st.booleans())
    return (leading, draw(st.integers(0, max_width)), draw(st.integers(0, max_width)),
            draw(st.integers(0, 8)), per_sequence, draw(st.sampled_from(DTYPES)),
            draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_problems_match_the_explicit_gradients(device, backend, data):
    """Property: for any sizes, dtype and ids the per-row and per-domain results are those
    of the float64 gradients formed explicitly."""
    limits = PROBLEM_LIMITS["interpreted" if interpreted(backend) else "full"]
    leading, d_in, d_out, k, per_sequence, dtype, seed = data.draw(alignment_problems(**limits))
    generator = torch.Generator().manual_seed(seed)
    x, grad_out, target = (torch.randn(*shape, generator=generator).to(dtype).to(device)
                           for shape in ((*leading, d_in), (*leading, d_out), (d_out, d_in)))
    ids = rows_ids(leading, k, device, per_sequence, generator)
    got = ops.domain_grad_dots(x, grad_out, ids, k, target, backend=backend)
    assert_matches(got, *explicit_domain_dots(x, grad_out, flat_ids(ids, leading), k, target), dtype)
    rows = ops.rowwise_bilinear(grad_out, target, x, backend=backend)
    assert_matches(rows, *explicit_rows(as_rows(grad_out), target, as_rows(x)), dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_ghost_problems_match_the_explicit_gradients(device, backend, data):
    """Property: the ghost kernel, called directly, gives the domain dots of the formed target."""
    limits = PROBLEM_LIMITS["interpreted" if interpreted(backend) else "full"]
    n = data.draw(st.integers(0, limits["max_rows"]))
    m = data.draw(st.integers(0, 40))
    d_in, d_out = (data.draw(st.integers(0, limits["max_width"] // 2)) for _ in range(2))
    k, dtype = data.draw(st.integers(0, 8)), data.draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, grad_out, tx, tg = (torch.randn(rows, width, generator=generator).to(dtype).to(device)
                           for rows, width in ((n, d_in), (n, d_out), (m, d_in), (m, d_out)))
    ids = rows_ids((n,), k, device, generator=generator)
    got = kernel_op("ghost_dots", backend)(x, grad_out, tx, tg, ids, k)
    assert_matches(got, *explicit_ghost_dots(x, grad_out, tx, tg, ids.cpu(), k), dtype)


# ---------------------------------------------------------------- bad input
def good_args():
    return dict(x=torch.randn(6, 4), grad_out=torch.randn(6, 3), segment_ids=torch.tensor([0, 1, 2, 0, -1, 1]),
                num_segments=3, target=torch.randn(3, 4))


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.ones(6, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(x=torch.randn(6, 4).numpy()), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dim (..., d), got a 0-dim tensor"),
    (dict(x=torch.tensor(1.0), grad_out=torch.randn(3), target=torch.randn(3, 1)), ValueError,
     "x must have at least 1 dim (..., d), got a 0-dim tensor"),
    (dict(grad_out=torch.randn(6, 3, dtype=torch.float64)), TypeError, "grad_out has dtype torch.float64"),
    (dict(grad_out=torch.randn(5, 3)), ValueError, "grad_out has shape"),
    (dict(target=torch.randn(4, 3)), ValueError, "target must have shape (3, 4)"),
    (dict(target=torch.randn(3, 4, dtype=torch.float64)), TypeError,
     "target has dtype torch.float64 but x has dtype torch.float32"),
    (dict(target=[[1.0]]), TypeError, "target must be a torch.Tensor"),
    (dict(segment_ids=[0, 1, 2, 0, -1, 1]), TypeError, "segment_ids must be a torch.Tensor"),
    (dict(segment_ids=torch.tensor([0, 1, 3, 0, 0, 1])), ValueError, "segment_ids contains 3"),
    (dict(segment_ids=torch.zeros(6)), TypeError, "segment_ids must be an integer tensor"),
    (dict(segment_ids=torch.zeros(5, dtype=torch.int64)), ValueError, "segment_ids must have shape"),
    (dict(num_segments=-1), ValueError, "num_segments must be an int >= 0"),
    (dict(num_segments=2.0), ValueError, "num_segments must be an int"),
    (dict(num_segments=True), ValueError, "num_segments must be an int >= 0 (a Python int), got True"),
    (dict(num_segments=2**62), ValueError, f"num_segments is {2**62}, more than the"),
])
def test_bad_input_names_the_argument(seed, change, error, message):
    args = good_args()
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        ops.domain_grad_dots(**args)


@pytest.mark.parametrize("call,message", [
    (lambda a, ids: ops.rowwise_bilinear(a, torch.randn(3, 4), a), "m must have shape (4, 4), got (3, 4)"),
    (lambda a, ids: ops.rowwise_bilinear(a, torch.randn(4, 4), a, ids),
     "segment_ids and num_segments must be given together"),
    (lambda a, ids: ops.rowwise_bilinear(a, torch.randn(4, 4), a, None, 3),
     "segment_ids and num_segments must be given together"),
    (lambda a, ids: ops.domain_grad_dots_ghost(a, a, ids, 3, torch.randn(2, 5), torch.randn(2, 4)),
     "target_x (..., 5) and target_grad_out (..., 4) must end in x's d_in=4 and grad_out's d_out=4"),
    (lambda a, ids: ops.domain_grad_dots_ghost(a, a, ids, 3, torch.randn(2, 4), torch.randn(3, 4)),
     "target_grad_out has shape (3, 4); its leading dims must match target_x's (2,)"),
    (lambda a, ids: ops.rowwise_bilinear(torch.tensor(1.0), torch.randn(1, 1), torch.randn(1)),
     "a must have at least 1 dim (..., d), got a 0-dim tensor"),
    (lambda a, ids: ops.domain_grad_dots_ghost(torch.tensor(1.0), a, ids, 3, a, a),
     "x must have at least 1 dim (..., d), got a 0-dim tensor"),
])
def test_bad_input_to_the_other_ops_names_the_argument(seed, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, -1, 1]))


@pytest.mark.parametrize("op", ["rowwise_bilinear", "domain_grad_dots_ghost"])
def test_huge_num_segments_names_the_argument(seed, op):
    a, ids = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, -1, 1])
    call = {"rowwise_bilinear": lambda: ops.rowwise_bilinear(a, torch.randn(4, 4), a, ids, 2**62),
            "domain_grad_dots_ghost": lambda: ops.domain_grad_dots_ghost(a, a, ids, 2**62, a[:2], a[:2])}[op]
    with pytest.raises(ValueError, match="num_segments is 4611686018427387904"):
        call()


def test_bad_backend_names_the_backend(seed):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.domain_grad_dots(**good_args(), backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        ops.domain_grad_dots(**good_args(), backend="cuda")


def require_kernel(name, backend):
    """Skips unless `backend` ("cpu" or "triton") has a kernel for the op here."""
    if backend == "cpu" and not backends.has_kernel(name, "CPU"):
        pytest.skip("compiled extension not built")
    if backend == "triton" and not backends.TRITON_INSTALLED:
        pytest.skip("triton not installed")


def good_kernel_args(name):
    """Arguments the op accepts, by name (as its schema has them)."""
    ids = torch.zeros(4, dtype=torch.int64)
    if name == "rowwise_bilinear":
        return dict(a=torch.randn(4, 3), m=torch.randn(3, 2), b=torch.randn(4, 2), segment_ids=ids, num_segments=2)
    return dict(x=torch.randn(4, 3), grad_out=torch.randn(4, 2), target_x=torch.randn(2, 3),
                target_grad_out=torch.randn(2, 2), segment_ids=ids, num_segments=2)


# Calls of the ops themselves (torch.ops.fastmix.* and their Triton twins are public too)
# that must fail naming the argument, eagerly and while tracing: (op, changed arguments, message).
BAD_KERNEL_CALLS = [
    pytest.param("rowwise_bilinear", dict(b=torch.randn(4, 5), segment_ids=None, num_segments=0),
                 r"b.shape\[1\] is 5 but must equal m.shape\[1\] \(2\)", id="b-too-wide"),
    pytest.param("rowwise_bilinear", dict(m=torch.randn(2, 2)),
                 r"m.shape\[0\] is 2 but must equal a.shape\[1\] \(3\)", id="m-too-short"),
    pytest.param("rowwise_bilinear", dict(m=torch.randn(3, 2, dtype=torch.float64)),
                 "m has dtype .* but a has dtype", id="m-dtype"),  # torch.float64 in Python, Double in C++
    pytest.param("rowwise_bilinear", dict(segment_ids=torch.zeros(3, dtype=torch.int64)),
                 r"segment_ids must have shape \(4,\)", id="ids-shape"),
    pytest.param("rowwise_bilinear", dict(segment_ids=torch.zeros(4, dtype=torch.int32)),
                 "segment_ids must be int64", id="ids-int32"),
    pytest.param("rowwise_bilinear", dict(num_segments=-1),
                 "num_segments must be >= 0", id="negative-num-segments"),
    pytest.param("ghost_dots", dict(target_x=torch.randn(2, 5)),
                 r"target_x.shape\[1\] is 5 but must equal x.shape\[1\] \(3\)", id="target-x-too-wide"),
    pytest.param("ghost_dots", dict(target_grad_out=torch.randn(3, 2)),
                 r"target_grad_out.shape\[0\] is 3 but must equal target_x.shape\[0\]", id="target-rows"),
    pytest.param("ghost_dots", dict(grad_out=torch.randn(5, 2)),
                 r"grad_out.shape\[0\] is 5 but must equal x.shape\[0\]", id="grad-out-rows"),
    pytest.param("ghost_dots", dict(segment_ids=torch.zeros(4, dtype=torch.int32)),
                 "segment_ids must be int64", id="ghost-ids-int32"),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name,change,message", BAD_KERNEL_CALLS)
def test_kernel_ops_check_their_own_arguments(seed, name, change, message, backend):
    """Called directly, a kernel op rejects a bad call instead of reading out of bounds."""
    require_kernel(name, backend)
    args = good_kernel_args(name)
    kernel_op(name, backend)(**args)  # the unchanged call runs
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        kernel_op(name, backend)(**args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name,change,message", BAD_KERNEL_CALLS)
def test_fake_kernels_check_arguments_while_tracing(seed, name, change, message, backend):
    """Under torch.compile the fake kernel runs instead of the op: a bad call fails there,
    naming the argument, rather than tracing a wrong shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_kernel(name, backend)
    op = kernel_op(name, backend)
    args = good_kernel_args(name)
    args.update(change)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        op(**{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_the_inputs_gpu_not_the_current_one(seed, backend):
    """Triton launches on the current device unless told otherwise: inputs on cuda:1 while
    cuda:0 is current must still run on cuda:1."""
    if backend not in backends_for("rowwise_bilinear", "cuda"):
        pytest.skip(f"{backend} not available")
    args = good_args()
    on_second = {k: (v.to("cuda:1") if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with torch.cuda.device(0):
        got = ops.domain_grad_dots(**on_second, backend=backend)
    want = ops.domain_grad_dots(**args, backend="reference")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- torch.library contracts
def opcheck_cases(device):
    """Arguments per op: float32, with a transposed matrix and strided ids (non-contiguous),
    bfloat16 and float64."""
    def rand(*shape):
        return torch.randn(*shape, device=device)

    def cast(dtype, *tensors):
        return tuple(t.to(dtype) for t in tensors)

    a, m, b, tx, tg = rand(9, 5), rand(5, 4), rand(9, 4), rand(2, 4), rand(2, 5)
    ids = torch.randint(-1, 3, (9,), device=device)
    strided_ids = torch.randint(-1, 3, (18,), device=device)[::2]
    m_t, tx_t = rand(4, 5).T, rand(4, 2).T
    return {
        "rowwise_bilinear": [(a, m, b, ids, 3), (a, m, b, None, 0), (a, m_t, b, strided_ids, 3),
                             (*cast(torch.bfloat16, a, m, b), ids, 3),
                             (*cast(torch.float64, a, m, b), None, 0)],
        "ghost_dots": [(b, a, tx, tg, ids, 3), (b, a, tx_t, tg, strided_ids, 3),
                       (*cast(torch.bfloat16, b, a, tx, tg), ids, 3),
                       (*cast(torch.float64, b, a, tx, tg), ids, 3)],
    }


def op_device_backend_params(*names):
    """(op, device, backend) for every backend of each op, ids prefixed by the op's name."""
    return [pytest.param(name, *param.values, id=f"{name}-{param.id}", marks=param.marks)
            for name in names for param in device_backend_params(name)]


@pytest.mark.parametrize("name,device,backend", op_device_backend_params("rowwise_bilinear", "ghost_dots"))
def test_opcheck(seed, name, device, backend):
    op = kernel_op(name, backend)
    for args in opcheck_cases(device)[name]:
        torch.library.opcheck(op.default, args)


def test_traces_under_torch_compile(seed):
    """With validate_ids=False (no host sync) the op compiles into one graph."""
    def scores(x, grad_out, ids, target):
        return ops.domain_grad_dots(x, grad_out, ids, 4, target, validate_ids=False) * 2

    args = (torch.randn(10, 6), torch.randn(10, 5), torch.randint(0, 4, (10,)), torch.randn(5, 6))
    compiled = torch.compile(scores, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), scores(*args))


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only fallback")
def test_missing_extension_falls_back_with_one_warning(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, warnings; sys.modules['fastmix._C'] = None\n"  # makes `import fastmix._C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fastmix.ops as ops\n"
        "    from fastmix.ops import backends\n"
        "    out = ops.domain_grad_dots(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2, torch.randn(2, 3))\n"
        "    out = ops.domain_grad_dots(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2, torch.randn(2, 3))\n"
        "ours = [w for w in caught if issubclass(w.category, backends.BackendWarning)]\n"
        "assert len(ours) == 1, ours\n"
        "assert 'fastmix._C could not be loaded' in str(ours[0].message)\n"
        "assert backends.choose('rowwise_bilinear', 'cpu') == 'reference'\n"
        "print('ok', out.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok torch.Size([2])" in result.stdout
