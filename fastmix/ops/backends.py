"""Which backend runs an op: loading the compiled library, availability, and the choice.

Backends: "cpu" (C++), "cuda" (CUDA C++), "triton", "reference" (pure torch, always there).
`backend=None` takes the first available in the device's preference order; a compiled
library that is missing or fails to load costs one warning, never an error.
"""
import importlib.util
import os
import warnings

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
TRITON_OPS = frozenset({"rowwise_bilinear", "ghost_dots", "weight_grad_dots"})  # ops with a kernel in fastmix/ops/triton
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


class BackendWarning(UserWarning):
    """A compiled backend is unavailable and fastmix uses the next one."""


def _load_compiled():
    try:
        from fastmix import _C  # noqa: F401  (the import registers torch.ops.fastmix.*)
    except Exception as error:  # noqa: BLE001 - any failure to load means "not there"
        warnings.warn(
            f"fastmix: the compiled extension fastmix._C could not be loaded ({error}); "
            "ops use the triton/reference backends. Rebuild with "
            "`pip install --no-build-isolation -e .`, and see `python -m fastmix info`.",
            BackendWarning,
            stacklevel=3,
        )
        return False
    return True


def _compiled_kernels():
    """{(op, dispatch key)} of the kernels fastmix._C registered, read once: a plain set
    lookup later keeps backend choice cheap and traceable by torch.compile."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastmix::")]
    return frozenset(
        (name.split("::", 1)[1], key)
        for name in names
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    )


COMPILED = _load_compiled()
COMPILED_KERNELS = _compiled_kernels() if COMPILED else frozenset()
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreted():
    """True when Triton kernels run on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def has_kernel(op, dispatch_key):
    """Whether fastmix::op has a compiled kernel for dispatch_key ("CPU" or "CUDA")."""
    return (op, dispatch_key) in COMPILED_KERNELS


def available(op, backend, device_type):
    """Whether `backend` can run `op` on tensors of `device_type`."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and has_kernel(op, "CPU")
    if backend == "cuda":
        return device_type == "cuda" and has_kernel(op, "CUDA")
    if backend == "triton":
        return op in TRITON_OPS and TRITON_INSTALLED and (device_type == "cuda" or triton_interpreted())
    return False


def choose(op, device, backend=None):
    """The backend that runs `op` on `device`: `backend` if given (checked), else the
    first available one in the device's preference order."""
    device_type = torch.device(device).type
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton" and op not in TRITON_OPS:
            raise ValueError(f"{op} has no triton backend; use 'cpu', 'cuda', 'reference' or None")
        if not available(op, backend, device_type):
            raise ValueError(
                f"backend={backend!r} cannot run {op} on {device_type} tensors here "
                "(see `python -m fastmix info`)"
            )
        return backend
    for name in PREFERENCE.get(device_type, ("reference",)):
        if available(op, name, device_type):
            return name
    return "reference"
