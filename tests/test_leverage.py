"""ridge_leverage_scores against numpy float64 on fresh random inputs, SVD and primal forms."""
import re

import numpy as np
import pytest
import torch

from conftest import HAS_GPU, device_backend_params, random_matrix
from fastmix.ops import backends, reference, ridge_leverage_scores

COMPILED_CPU = backends.has_kernel("batched_svd", "CPU")
NO_CPU_KERNEL = pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
NO_GPU = pytest.mark.skipif(not HAS_GPU, reason="no GPU")
NO_CUDA_KERNEL = pytest.mark.skipif(not (HAS_GPU and backends.has_kernel("batched_svd", "CUDA")),
                                    reason="no GPU or no CUDA kernel")


def numpy_leverage_direct(a, lam, center=False):
    """diag(K (K + λI)⁻¹) in float64, K = a aᵀ (H a aᵀ H centred), by numpy's inverse."""
    a = np.asarray(a, dtype=np.float64)
    if center:
        a = a - a.mean(-2, keepdims=True)
    k = a @ np.swapaxes(a, -1, -2)
    return np.diagonal(k @ np.linalg.inv(k + lam * np.eye(a.shape[-2])), axis1=-2, axis2=-1)


def float32_rank_tol(a, s):
    return max(a.shape[-2:]) * np.finfo(np.float32).eps * s[..., :1]


def numpy_leverage(a, lam, center=False):
    """The same from numpy's float64 SVD, Σ_j U_ij² σ_j²/(σ_j² + λ): stable at any scale and
    for λ = 0, where singular values at or below max(m, n)·eps32·σ_max count as zero."""
    a = np.asarray(a, dtype=np.float64)
    if center:
        a = a - a.mean(-2, keepdims=True)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    weights = (s * s / (s * s + lam)) if lam > 0 else np.ones_like(s)
    weights = weights * (s > float32_rank_tol(a, s))
    return ((u * u) * weights[..., None, :]).sum(-1)


def svd_backends():
    """(device, backend) pairs of the SVD form: reference, the automatic choice and the
    Jacobi kernel, on CPU and (when present) on the GPU."""
    return [pytest.param("cpu", "reference", id="cpu-reference"),
            pytest.param("cpu", None, id="cpu-auto"),
            pytest.param("cpu", "cpu", id="cpu-cpu", marks=NO_CPU_KERNEL),
            pytest.param("cuda", None, id="cuda-auto", marks=NO_GPU),
            pytest.param("cuda", "cuda", id="cuda-cuda", marks=NO_CUDA_KERNEL)]


def inputs(kind, shape, generator, scale=1.0):
    return (random_matrix(kind, shape, generator) * scale).float()


SHAPES = {"square": (2, 9, 9), "tall": (2, 20, 6), "wide": (2, 6, 20), "k1": (3, 1, 5),
          "k2": (3, 2, 5), "batched": (2, 3, 7, 4)}


@pytest.mark.parametrize("device,backend", svd_backends())
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "duplicated_rows"])
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centred"])
def test_matches_numpy_many_lambdas(seed, device, backend, shape, kind, center):
    g = torch.Generator().manual_seed(seed)
    a = inputs(kind, shape, g)
    lams = torch.tensor([1.0, 3.0, 10.0, 1e3])
    got = ridge_leverage_scores(a.to(device), lams, center=center, backend=backend)
    assert got.shape == (*shape[:-2], 4, shape[-2]) and got.dtype == torch.float32
    assert got.device.type == device
    for i, lam in enumerate(lams.tolist()):
        want = numpy_leverage_direct(a.numpy(), lam, center)
        np.testing.assert_allclose(got[..., i, :].cpu().numpy(), want, rtol=0, atol=1e-5)
        single = ridge_leverage_scores(a.to(device), lam, center=center, backend=backend)
        assert single.shape == (*shape[:-2], shape[-2])
        np.testing.assert_allclose(single.cpu().numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", svd_backends())
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "duplicated_rows"])
@pytest.mark.parametrize("shape", [(10, 4), (4, 10), (8, 8)], ids=["tall", "wide", "square"])
def test_ordinary_leverage_is_rank_aware(seed, device, backend, kind, shape):
    g = torch.Generator().manual_seed(seed)
    a = inputs(kind, shape, g)
    got = ridge_leverage_scores(a.to(device), 0.0, backend=backend).cpu()
    np.testing.assert_allclose(got.numpy(), numpy_leverage(a.numpy(), 0.0), rtol=0, atol=1e-5)
    s = np.linalg.svd(a.double().numpy(), compute_uv=False)
    rank = int((s > float32_rank_tol(a, s)).sum())
    assert abs(float(got.sum()) - rank) < 1e-4  # Σ τ = rank(a)


@pytest.mark.parametrize("device,backend", svd_backends())
@pytest.mark.parametrize("scale", [1e6, 1e-6, 1e15, 1e-15])
def test_huge_and_tiny_scales(seed, device, backend, scale):
    g = torch.Generator().manual_seed(seed)
    a = inputs("gaussian", (2, 7, 5), g, scale)
    for lam in (1.0, scale * scale):  # a fixed ridge, and one at the scale of σ²
        got = ridge_leverage_scores(a.to(device), lam, backend=backend).cpu()
        np.testing.assert_allclose(got.numpy(), numpy_leverage(a.numpy(), lam), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "primal"])
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centred"])
def test_near_the_float32_limit(seed, method, center):
    """Entries near float32's largest value: σ_max and the centring sum exceed it, yet the
    scores are those of the same problem scaled down (τ(a, λ) = τ(a/c, λ/c²))."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3000 if method == "primal" else 9, 4, generator=g, dtype=torch.float64) + 0.5
    a = (small * 2e38).float()  # every entry in [1e38, 3e38)
    lams = [4e76] if method == "primal" else [0.0, 4e76]  # primal needs λ > 0
    got = ridge_leverage_scores(a, lams, center=center, method=method)
    assert torch.isfinite(got).all()
    for row, lam in zip(got, lams):
        want = numpy_leverage(a.double().numpy() / 2e38, lam / 4e76, center)
        np.testing.assert_allclose(row.numpy(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("device,backend", svd_backends())
def test_tiny_lambda_ill_conditioned(seed, device, backend):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = ((u * torch.logspace(0, -3, 6, dtype=torch.float64)) @ v.T).float()
    for lam in (1e-4, 1e-6):
        got = ridge_leverage_scores(a.to(device), lam, backend=backend).cpu()
        np.testing.assert_allclose(got.numpy(), numpy_leverage(a.numpy(), lam), rtol=0, atol=1e-3)


def primal_backends():
    """(device, backend) pairs of the primal form: those of rowwise_bilinear, which streams
    the rows, and the reference."""
    return [pytest.param("cpu", "reference", id="cpu-reference")] + device_backend_params("rowwise_bilinear")


@pytest.mark.parametrize("device,backend", primal_backends())
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centred"])
def test_primal_streaming_matches_numpy(seed, device, backend, center):
    g = torch.Generator().manual_seed(seed)
    a = inputs("gaussian", (40, 5), g)
    a[7] = a[3]  # a duplicated item
    lams = torch.tensor([1.0, 10.0])
    got = ridge_leverage_scores(a.to(device), lams, center=center, method="primal", backend=backend).cpu()
    assert got.shape == (2, 40)
    for i, lam in enumerate(lams.tolist()):
        np.testing.assert_allclose(got[i].numpy(), numpy_leverage_direct(a.numpy(), lam, center),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", primal_backends())
def test_primal_at_lambda_zero_is_rank_aware_in_float64(seed, device, backend):
    """The float64 Gram matrix's null eigenvalues come out of eigh as noise of about
    n·eps·σ_max², far above rtol·σ_max squared: they must count as zero, not as 1/noise."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64))
    got = ridge_leverage_scores(a.to(device), 0.0, method="primal", backend=backend).cpu()
    want = ridge_leverage_scores(a, 0.0, method="svd", backend="reference")
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-10)
    assert abs(float(got.sum()) - 3) < 1e-9  # Σ τ = rank(a)


@NO_CPU_KERNEL
def test_auto_streams_when_items_outnumber_columns(seed, monkeypatch):
    from fastmix.ops import linalg

    calls = []
    real = linalg._leverage_primal
    monkeypatch.setattr(linalg, "_leverage_primal", lambda *args: calls.append(1) or real(*args))
    a = torch.randn(5000, 8)
    got = ridge_leverage_scores(a, 2.0)
    assert calls, "method='auto' should stream the primal form for m >> n"
    want = ridge_leverage_scores(a, 2.0, method="svd")
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "cpu", id="cpu-cpu", marks=NO_CPU_KERNEL),
                                            pytest.param("cuda", "cuda", id="cuda-cuda", marks=NO_CUDA_KERNEL)])
def test_float64_jacobi_matches_the_reference(seed, device, backend):
    """An explicit backend runs the Jacobi kernel even on a batch this small (the automatic
    choice would take torch.linalg.svd, the reference's own SVD)."""
    a = torch.randn(2, 6, 4, dtype=torch.float64)
    got = ridge_leverage_scores(a.to(device), [0.5, 2.0], center=True, backend=backend)
    assert got.dtype == torch.float64
    want = reference.ridge_leverage_scores(a, torch.tensor([0.5, 2.0]), center=True)
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device,backend", svd_backends())
@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 4, 0), (0, 4, 3)], ids=["no-items", "no-columns", "no-matrices"])
def test_empty_inputs_give_zeros(device, backend, shape):
    got = ridge_leverage_scores(torch.ones(shape, device=device), [1.0, 0.0], backend=backend)
    assert got.shape == (shape[0], 2, shape[1]) and got.dtype == torch.float32
    assert bool((got == 0).all())
    assert ridge_leverage_scores(torch.ones(shape, device=device), 1.0, backend=backend).shape == (shape[0], shape[1])


@pytest.mark.parametrize("device,backend", svd_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs(seed, device, backend, dtype):
    """Scores of the 16-bit values themselves, computed in float32."""
    a = inputs("gaussian", (2, 9, 5), torch.Generator().manual_seed(seed)).to(dtype)
    got = ridge_leverage_scores(a.to(device), [1.0, 10.0], backend=backend).cpu()
    assert got.dtype == torch.float32
    for i, lam in enumerate((1.0, 10.0)):
        np.testing.assert_allclose(got[:, i].numpy(), numpy_leverage_direct(a.double().numpy(), lam),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", svd_backends())
def test_non_contiguous_input(seed, device, backend):
    a = inputs("gaussian", (2, 5, 9), torch.Generator().manual_seed(seed)).transpose(-1, -2)
    assert not a.is_contiguous()
    got = ridge_leverage_scores(a.to(device), 2.0, center=True, backend=backend).cpu()
    np.testing.assert_allclose(got.numpy(), numpy_leverage_direct(a.numpy(), 2.0, center=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(lam=-1.0), ValueError, "lam must be finite and >= 0, got [-1.0]"),
    (dict(lam=[float("inf")]), ValueError, "lam must be finite and >= 0, got [inf]"),
    (dict(lam=True), TypeError, "lam must be a number or a 1-D tensor of numbers, got a bool"),
    (dict(lam="1.0"), TypeError, "lam must be a number or a 1-D tensor, got str"),
    (dict(lam=torch.ones(2, 2)), ValueError, "lam must be a number or a 1-D real tensor, got shape (2, 2)"),
    (dict(a=torch.full((3, 3), float("nan"))), ValueError, "a contains NaN or infinity"),
    (dict(a=torch.ones(5, 3, dtype=torch.int32)), TypeError,
     "a must be float32, float64, bfloat16 or float16, got torch.int32"),
    (dict(a=torch.ones(5)), ValueError, "a must have at least 2 dims (..., m, n), got shape (5,)"),
    (dict(method="qr"), ValueError, "method must be 'auto', 'svd' or 'primal', got 'qr'"),
    (dict(a=torch.ones(2, 5, 3), method="primal"), ValueError,
     "method='primal' needs a 2-D a (m, n), got shape (2, 5, 3)"),
    (dict(compute_dtype=torch.float16), ValueError, "compute_dtype must be torch.float32, torch.float64 or None"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="triton"), ValueError, "batched_svd has no triton backend"),
    (dict(rtol=-1e-3), ValueError, "rtol must be a finite number >= 0 (or None for the default), got -0.001"),
    (dict(rtol=float("nan")), ValueError, "rtol must be a finite number >= 0 (or None for the default), got nan"),
    (dict(rtol=True), ValueError, "rtol must be a finite number >= 0 (or None for the default), got True"),
])
def test_bad_inputs_name_the_argument(kwargs, error, message):
    args = dict(a=torch.ones(5, 3), lam=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        ridge_leverage_scores(args.pop("a"), args.pop("lam"), **args)
