"""weight_grad_dots (the weight gradient with its k per-domain dots in one pass) vs the
weight-gradient GEMM alone, torch.mm(grad_out.T, x) (the named baseline), and vs what the
probe pays without the fused op: that GEMM plus domain_grad_dots' GEMM-sized product."""
import pytest
import torch

import fastmix.ops as ops
from conftest import HAS_GPU, synchronize
from fastmix.ops import backends

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def run(benchmark, device, fn):
    """On a GPU a round is 20 calls and one sync (one call lasts about as long as its launch)."""
    calls = 20 if device == "cuda" else 1

    def timed():
        for _ in range(calls):
            out = fn()
        synchronize(device)
        return out
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_round"] = calls


DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float32]}  # the goals' dtypes per device
CASES = [(device, dtype, n, d, k) for device in DEVICES for dtype in DTYPES[device] for n in (4096, 16384)
         for d in (256, 768, 1024) for k in (1, 8, 64, 1024)]
METHODS = ["mm", "mm+domain_grad_dots", "cpu", "cuda", "triton"]


@pytest.mark.parametrize("device,dtype,n,d,k", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("method", METHODS)
def test_weight_grad_dots(benchmark, device, dtype, n, d, k, method):
    benchmark.group = f"weight_grad_dots {device} {dtype} N={n} d={d} k={k}"
    x, grad_out = torch.randn(n, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
    target = torch.randn(d, d, device=device, dtype=dtype)
    offsets = torch.linspace(0, n, k + 1, device=device).long()  # rows grouped by domain
    if method == "mm":
        benchmark.extra_info["baseline"] = True
        run(benchmark, device, lambda: torch.mm(grad_out.T, x))
    elif method == "mm+domain_grad_dots":
        ids = ops.reference.offsets_to_ids(offsets, n)
        run(benchmark, device, lambda: (torch.mm(grad_out.T, x),
                                        ops.domain_grad_dots(x, grad_out, ids, k, target, validate_ids=False)))
    elif backends.available("weight_grad_dots", method, device) and not (method == "triton" and device == "cpu"):
        run(benchmark, device, lambda: ops.weight_grad_dots(x, grad_out, target, offsets=offsets, backend=method,
                                                            validate_ids=False))
    else:
        pytest.skip(f"backend {method} not available on {device}")
