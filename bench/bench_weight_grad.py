"""weight_grad_dots (the weight gradient with its k per-domain dots in one pass) vs the
weight-gradient GEMM alone, torch.mm(grad_out.T, x) (the named baseline), and vs what the
probe pays without the fused op: that GEMM plus domain_grad_dots' GEMM-sized product.

    pytest bench/bench_weight_grad.py -k cpu --benchmark-only      # pytest-benchmark, a group per shape
    python bench/bench_weight_grad.py --rounds 9                    # op / mm from interleaved calls, the goal's grid
"""
import statistics

import pytest
import torch

import fastmix.ops as ops
from conftest import HAS_GPU, interleaved_times, ratio_quartiles, synchronize
from fastmix.ops import backends

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def run_calls(device, fn):
    """One round: on a GPU 20 calls and one sync (one call lasts about as long as its launch)."""
    for _ in range(20 if device == "cuda" else 1):
        out = fn()
    synchronize(device)
    return out


def run(benchmark, device, fn):
    benchmark.pedantic(run_calls, args=(device, fn), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_round"] = 20 if device == "cuda" else 1


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


def interleaved(rounds):
    """Each round calls torch.mm and the op in turn on the goal's shapes (fp32, on a GPU when one
    is visible, else on the CPU), so a change in the machine's load hits both alike; prints the
    median of the per-round ratios op / mm (quartiles) per shape."""
    device = "cuda" if HAS_GPU else "cpu"
    print(f"weight_grad_dots / torch.mm on {device}, float32, {rounds} interleaved rounds (median, quartiles)")
    for n in (4096, 16384):
        for d in (256, 768, 1024):
            x, grad_out = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
            target = torch.randn(d, d, device=device)
            cells = []
            for k in (1, 8, 64, 1024):
                offsets = torch.linspace(0, n, k + 1, device=device).long()
                calls = {"mm": lambda: run_calls(device, lambda: torch.mm(grad_out.T, x)),
                         "op": lambda: run_calls(device, lambda: ops.weight_grad_dots(
                             x, grad_out, target, offsets=offsets, validate_ids=False))}
                for fn in calls.values():  # warm-up: the first call allocates
                    fn()
                times = interleaved_times(calls, rounds)
                q1, median, q3 = ratio_quartiles(times["op"], times["mm"])
                cells.append(f"k={k}: {median:.2f}x ({q1:.2f}-{q3:.2f})")
            print(f"N={n:<5} d={d:<4} mm {statistics.median(times['mm']) * 1e3:7.1f} ms   " + "   ".join(cells),
                  flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="op / mm ratios from interleaved calls (see the docstring)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of one call of each (default: 9)")
    interleaved(parser.parse_args().rounds)
