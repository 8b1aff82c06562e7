"""Shared test setup. Without a GPU, Triton kernels run through Triton's CPU interpreter;
that must be switched on before any kernel module is imported, hence here."""
import os
import random

import pytest
import torch

# Models and tokenizers are built from tiny configs in code: nothing may come from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmix.ops import backends  # noqa: E402  (after TRITON_INTERPRET is set)


def backends_for(op, device_type):
    """The fast backends that can run `op` on `device_type` here (reference excluded)."""
    return [b for b in ("cpu", "cuda", "triton") if backends.available(op, b, device_type)]


def device_backend_params(op):
    """(device, backend) pairs to test: every fast backend on CPU, and on CUDA if present."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in backends_for(op, "cpu")]
    if HAS_GPU:
        params += [pytest.param("cuda", b, id=f"cuda-{b}") for b in backends_for(op, "cuda")]
    else:
        params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skip("no GPU")))
    return params


def run_distributed(worker, tmp_path, *args, world=2):
    """Runs worker(rank, world, *args) in `world` processes joined in one gloo group. The group
    meets through a file in tmp_path, not a TCP port another process could take meanwhile."""
    import torch.multiprocessing as mp

    init_file = os.path.join(str(tmp_path), "process_group_init")
    mp.spawn(_distributed_worker, args=(world, init_file, worker, args), nprocs=world, join=True)


def _distributed_worker(rank, world, init_file, worker, args):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """A small built-in corpus store, built once per test run (read-only for the tests)."""
    from fastmix.data import build_builtin

    path = tmp_path_factory.mktemp("data") / "builtin"
    build_builtin(path, train_tokens=4000, val_tokens=400, target_train_tokens=400)
    return str(path)


@pytest.fixture
def seed(request):
    """A fresh seed per test (inputs are never the same twice), printed on failure."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


def random_matrix(kind, shape, generator):
    """A fresh random float64 (..., m, n) matrix of a kind that stresses linear algebra."""
    *batch, m, n = shape
    g = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    if kind == "gaussian":
        return g(*shape)
    if kind == "rank_deficient":
        r = max(1, min(m, n) // 2)
        return g(*batch, m, r) @ g(*batch, r, n)
    if kind == "duplicated_rows":
        a = g(*shape)
        a[..., 1::2, :] = a[..., :1, :]
        return a
    if kind == "graded":  # singular values over 4 decades
        u, _ = torch.linalg.qr(g(*batch, m, min(m, n)))
        v, _ = torch.linalg.qr(g(*batch, n, min(m, n)))
        s = torch.logspace(0, -4, min(m, n), dtype=torch.float64)
        return (u * s) @ v.transpose(-1, -2)
    if kind == "zeros":
        return torch.zeros(*shape, dtype=torch.float64)
    raise ValueError(kind)
