"""batched_svd and ridge_leverage_scores against torch, all in one run.

    pytest bench/bench_linalg.py                          # CPU grid that runs in minutes
    FASTMIX_BENCH_FULL=1 pytest bench/bench_linalg.py     # the whole grid on CPU too
    pytest bench/bench_linalg.py -k "svd and 64x64"

Grid: batch ∈ {1, 64, 1024, 8192} (and 4096 at 64x64, the GPU goal) × (m, n) ∈ {8x8, 32x32,
64x64, 64x256, 256x256}, float32. SVD: fastmix.ops.batched_svd (the automatic choice and
the Jacobi kernel forced) vs torch.linalg.svd. Leverage (λ = 1): fastmix vs the same from
torch.linalg.svd, eigh of the Gram matrix K = a aᵀ, and a Cholesky solve (K + λI)⁻¹ K.
Streaming leverage: m = 10⁶, n = 256 (GPU or FULL; m = 10⁵, n = 64 on CPU by default),
against one read of the matrix (a.sum()) and the rowwise_bilinear pass alone.

Cases with batch·p²·q (p = min(m, n), q = max(m, n)) above 2²⁷ on CPU, or 2³⁰ on a GPU
(cuSOLVER takes tens of seconds per call at 8192 of 256x256), run only with
FASTMIX_BENCH_FULL=1, except the goal cases (1024 of 64x64 on CPU, 4096 of 64x64 on a GPU).
The Jacobi kernel forced on CUDA is skipped where its matrix does not fit in shared memory.
Each group names its baseline; bench/conftest.py prints every test's ratio to it at the end.
"""
import os

import pytest
import torch

from conftest import synchronize
from fastmix.ops import backends, batched_svd, linalg, ridge_leverage_scores, rowwise_bilinear

FULL = os.environ.get("FASTMIX_BENCH_FULL") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCHES = [1, 64, 1024, 4096, 8192]
SHAPES = [(8, 8), (32, 32), (64, 64), (64, 256), (256, 256)]
BUDGET = {"cpu": 2**27, "cuda": 2**30}
GOALS = {("cpu", 1024, 64, 64), ("cuda", 4096, 64, 64)}
LAM = 1.0


def cases():
    for device in DEVICES:
        for batch in BATCHES:
            for m, n in SHAPES:
                if batch == 4096 and (m, n) != (64, 64):
                    continue
                p, q = min(m, n), max(m, n)
                if not FULL and batch * p * p * q > BUDGET[device] and (device, batch, m, n) not in GOALS:
                    continue
                yield pytest.param(device, batch, m, n, id=f"{device}-b{batch}-{m}x{n}")


def run(benchmark, group, name, fn, device, work):
    """Times fn (a warm-up call first); fewer rounds for the heavy cases."""
    benchmark.group = group
    benchmark.name = name

    def call():
        fn()
        synchronize(device)

    call()
    rounds = 3 if work > (2**24 if device == "cpu" else 2**28) else 10
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["baseline"] = "(baseline)" in name
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def jacobi_backend(device):
    name = "cuda" if device == "cuda" else "cpu"
    return name if backends.has_kernel("batched_svd", name.upper()) else None


SVD_IMPLS = {
    "torch.linalg.svd (baseline)": lambda a, dev: torch.linalg.svd(a, full_matrices=False),
    "fastmix.batched_svd": lambda a, dev: batched_svd(a),
    "fastmix jacobi kernel": lambda a, dev: batched_svd(a, backend=jacobi_backend(dev)),
}


@pytest.mark.parametrize("impl", list(SVD_IMPLS))
@pytest.mark.parametrize("device,batch,m,n", cases())
def test_svd(benchmark, device, batch, m, n, impl):
    if impl == "fastmix jacobi kernel" and jacobi_backend(device) is None:
        pytest.skip("no compiled Jacobi kernel")
    if impl == "fastmix jacobi kernel" and device == "cuda" and not linalg._cuda_fits(m, n, torch.float32, device):
        pytest.skip(f"a {m}x{n} matrix does not fit in the CUDA kernel's shared memory")
    torch.manual_seed(0)
    a = torch.randn(batch, m, n, device=device)
    group = f"svd {device} batch={batch} {m}x{n} (baseline: torch.linalg.svd)"
    run(benchmark, group, impl, lambda: SVD_IMPLS[impl](a, device), device,
        batch * min(m, n) ** 2 * max(m, n))


def leverage_torch_svd(a):
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return ((u * u) * (s * s / (s * s + LAM)).unsqueeze(-2)).sum(-1)


def leverage_eigh(a):
    e, v = torch.linalg.eigh(a @ a.transpose(-1, -2))
    e = e.clamp_min(0)
    return ((v * v) * (e / (e + LAM)).unsqueeze(-2)).sum(-1)


def leverage_cholesky(a):
    k = a @ a.transpose(-1, -2)
    eye = torch.eye(k.shape[-1], device=a.device, dtype=a.dtype)
    x = torch.cholesky_solve(k, torch.linalg.cholesky(k + LAM * eye))  # (K + λI)⁻¹ K
    return (k * x).sum(-1)  # diag(K (K + λI)⁻¹), K and the inverse symmetric


LEVERAGE_IMPLS = {
    "torch.linalg.svd (baseline)": leverage_torch_svd,
    "eigh of the Gram matrix": leverage_eigh,
    "cholesky solve": leverage_cholesky,
    "fastmix.ridge_leverage_scores": lambda a: ridge_leverage_scores(a, LAM),
}


@pytest.mark.parametrize("impl", list(LEVERAGE_IMPLS))
@pytest.mark.parametrize("device,batch,m,n", cases())
def test_leverage(benchmark, device, batch, m, n, impl):
    torch.manual_seed(0)
    a = torch.randn(batch, m, n, device=device)
    group = f"leverage {device} batch={batch} {m}x{n} (baseline: torch.linalg.svd)"
    run(benchmark, group, impl, lambda: LEVERAGE_IMPLS[impl](a), device,
        batch * min(m, n) ** 2 * max(m, n))


def streaming_cases():
    for device in DEVICES:
        if device == "cuda" or FULL:
            yield pytest.param(device, 10**6, 256, id=f"{device}-m1e6-n256")
        if device == "cpu":
            yield pytest.param(device, 10**5, 64, id=f"{device}-m1e5-n64")


STREAM_IMPLS = ["one read of a: a.sum() (baseline)", "rowwise_bilinear pass (given the inverse)",
                "fastmix.ridge_leverage_scores (Gram + pass)"]


@pytest.mark.parametrize("impl", STREAM_IMPLS)
@pytest.mark.parametrize("device,m,n", streaming_cases())
def test_streaming_leverage(benchmark, device, m, n, impl):
    torch.manual_seed(0)
    a = torch.randn(m, n, device=device)
    inverse = torch.linalg.inv(a.T.double() @ a.double() + LAM * torch.eye(n, device=device, dtype=torch.float64)).float()
    fns = {
        STREAM_IMPLS[0]: lambda: a.sum(),
        STREAM_IMPLS[1]: lambda: rowwise_bilinear(a, inverse, a),
        STREAM_IMPLS[2]: lambda: ridge_leverage_scores(a, LAM, method="primal"),
    }
    group = f"streaming leverage {device} m={m} n={n} (baseline: one read of a)"
    run(benchmark, group, impl, fns[impl], device, 2**25)
    benchmark.extra_info["bytes"] = a.numel() * a.element_size()
