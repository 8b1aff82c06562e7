"""The alignment ops on every backend against per-domain gradients formed explicitly."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmix.ops as ops
from conftest import HAS_GPU, backends_for, device_backend_params
from fastmix.ops import _backends, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Inputs are rounded to the dtype first, so only accumulation error remains: float32
# (or float64) accumulation of O(d) products, relative to Σ|terms|.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def explicit_domain_dots(x, grad_out, ids, k, target):
    """⟨G_i, target⟩ with G_i = Σ_{n∈i} δ_n x_nᵀ formed explicitly in float64, and the
    scale Σ_{n∈i} |δ_n|ᵀ |target| |x_n| (the sum of |terms|) the error is measured against."""
    x = x.reshape(-1, x.shape[-1]).double()
    g = grad_out.reshape(-1, grad_out.shape[-1]).double()
    target = target.double()
    dots, scale = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        rows = ids == i
        grad_i = g[rows].T @ x[rows]
        dots[i] = (grad_i * target).sum()
        scale[i] = ((g[rows].abs() @ target.abs()) * x[rows].abs()).sum()
    return dots, scale


def assert_matches(got, want, scale, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = (got.double().cpu() - want).abs()
    bound = TOLERANCE[dtype] * (scale + 1e-12)
    assert bool((err <= bound).all()), f"error {err.tolist()} above {bound.tolist()}"


def rows_ids(shape, k, device, per_sequence=False):
    """Random domain ids with padding (-1) mixed in; per sequence or per row."""
    ids_shape = shape[:1] if per_sequence else shape
    return torch.randint(-1, k, ids_shape, device=device)


def flat_ids(ids, leading_shape):
    return ids.reshape(ids.shape + (1,) * (len(leading_shape) - ids.dim())).expand(leading_shape).reshape(-1).cpu()


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
    want, scale = explicit_domain_dots(x.cpu(), grad_out.cpu(), flat_ids(ids, shape), k, target.cpu())
    assert_matches(got, want, scale, dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
def test_per_sequence_ids_and_non_contiguous(seed, device, backend):
    batch, tokens, d_in, d_out, k = 3, 11, 12, 20, 4
    x = torch.randn(d_in, tokens, batch, device=device).permute(2, 1, 0)  # non-contiguous
    grad_out = torch.randn(batch, tokens, 2 * d_out, device=device)[..., ::2]  # strided
    target = torch.randn(d_in, d_out, device=device).T  # transposed view
    ids = rows_ids((batch, tokens), k, device, per_sequence=True)
    assert not (x.is_contiguous() or grad_out.is_contiguous() or target.is_contiguous())
    got = ops.domain_grad_dots(x, grad_out, ids, k, target, backend=backend)
    want, scale = explicit_domain_dots(x.cpu(), grad_out.cpu(), flat_ids(ids, (batch, tokens)), k, target.cpu())
    assert_matches(got, want, scale, torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowwise_bilinear_rows_and_segments(seed, device, backend, dtype):
    n, p, q, k = 45, 21, 18, 6
    a, b = torch.randn(n, p, device=device).to(dtype), torch.randn(n, q, device=device).to(dtype)
    m = torch.randn(p, q, device=device).to(dtype)
    want_rows = (a.double() * (b.double() @ m.double().T)).sum(-1).cpu()
    scale_rows = (a.double().abs() * (b.double().abs() @ m.double().abs().T)).sum(-1).cpu()
    assert_matches(ops.rowwise_bilinear(a, m, b, backend=backend), want_rows, scale_rows, dtype)

    ids = rows_ids((n,), k, device)
    keep = (ids >= 0).cpu()
    want = torch.zeros(k, dtype=torch.float64).index_add_(0, ids.cpu()[keep], want_rows[keep])
    scale = torch.zeros(k, dtype=torch.float64).index_add_(0, ids.cpu()[keep], scale_rows[keep])
    got = ops.rowwise_bilinear(a, m, b, ids, k, backend=backend)
    assert_matches(got, want, scale, dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("ghost_dots"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_rows", [3, 40], ids=["ghost-form", "gemm-form"])
def test_domain_grad_dots_ghost(seed, device, backend, dtype, target_rows):
    shape, d_in, d_out, k = (2, 13), 24, 20, 3
    x = torch.randn(*shape, d_in, device=device).to(dtype)
    grad_out = torch.randn(*shape, d_out, device=device).to(dtype)
    target_x = torch.randn(target_rows, d_in, device=device).to(dtype)
    target_grad_out = torch.randn(target_rows, d_out, device=device).to(dtype)
    n = shape[0] * shape[1]
    assert ops.alignment.ghost_is_cheaper(n, target_rows, d_in, d_out) == (target_rows == 3)
    ids = rows_ids(shape, k, device)
    got = ops.domain_grad_dots_ghost(x, grad_out, ids, k, target_x, target_grad_out, backend=backend)
    target = target_grad_out.cpu().double().T @ target_x.cpu().double()
    want, _ = explicit_domain_dots(x.cpu(), grad_out.cpu(), flat_ids(ids, shape), k, target)
    # The scale of the ghost form: Σ_n Σ_t |x_n·x_t| |δ_n·δ_t|, per domain.
    terms = ((x.cpu().double().reshape(n, -1) @ target_x.cpu().double().T).abs()
             * (grad_out.cpu().double().reshape(n, -1) @ target_grad_out.cpu().double().T).abs()).sum(-1)
    ids_flat = flat_ids(ids, shape)
    scale = torch.zeros(k, dtype=torch.float64).index_add_(0, ids_flat.clamp(min=0), torch.where(ids_flat >= 0, terms, 0))
    assert_matches(got, want, scale, dtype)


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
def test_zero_width_gives_zeros(device, backend):
    x, grad_out = torch.randn(5, 0, device=device), torch.randn(5, 3, device=device)
    ids = torch.tensor([0, 1, 2, 0, -1], device=device)
    got = ops.domain_grad_dots(x, grad_out, ids, 3, torch.randn(3, 0, device=device), backend=backend)
    assert got.shape == (3,) and bool((got == 0).all())


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear"))
def test_no_rows_gives_zeros(device, backend):
    x, grad_out = torch.randn(0, 4, device=device), torch.randn(0, 3, device=device)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    got = ops.domain_grad_dots(x, grad_out, ids, 5, torch.randn(3, 4, device=device), backend=backend)
    assert got.shape == (5,) and bool((got == 0).all())


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear")
                         + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_no_segments_gives_an_empty_result(device, backend):
    """num_segments = 0: every row is padding; the result is empty, not an index error."""
    a = torch.randn(3, 4, device=device)
    ids = torch.full((3,), -1, device=device)
    got = ops.rowwise_bilinear(a, torch.randn(4, 4, device=device), a, ids, 0, backend=backend)
    assert got.shape == (0,)
    got = ops.domain_grad_dots_ghost(a, a, ids, 0, a[:1], a[:1], backend=backend)
    assert got.shape == (0,)


@given(n=st.integers(1, 40), p=st.integers(1, 20), q=st.integers(1, 20), k=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_segment_sums_add_up_to_row_results(n, p, q, k, seed):
    """Property: segment sums are the per-row results summed by id, padding dropped."""
    generator = torch.Generator().manual_seed(seed)
    a, m, b = (torch.randn(s, generator=generator) for s in ((n, p), (p, q), (n, q)))
    ids = torch.randint(-1, k, (n,), generator=generator)
    rows = ops.rowwise_bilinear(a, m, b)
    segments = ops.rowwise_bilinear(a, m, b, ids, k)
    want = reference.segment_sum(rows.double(), ids, k)
    torch.testing.assert_close(segments.double(), want, rtol=1e-5, atol=1e-5 * float(rows.abs().sum()))


# ---------------------------------------------------------------- bad input
def good_args():
    return dict(x=torch.randn(6, 4), grad_out=torch.randn(6, 3), segment_ids=torch.tensor([0, 1, 2, 0, -1, 1]),
                num_segments=3, target=torch.randn(3, 4))


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.ones(6, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(grad_out=torch.randn(6, 3, dtype=torch.float64)), TypeError, "grad_out has dtype torch.float64"),
    (dict(grad_out=torch.randn(5, 3)), ValueError, "grad_out has shape"),
    (dict(target=torch.randn(4, 3)), ValueError, "target must have shape (3, 4)"),
    (dict(target=[[1.0]]), TypeError, "target must be a torch.Tensor"),
    (dict(segment_ids=torch.tensor([0, 1, 3, 0, 0, 1])), ValueError, "segment_ids contains 3"),
    (dict(segment_ids=torch.zeros(6)), TypeError, "segment_ids must be an integer tensor"),
    (dict(segment_ids=torch.zeros(5, dtype=torch.int64)), ValueError, "segment_ids must have shape"),
    (dict(num_segments=-1), ValueError, "num_segments must be an int >= 0"),
    (dict(num_segments=2.0), ValueError, "num_segments must be an int"),
])
def test_bad_input_names_the_argument(change, error, message):
    args = good_args()
    args.update(change)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.domain_grad_dots(**args)


def test_bad_backend_names_the_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.domain_grad_dots(**good_args(), backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        ops.domain_grad_dots(**good_args(), backend="cuda")


@pytest.mark.skipif(not backends_for("rowwise_bilinear", "cpu"), reason="compiled extension not built")
def test_compiled_op_checks_its_own_arguments():
    """torch.ops.fastmix.* are public too: they reject bad shapes naming the argument."""
    with pytest.raises(RuntimeError, match=r"b.shape\[1\] is 5 but must equal m.shape\[1\]"):
        torch.ops.fastmix.rowwise_bilinear(torch.randn(4, 3), torch.randn(3, 2), torch.randn(4, 5), None, 0)
    with pytest.raises(RuntimeError, match="segment_ids must be int64"):
        torch.ops.fastmix.rowwise_bilinear(torch.randn(4, 3), torch.randn(3, 2), torch.randn(4, 2),
                                           torch.zeros(4, dtype=torch.int32), 2)


def _fake_ops(name):
    """The compiled op and its Triton twin, where each exists: they share one fake."""
    import importlib

    found = [getattr(torch.ops.fastmix, name)] if _backends.has_kernel(name, "CPU") else []
    if _backends.TRITON_INSTALLED:
        found.append(getattr(importlib.import_module(f"fastmix.ops.triton.{name}"), f"{name}_triton"))
    return found


@pytest.mark.parametrize("name,args,message", [
    ("rowwise_bilinear", lambda: (torch.randn(4, 3), torch.randn(3, 2), torch.randn(4, 5), None, 0),
     r"b.shape\[1\] is 5 but must equal m.shape\[1\] \(2\)"),
    ("rowwise_bilinear", lambda: (torch.randn(4, 3), torch.randn(3, 2).double(), torch.randn(4, 2), None, 0),
     "m has dtype torch.float64 but a has dtype torch.float32"),
    ("rowwise_bilinear", lambda: (torch.randn(4, 3), torch.randn(3, 2), torch.randn(4, 2), torch.zeros(3, dtype=torch.long), 2),
     r"segment_ids must have shape \(4,\)"),
    ("ghost_dots", lambda: (torch.randn(4, 3), torch.randn(4, 2), torch.randn(2, 5), torch.randn(2, 2),
                            torch.zeros(4, dtype=torch.long), 2), r"target_x.shape\[1\] is 5"),
    ("ghost_dots", lambda: (torch.randn(4, 3), torch.randn(4, 2), torch.randn(2, 3), torch.randn(2, 2),
                            torch.zeros(4, dtype=torch.int32), 2), "segment_ids must be int64"),
])
def test_fake_kernels_check_arguments_while_tracing(name, args, message):
    """Under torch.compile the fake kernel runs instead of the op: a bad call fails there,
    naming the argument, rather than tracing a wrong shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops_to_check = _fake_ops(name)
    if not ops_to_check:
        pytest.skip("neither the compiled op nor Triton is available")
    with FakeTensorMode():
        for op in ops_to_check:
            with pytest.raises(RuntimeError, match=message):
                op(*args())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_the_inputs_gpu_not_the_current_one(backend):
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
    a, m, b = torch.randn(9, 5, device=device), torch.randn(5, 4, device=device), torch.randn(9, 4, device=device)
    ids = torch.randint(-1, 3, (9,), device=device)
    tx, tg = torch.randn(2, 4, device=device), torch.randn(2, 5, device=device)
    return {
        "rowwise_bilinear": [(a, m, b, ids, 3), (a, m, b, None, 0)],
        "ghost_dots": [(b, a, tx, tg, ids, 3)],
    }


@pytest.mark.parametrize("device,backend", device_backend_params("rowwise_bilinear") + device_backend_params("ghost_dots"))
def test_opcheck(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    for op, cases in opcheck_cases(device).items():
        if backend not in backends_for(op, device):
            continue
        for args in cases:
            torch.library.opcheck(getattr(torch.ops.fastmix, op + suffix).default, args)


def test_traces_under_torch_compile():
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
        "    from fastmix.ops import _backends\n"
        "    out = ops.domain_grad_dots(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2, torch.randn(2, 3))\n"
        "    out = ops.domain_grad_dots(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2, torch.randn(2, 3))\n"
        "ours = [w for w in caught if issubclass(w.category, _backends.BackendWarning)]\n"
        "assert len(ours) == 1, ours\n"
        "assert 'fastmix._C could not be loaded' in str(ours[0].message)\n"
        "assert _backends.choose('rowwise_bilinear', 'cpu') == 'reference'\n"
        "print('ok', out.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok torch.Size([2])" in result.stdout
