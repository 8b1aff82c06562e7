"""Builds fastmix._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and
a CUDA build of torch are present (no GPU needed). Environment:
  FASTMIX_CUDA=0|1       force the CUDA kernels off or on (on: a failure is an error)
  TORCH_CUDA_ARCH_LIST   GPU targets; default without a visible GPU: "8.0;9.0+PTX"
  CUDA_HOME / CUDA_PATH  the CUDA toolkit; else /usr/local/cuda; else the real nvcc on PATH
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

CSRC = "csrc"


def find_cuda_home():
    """The toolkit root that holds both nvcc and the CUDA headers and libraries.

    torch's own lookup takes the parent of the first `nvcc` on PATH; a wrapper script in
    /usr/local/bin would then make /usr/local the toolkit, and the link fails. So check
    each candidate for the runtime header and follow symlinks of nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


def cuda_requested():
    forced = os.environ.get("FASTMIX_CUDA") or None  # empty counts as unset
    if forced not in (None, "0", "1"):
        sys.exit(f"FASTMIX_CUDA must be 0 or 1, got {forced!r}")
    return forced


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

FORCED = cuda_requested()
if FORCED == "1" and not (CUDA_HOME and torch.version.cuda):
    sys.exit("FASTMIX_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
WITH_CUDA = FORCED == "1" or (FORCED is None and bool(CUDA_HOME) and torch.version.cuda is not None)

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # +PTX: GPUs newer than Hopper compile the kernels at load instead of failing to launch
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def extension(with_cuda):
    torch_sources = sorted(glob.glob(f"{CSRC}/torch/*.cpp"))
    sources = sorted(glob.glob(f"{CSRC}/kernels/*.cpp"))
    if with_cuda:
        sources += torch_sources + sorted(glob.glob(f"{CSRC}/kernels/*.cu"))
    else:
        sources += [s for s in torch_sources if not s.endswith("_cuda.cpp")]
    compile_args = {"cxx": ["-O3", "-fopenmp"]}  # the C++ standard is torch's choice
    macros = []
    if with_cuda:
        compile_args["nvcc"] = ["-O3"]
        # Recorded in fastmix._C for `fastmix info`; a bare token survives every shell.
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "default")
        token = "".join(c if c.isalnum() or c == "." else "_" for c in archs)
        macros += [("FASTMIX_WITH_CUDA", "1"), ("FASTMIX_CUDA_ARCHS", token)]
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        "fastmix._C",
        sources,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=macros,
    )


class BuildWithFallback(BuildExtension):
    """Builds with CUDA when it can; if the CUDA build fails (and was not forced), warns
    once and builds the CPU kernels alone, so an install never fails on the GPU part."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as error:  # noqa: BLE001 - any compiler failure
            if not WITH_CUDA or FORCED == "1":
                raise
            warnings.warn(
                f"fastmix: building the CUDA kernels failed ({error}); "
                "building the CPU kernels only. Set FASTMIX_CUDA=1 to make this an error."
            )
            self.extensions = [extension(with_cuda=False)]
            super().build_extensions()


setup(
    ext_modules=[extension(WITH_CUDA)],
    cmdclass={"build_ext": BuildWithFallback.with_options(use_ninja=True)},
)
