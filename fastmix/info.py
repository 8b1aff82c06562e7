"""`fastmix info`: versions, what was compiled, and which backend each op uses."""
import importlib.util
import torch

from fastmix.ops import backends

OPS = ("rowwise_bilinear", "ghost_dots", "weight_grad_dots")


def _cuda_arch_list():
    """The GPU targets the CUDA kernels were compiled for ("_" separates them)."""
    if not backends.COMPILED:
        return None
    from fastmix import _C

    return _C.cuda_arch_list or None


def _version(module):
    if importlib.util.find_spec(module) is None:
        return "not installed"
    return getattr(importlib.import_module(module), "__version__", "installed")


def collect():
    """Everything `fastmix info` prints, as a dict (also handy in bug reports)."""
    from fastmix import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ops = {}
    for op in OPS + tuple(getattr(_linalg(), "OPS", ())):
        ops[op] = {device: backends.choose(op, device) for device in ("cpu", "cuda")}
    return {
        "fastmix": __version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "GPU": gpu or "none visible",
        "compiled extension": "loaded" if backends.COMPILED else "not loaded",
        "compiled CPU kernels": any(backends.has_kernel(op, "CPU") for op in OPS),
        "compiled CUDA kernels": any(backends.has_kernel(op, "CUDA") for op in OPS),
        "CUDA arch list": _cuda_arch_list(),
        "triton interpreter": backends.triton_interpreted(),
        "backend per op": ops,
        "notes": getattr(_linalg(), "FAST_PATH_NOTE", None),
    }


def _linalg():
    """The linear-algebra ops module, if this install has it."""
    if importlib.util.find_spec("fastmix.ops.linalg") is None:
        return None
    return importlib.import_module("fastmix.ops.linalg")


def print_info():
    info = collect()
    ops = info.pop("backend per op")
    for key, value in info.items():
        if value is not None:
            print(f"{key:>22}: {value}")
    print(f"{'backend per op':>22}:  {'cpu':<10} cuda")
    for op, choice in ops.items():
        gpu_note = "" if torch.cuda.is_available() else "  (when a GPU is visible)"
        print(f"{op:>22}:  {choice['cpu']:<10} {choice['cuda']}{gpu_note}")
