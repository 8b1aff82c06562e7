"""ridge_leverage_scores against numpy float64 on fresh random inputs, SVD and primal forms."""
import numpy as np
import pytest
import torch

from conftest import random_matrix
from fastmix.ops import _backends, reference, ridge_leverage_scores
COMPILED_CPU = _backends.has_kernel("batched_svd", "CPU")


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
    params = [pytest.param("reference", id="reference")]
    params.append(pytest.param(None, id="auto"))
    params.append(pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")))
    return params


def inputs(kind, shape, generator, scale=1.0):
    return (random_matrix(kind, shape, generator) * scale).float()


SHAPES = {"square": (2, 9, 9), "tall": (2, 20, 6), "wide": (2, 6, 20), "k1": (3, 1, 5),
          "k2": (3, 2, 5), "batched": (2, 3, 7, 4)}


@pytest.mark.parametrize("backend", svd_backends())
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "duplicated_rows"])
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centred"])
def test_matches_numpy_many_lambdas(seed, backend, shape, kind, center):
    g = torch.Generator().manual_seed(seed)
    a = inputs(kind, shape, g)
    lams = torch.tensor([1.0, 3.0, 10.0, 1e3])
    got = ridge_leverage_scores(a, lams, center=center, backend=backend)
    assert got.shape == (*shape[:-2], 4, shape[-2]) and got.dtype == torch.float32
    for i, lam in enumerate(lams.tolist()):
        want = numpy_leverage_direct(a.numpy(), lam, center)
        np.testing.assert_allclose(got[..., i, :].numpy(), want, rtol=0, atol=1e-5)
        single = ridge_leverage_scores(a, lam, center=center, backend=backend)
        assert single.shape == (*shape[:-2], shape[-2])
        np.testing.assert_allclose(single.numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", svd_backends())
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "duplicated_rows"])
@pytest.mark.parametrize("shape", [(10, 4), (4, 10), (8, 8)], ids=["tall", "wide", "square"])
def test_ordinary_leverage_is_rank_aware(seed, backend, kind, shape):
    g = torch.Generator().manual_seed(seed)
    a = inputs(kind, shape, g)
    got = ridge_leverage_scores(a, 0.0, backend=backend)
    np.testing.assert_allclose(got.numpy(), numpy_leverage(a.numpy(), 0.0), rtol=0, atol=1e-5)
    s = np.linalg.svd(a.double().numpy(), compute_uv=False)
    rank = int((s > float32_rank_tol(a, s)).sum())
    assert abs(float(got.sum()) - rank) < 1e-4  # Σ τ = rank(a)


@pytest.mark.parametrize("backend", svd_backends())
@pytest.mark.parametrize("scale", [1e6, 1e-6, 1e15, 1e-15])
def test_huge_and_tiny_scales(seed, backend, scale):
    g = torch.Generator().manual_seed(seed)
    a = inputs("gaussian", (2, 7, 5), g, scale)
    for lam in (1.0, scale * scale):  # a fixed ridge, and one at the scale of σ²
        got = ridge_leverage_scores(a, lam, backend=backend)
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


@pytest.mark.parametrize("backend", svd_backends())
def test_tiny_lambda_ill_conditioned(seed, backend):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = ((u * torch.logspace(0, -3, 6, dtype=torch.float64)) @ v.T).float()
    for lam in (1e-4, 1e-6):
        got = ridge_leverage_scores(a, lam, backend=backend)
        np.testing.assert_allclose(got.numpy(), numpy_leverage(a.numpy(), lam), rtol=0, atol=1e-3)


def primal_backends():
    params = [pytest.param("reference", id="reference"),
              pytest.param("triton", id="triton", marks=pytest.mark.skipif(
                  not _backends.available("rowwise_bilinear", "triton", "cpu"),
                  reason="triton not installed"))]
    if _backends.has_kernel("rowwise_bilinear", "CPU"):
        params.append(pytest.param("cpu", id="cpu"))
    return params


@pytest.mark.parametrize("backend", primal_backends())
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centred"])
def test_primal_streaming_matches_numpy(seed, backend, center):
    g = torch.Generator().manual_seed(seed)
    a = inputs("gaussian", (40, 5), g)
    a[7] = a[3]  # a duplicated item
    lams = torch.tensor([1.0, 10.0])
    got = ridge_leverage_scores(a, lams, center=center, method="primal", backend=backend)
    assert got.shape == (2, 40)
    for i, lam in enumerate(lams.tolist()):
        np.testing.assert_allclose(got[i].numpy(), numpy_leverage_direct(a.numpy(), lam, center),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", primal_backends())
def test_primal_at_lambda_zero_is_rank_aware_in_float64(seed, backend):
    """The float64 Gram matrix's null eigenvalues come out of eigh as noise of about
    n·eps·σ_max², far above rtol·σ_max squared: they must count as zero, not as 1/noise."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64))
    got = ridge_leverage_scores(a, 0.0, method="primal", backend=backend)
    want = ridge_leverage_scores(a, 0.0, method="svd", backend="reference")
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-10)
    assert abs(float(got.sum()) - 3) < 1e-9  # Σ τ = rank(a)


@pytest.mark.skipif(not COMPILED_CPU, reason="no C++ kernel")
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


def test_float64_and_reference_agree(seed):
    a = torch.randn(2, 6, 4, dtype=torch.float64)
    got = ridge_leverage_scores(a, [0.5, 2.0], center=True)
    assert got.dtype == torch.float64
    want = reference.ridge_leverage_scores(a, torch.tensor([0.5, 2.0]), center=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)


def test_bad_inputs_raise():
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        ridge_leverage_scores(a, -1.0)
    with pytest.raises(ValueError, match="1-D"):
        ridge_leverage_scores(a, torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN or infinity"):
        ridge_leverage_scores(torch.full((3, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="method"):
        ridge_leverage_scores(a, 1.0, method="qr")
    with pytest.raises(ValueError, match="2-D"):
        ridge_leverage_scores(torch.randn(2, 5, 3), 1.0, method="primal")
    with pytest.raises(TypeError, match="lam"):
        ridge_leverage_scores(a, "1.0")
    with pytest.raises(ValueError, match="at least 2 dims"):
        ridge_leverage_scores(torch.randn(5), 1.0)
