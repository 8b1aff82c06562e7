"""batched_svd against numpy float64 on fresh random inputs, every backend here."""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_GPU, random_matrix
from fastmix.ops import backends, batched_svd
from fastmix.ops.linalg import FAST_PATH_NOTE, svd_backend

COMPILED_CPU = backends.has_kernel("batched_svd", "CPU")


def device_backends():
    params = [pytest.param("cpu", "reference", id="cpu-reference")]
    params.append(pytest.param("cpu", "cpu", id="cpu-cpu",
                               marks=pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")))
    params.append(pytest.param("cuda", "cuda", id="cuda-cuda",
                               marks=pytest.mark.skipif(not HAS_GPU, reason="no GPU")))
    return params


def make(kind, shape, dtype, device, generator):
    return random_matrix(kind, shape, generator).to(dtype).to(device)


def check_svd(a, u, s, vh, tol):
    """Reconstruction, orthonormality and singular values vs numpy float64."""
    *batch, m, n = a.shape
    p = min(m, n)
    assert u.shape == (*batch, m, p) and s.shape == (*batch, p) and vh.shape == (*batch, p, n)
    a64 = a.detach().cpu().double().numpy()
    u64, s64, vh64 = (t.detach().cpu().double().numpy() for t in (u, s, vh))
    recon = (u64 * s64[..., None, :]) @ vh64
    scale = np.linalg.norm(a64, axis=(-2, -1))
    err = np.linalg.norm(recon - a64, axis=(-2, -1))
    assert np.all(err <= tol * np.maximum(scale, np.finfo(float).tiny)), (err, scale)
    eye = np.eye(p)
    assert np.abs(np.swapaxes(u64, -1, -2) @ u64 - eye).max() <= tol
    assert np.abs(vh64 @ np.swapaxes(vh64, -1, -2) - eye).max() <= tol
    assert np.all(np.diff(s64, axis=-1) <= 0) and np.all(s64 >= 0)
    want = np.linalg.svd(a64, compute_uv=False)
    top = np.maximum(want[..., :1], np.finfo(float).tiny)
    assert np.all(np.abs(s64 - want) <= tol * top)


TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
SHAPES = [(1, 1, 1), (3, 1, 5), (3, 5, 1), (2, 8, 8), (2, 3, 17, 5), (2, 5, 17), (2, 33, 33),
          (2, 64, 64), (1, 40, 70), (1, 70, 40)]
KINDS = ["gaussian", "rank_deficient", "duplicated_rows", "graded", "zeros"]


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_numpy(seed, device, backend, dtype, shape, kind):
    if backend == "reference" and kind != "gaussian":
        pytest.skip("the reference is torch.linalg.svd itself")
    g = torch.Generator().manual_seed(seed)
    a = make(kind, shape, dtype, device, g)
    u, s, vh = batched_svd(a, backend=backend)
    assert u.dtype == s.dtype == vh.dtype == dtype and u.device == a.device
    check_svd(a, u, s, vh, TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e15, 1e-15])
def test_huge_and_tiny_scales(seed, device, backend, scale):
    g = torch.Generator().manual_seed(seed)
    a = (make("gaussian", (2, 12, 9), torch.float64, "cpu", g) * scale).float().to(device)
    check_svd(a, *batched_svd(a, backend=backend), TOL[torch.float32])


@pytest.mark.parametrize("device,backend", device_backends())
def test_graded_over_ten_decades_reconstructs_as_well_as_lapack(seed, device, backend):
    """Singular values from 1 to 1e-10 in float32: rows below p·eps·σmax are still signal (a null
    threshold there dropped their σ·u·vᵀ terms: 10x LAPACK's error)."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    u, _ = torch.linalg.qr(torch.randn(4, n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, n, n, generator=g, dtype=torch.float64))
    a = ((u * torch.logspace(0, -10, n, dtype=torch.float64)) @ v.mT).float()

    def error(u, s, vh):
        return float(((u * s.unsqueeze(-2)) @ vh - a).norm() / a.norm())

    lapack = error(*torch.linalg.svd(a, full_matrices=False))
    got = batched_svd(a.to(device), backend=backend)
    assert error(*(t.cpu() for t in got)) <= 2 * lapack + 1e-7
    assert float((got[0].mT @ got[0] - torch.eye(n, device=device)).abs().max()) < 1e-5


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("scale", [1e-310, 1e-320, 1e300])
def test_float64_subnormal_and_huge_scales(seed, device, backend, scale):
    """A subnormal largest entry: the kernel's 2^-e scale factor itself overflowed (NaN out)."""
    g = torch.Generator().manual_seed(seed)
    a = (make("gaussian", (2, 5, 3), torch.float64, "cpu", g) * scale).to(device)
    u, s, vh = batched_svd(a, backend=backend)
    want = torch.linalg.svdvals(a.cpu())
    assert torch.isfinite(s).all() and torch.isfinite(u).all() and torch.isfinite(vh).all()
    # a subnormal keeps only the bits above 2^-1074: compare to the precision the input has
    torch.testing.assert_close(s.cpu(), want, rtol=1e-11 if scale > 1e-300 else 1e-3, atol=0)


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 24), n=st.integers(1, 24), batch=st.integers(1, 3),
       kind=st.sampled_from(KINDS), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_shapes(seed, m, n, batch, kind, dtype):
    g = torch.Generator().manual_seed(seed + m * 31 + n)
    a = make(kind, (batch, m, n), dtype, "cpu", g)
    check_svd(a, *batched_svd(a, backend="cpu"), TOL[dtype])


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
def test_half_inputs_and_float64_compute(seed):
    a = torch.randn(3, 10, 6)
    u, s, vh = batched_svd(a.bfloat16(), backend="cpu")
    assert u.dtype == torch.float32
    check_svd(a.bfloat16().float(), u, s, vh, 1e-5)
    u, s, vh = batched_svd(a, backend="cpu", compute_dtype=torch.float64)
    assert s.dtype == torch.float32
    check_svd(a, u, s, vh, 1e-6)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 3), (2, 3, 0)], ids=lambda s: "x".join(map(str, s)))
def test_empty_inputs(seed, device, backend, dtype, shape):
    batch, m, n = shape
    u, s, vh = batched_svd(torch.randn(shape, device=device).to(dtype), backend=backend)
    assert (u.shape, s.shape, vh.shape) == ((batch, m, min(m, n)), (batch, min(m, n)), (batch, min(m, n), n))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert u.dtype == s.dtype == vh.dtype == out_dtype and u.device.type == device


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_transposed_input(seed, device, backend, dtype):
    a = make("gaussian", (3, 9, 7), dtype, device, torch.Generator().manual_seed(seed)).transpose(-1, -2)
    assert not a.is_contiguous()
    check_svd(a, *batched_svd(a, backend=backend), TOL[dtype])
    if backend != "reference":  # the op itself too, not only the contiguous copy batched_svd passes it
        check_svd(a, *torch.ops.fastmix.batched_svd(a), TOL[dtype])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(seed, bad):
    a = torch.randn(2, 4, 4)
    a[1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        batched_svd(a)


def test_bad_inputs_raise(seed):
    with pytest.raises(TypeError, match="a must be float32, float64, bfloat16 or float16, got torch.int64"):
        batched_svd(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape("a must have at least 2 dims (..., m, n), got shape (5,)")):
        batched_svd(torch.randn(5))
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got ndarray"):
        batched_svd(np.ones((3, 3)))
    with pytest.raises(ValueError, match="batched_svd has no triton backend"):
        batched_svd(torch.randn(3, 3), backend="triton")
    with pytest.raises(ValueError, match="compute_dtype must be torch.float32, torch.float64 or None"):
        batched_svd(torch.randn(3, 3), compute_dtype=torch.float16)


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
def test_compiled_op_checks_name_the_argument(seed):
    op = torch.ops.fastmix.batched_svd
    with pytest.raises(RuntimeError, match="a must be 3-D"):
        op(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="a must be float32 or float64"):
        op(torch.randn(1, 4, 4).half())
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        op(torch.full((1, 2, 2), float("nan")))


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
def test_fake_kernel_checks_arguments_while_tracing(seed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="a must be 3-D"):
            torch.ops.fastmix.batched_svd(torch.randn(4, 4))
        with pytest.raises(RuntimeError, match="a must be float32 or float64"):
            torch.ops.fastmix.batched_svd(torch.randn(1, 4, 4).half())
        u, s, vh = torch.ops.fastmix.batched_svd(torch.randn(2, 5, 3))
        assert (u.shape, s.shape, vh.shape) == ((2, 5, 3), (2, 3), (2, 3, 3))


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
def test_opcheck(seed):
    samples = [torch.randn(3, 6, 4), torch.randn(2, 4, 7, dtype=torch.float64), torch.randn(1, 1, 1),
               torch.randn(2, 4, 5).transpose(-1, -2)]  # non-contiguous
    if HAS_GPU:
        samples.append(torch.randn(4, 16, 16, device="cuda"))
    for a in samples:
        torch.library.opcheck(torch.ops.fastmix.batched_svd.default, (a,))


def test_backend_choice_and_note():
    assert svd_backend("cpu") == ("cpu" if COMPILED_CPU else "reference")
    assert svd_backend("cpu", "reference") == "reference"
    if HAS_GPU:
        assert svd_backend("cuda") == ("cuda" if backends.has_kernel("batched_svd", "CUDA") else "reference")
    with pytest.raises(ValueError, match="batched_svd has no triton backend"):
        svd_backend("cpu", "triton")
    assert "torch.linalg.svd" in FAST_PATH_NOTE
