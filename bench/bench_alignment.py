"""domain_grad_dots on each backend vs the unfused torch composite (the named baseline)
and vs a plain GEMM of the same shape (the floor); ghost form vs materialising."""
import pytest
import torch

import fastmix.ops as ops
from conftest import HAS_GPU, synchronize
from fastmix.ops import backends

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def composite(x, grad_out, ids, k, target):
    """What one would write in torch: GEMM, row dot, segment sum (three kernels)."""
    rows = (grad_out * (x @ target.T)).sum(-1)
    return torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows)


def inputs(device, n, d, k, dtype):
    x, grad_out = torch.randn(n, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
    return x, grad_out, torch.randint(0, k, (n,), device=device), torch.randn(d, d, device=device, dtype=dtype)


def run(benchmark, device, fn):
    """On a GPU a round is 50 calls and one sync: a single call lasts microseconds, about what
    the launch and the sync take, so one call per round would time the host."""
    calls = 50 if device == "cuda" else 1

    def timed():
        for _ in range(calls):
            out = fn()
        synchronize(device)
        return out
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_round"] = calls


CASES = [(device, n, d, k) for device in DEVICES for n in (4096, 16384) for d in (256, 768) for k in (8, 64, 1024)]


@pytest.mark.parametrize("device,n,d,k", CASES)
@pytest.mark.parametrize("method", ["composite", "gemm", "cpu", "cuda", "triton"])
def test_domain_grad_dots(benchmark, device, n, d, k, method):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    benchmark.group = f"domain_grad_dots {device} {dtype} N={n} d={d} k={k}"
    x, grad_out, ids, target = inputs(device, n, d, k, dtype)
    if method == "composite":
        benchmark.extra_info["baseline"] = True
        run(benchmark, device, lambda: composite(x, grad_out, ids, k, target))
    elif method == "gemm":
        run(benchmark, device, lambda: x @ target.T)
    elif backends.available("rowwise_bilinear", method, device) and not (method == "triton" and device == "cpu"):
        run(benchmark, device, lambda: ops.domain_grad_dots(x, grad_out, ids, k, target, backend=method,
                                                            validate_ids=False))
    else:
        pytest.skip(f"backend {method} not available on {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["materialise", "ghost"])
def test_ghost_vs_materialising(benchmark, device, method):
    """Target from 64 rows: the ghost form never forms the d x d target."""
    n, m, d, k = 8192, 64, 768, 16
    benchmark.group = f"ghost {device} N={n} M={m} d={d} k={k}"
    x, grad_out, ids, _ = inputs(device, n, d, k, torch.float32)
    target_x, target_grad_out = torch.randn(m, d, device=device), torch.randn(m, d, device=device)
    if method == "materialise":
        benchmark.extra_info["baseline"] = True
        run(benchmark, device, lambda: composite(x, grad_out, ids, k, target_grad_out.T @ target_x))
    else:
        run(benchmark, device, lambda: ops.domain_grad_dots_ghost(x, grad_out, ids, k, target_x, target_grad_out,
                                                                  validate_ids=False))
