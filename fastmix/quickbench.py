"""`fastmix bench`: times each op on every backend available here against the torch code
one would write instead, at one size, so a user can see what the install gives on their
machine. (The full benchmark suite is `make bench` in a source checkout.)"""
import statistics
import time

import torch

import fastmix.ops as ops
from fastmix.ops import backends


def _median_ms(fn, min_seconds=0.5):
    """Median wall time of fn() over repeated runs (after one warm-up), GPU work included."""
    def timed():
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    times = [timed()]
    while sum(times) < min_seconds or len(times) < 5:
        times.append(timed())
    return statistics.median(times) * 1e3


def _composite(x, grad_out, ids, k, target):
    rows = (grad_out * (x @ target.T)).sum(-1)
    return torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows)


def _cases(device, rows, width, domains, batch):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, g = (torch.randn(rows, width, device=device, dtype=dtype) for _ in range(2))
    target = torch.randn(width, width, device=device, dtype=dtype)
    ids = torch.randint(0, domains, (rows,), device=device)
    mats = torch.randn(batch, 64, 64, device=device)
    yield (f"domain_grad_dots N={rows} d={width} k={domains} {dtype}", "rowwise_bilinear",
           lambda: _composite(x, g, ids, domains, target),
           lambda backend: ops.domain_grad_dots(x, g, ids, domains, target, backend=backend, validate_ids=False))
    yield (f"batched_svd {batch} x 64x64 float32", "batched_svd",
           lambda: torch.linalg.svd(mats, full_matrices=False),
           lambda backend: ops.batched_svd(mats, backend=backend))


def run(device="cpu", rows=4096, width=768, domains=64, batch=256, min_seconds=0.5):
    """Prints a table: op, backend, median time, speed-up over the torch baseline."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastmix bench: --device cuda but no GPU is visible")
    print(f"{'op':<52} {'backend':<22} {'median ms':>10} {'speed-up':>9}")
    for name, op, baseline, fast in _cases(device, rows, width, domains, batch):
        base_ms = _median_ms(baseline, min_seconds)
        print(f"{name:<52} {'torch (baseline)':<22} {base_ms:10.3f} {1.0:8.2f}x")
        for backend in ("cpu", "cuda", "triton"):
            if backends.available(op, backend, device) and not (backend == "triton" and device == "cpu"):
                ms = _median_ms(lambda: fast(backend), min_seconds)
                print(f"{'':<52} {backend:<22} {ms:10.3f} {base_ms / ms:8.2f}x")
