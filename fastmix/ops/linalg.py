"""Batched thin SVD and ridge leverage scores.

`batched_svd(a)` is `torch.linalg.svd(a, full_matrices=False)` for stacks of small matrices,
by one-sided Jacobi: C++ on CPU (parallel over the batch), CUDA with one thread block per
matrix held in shared memory. Beyond the sizes where those are the fast choice it uses
torch.linalg.svd (see FAST_PATH_NOTE, printed by `fastmix info`).

`ridge_leverage_scores(a, lam, center)` gives, for the rows a_i of each (m, n) matrix,
τ_i = [K (K + λI)⁻¹]_ii with K = a aᵀ (K = H a aᵀ H when centred, H = I − 11ᵀ/m):
from one SVD, τ_i = Σ_j U_ij² σ_j² / (σ_j² + λ) for any number of λ at once; or, when items
far outnumber columns, in the primal form τ_i = a_i · (aᵀa + λI)⁻¹ a_i, streaming the rows
through `rowwise_bilinear` (Triton on GPUs, C++ on CPU) without any m x m matrix.
"""
import math
import numbers

import torch

from fastmix.ops import _fake, backends, reference
from fastmix.ops.alignment import FLOAT_DTYPES, rowwise_bilinear

OPS = ("batched_svd",)

# CPU: the C++ Jacobi runs batches of at least _CPU_JACOBI_MIN_BATCH matrices with
# min(m, n) <= _CPU_JACOBI_MAX_P, and batches of at least _CPU_JACOBI_WIDE_MIN_BATCH with
# min(m, n) <= _CPU_JACOBI_WIDE_MAX_P: measured faster than LAPACK through ATen there on the
# 2-core development machine (float32 / float64: ~8x at 1024x8x8, ~3.5x at 64x32x32, ~2.2x /
# 1.65x at 1024x64x64, ~1.5x / 1.3x at 64x96x96, ~0.9x / 1.2x at 8x96x96 (one 8-matrix
# group, one thread), ~0.9-1.7x at 128x128 (noisy), ~0.3x at 256x256); everything else
# goes to torch.linalg.svd.
_CPU_JACOBI_MAX_P = 64
_CPU_JACOBI_MIN_BATCH = 8
_CPU_JACOBI_WIDE_MAX_P = 96
_CPU_JACOBI_WIDE_MIN_BATCH = 16
# CUDA: one block holds W (p x q), Z (p x p) and 2p values of the compute type, plus p ints
# and p flags (csrc/kernels/svd_cuda.cu, shared_bytes), plus static shared memory.
_CUDA_STATIC_SHARED = 1024
# ridge_leverage_scores(method="auto") streams the primal form when the matrix is 2-D,
# every λ > 0, m >= _PRIMAL_RATIO * n and m >= _PRIMAL_MIN_ROWS.
_PRIMAL_RATIO = 8
_PRIMAL_MIN_ROWS = 4096

FAST_PATH_NOTE = (
    "batched_svd fast path: CPU, C++ one-sided Jacobi for batches >= "
    f"{_CPU_JACOBI_MIN_BATCH} with min(m, n) <= {_CPU_JACOBI_MAX_P} (batches >= "
    f"{_CPU_JACOBI_WIDE_MIN_BATCH} with min(m, n) <= {_CPU_JACOBI_WIDE_MAX_P}), else torch.linalg.svd "
    "(LAPACK); CUDA, one-sided Jacobi with a "
    "matrix per thread block when it fits in shared memory: "
    "b*(m*n + p*p + 2p) + 5p + 1 KiB <= the GPU's per-block opt-in limit (p = min(m, n), "
    "b = 4 for float32, 8 for float64; on an H100's 227 KiB: 64x64, 128x128, 64x256 in "
    "float32), else torch.linalg.svd. float16/bfloat16 inputs are computed in float32. "
    "ridge_leverage_scores streams the primal form through rowwise_bilinear for 2-D inputs "
    f"with m >= {_PRIMAL_RATIO}*n, m >= {_PRIMAL_MIN_ROWS} and lam > 0."
)
SVD_FAST_PATH = FAST_PATH_NOTE


# ---------------------------------------------------------------- argument checks
def _check_input(name, a, min_dim=2):
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {a.dtype}")
    if a.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims (..., m, n), got shape "
                         f"{tuple(a.shape)}")
    if a.numel() and not bool(torch.isfinite(a).all()):  # a host sync on GPUs
        raise ValueError(f"{name} contains NaN or infinity; SVD and leverage scores need "
                         "finite values")


def _compute_dtype(dtype, compute_dtype):
    if compute_dtype is None:
        return reference.accumulation_dtype(dtype)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32, torch.float64 or None, got "
                         f"{compute_dtype!r}")
    return compute_dtype


# ---------------------------------------------------------------- batched_svd
def cuda_shared_bytes(m, n, dtype):
    """Shared memory one CUDA block needs for an (m, n) matrix (as the kernel lays it out)."""
    p, q = min(m, n), max(m, n)
    size = 8 if dtype == torch.float64 else 4
    return size * (p * q + p * p + 2 * p) + 5 * p + _CUDA_STATIC_SHARED


def _cuda_fits(m, n, dtype, device):
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return cuda_shared_bytes(m, n, dtype) <= limit


def svd_backend(device, backend=None):
    """The backend batched_svd uses on `device`: "cpu", "cuda" or "reference"."""
    return backends.choose("batched_svd", device, backend)


def _cpu_jacobi_faster(p, batch):
    """Whether the CPU Jacobi kernel beats torch.linalg.svd for `batch` matrices with
    min(m, n) = p (the measured crossover above)."""
    return ((p <= _CPU_JACOBI_MAX_P and batch >= _CPU_JACOBI_MIN_BATCH)
            or (p <= _CPU_JACOBI_WIDE_MAX_P and batch >= _CPU_JACOBI_WIDE_MIN_BATCH))


def _svd_flat(a, backend):
    """a (B, m, n) contiguous float32/float64 -> (U, S, Vh) by the chosen backend."""
    m, n = a.shape[-2:]
    name = svd_backend(a.device, backend)
    if name != "reference" and a.numel():
        explicit = backend is not None
        if name == "cpu" and (explicit or _cpu_jacobi_faster(min(m, n), a.shape[0])):
            return torch.ops.fastmix.batched_svd(a)
        if name == "cuda" and (explicit or _cuda_fits(m, n, a.dtype, a.device)):
            return torch.ops.fastmix.batched_svd(a)
    return reference.batched_svd(a)


def batched_svd(a, *, backend=None, compute_dtype=None):
    """Thin SVD of every (m, n) matrix of `a` (..., m, n): returns U (..., m, p),
    S (..., p) descending and Vh (..., p, n), p = min(m, n), with a = U diag(S) Vh, like
    `torch.linalg.svd(a, full_matrices=False)` (singular vectors are defined up to sign).

    Results are float32 (float64 for float64 inputs). `compute_dtype=torch.float64` computes
    in float64 and returns float32 for float32 inputs. NaN or infinity raise ValueError.
    `backend`: None (fastest here), "cpu", "cuda" or "reference" (torch.linalg.svd); an
    explicit "cpu"/"cuda" runs the Jacobi kernel whatever the size (CUDA: if it fits).
    """
    _check_input("a", a)
    out_dtype = reference.accumulation_dtype(a.dtype)
    work = _compute_dtype(a.dtype, compute_dtype)
    *batch, m, n = a.shape
    p = min(m, n)
    flat = a.reshape(math.prod(batch), m, n).to(work).contiguous()
    u, s, vh = _svd_flat(flat, backend)
    return (u.to(out_dtype).reshape(*batch, m, p), s.to(out_dtype).reshape(*batch, p),
            vh.to(out_dtype).reshape(*batch, p, n))


# ---------------------------------------------------------------- leverage scores
def _lambdas(lam, device):
    """lam as a float64 1-D tensor, and whether it was a scalar."""
    if isinstance(lam, bool):
        raise TypeError("lam must be a number or a 1-D tensor of numbers, got a bool")
    if isinstance(lam, numbers.Real):
        values, scalar = torch.tensor([float(lam)], dtype=torch.float64), True
    elif isinstance(lam, torch.Tensor):
        if lam.dim() > 1 or lam.dtype.is_complex or lam.dtype == torch.bool:
            raise ValueError(f"lam must be a number or a 1-D real tensor, got shape "
                             f"{tuple(lam.shape)} and dtype {lam.dtype}")
        values, scalar = lam.detach().to("cpu", torch.float64).reshape(-1), lam.dim() == 0
    elif isinstance(lam, (list, tuple)):
        values, scalar = torch.tensor([float(v) for v in lam], dtype=torch.float64), False
    else:
        raise TypeError(f"lam must be a number or a 1-D tensor, got {type(lam).__name__}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"lam must be finite and >= 0, got {values.tolist()}")
    return values.to(device), scalar


def leverage_weights(s, lams, rtol=None):
    """σ²/(σ² + λ) for s (..., p) and lams (L,) as (..., L, p) in float64; singular values
    at or below rtol·σ_max count as zero (so λ = 0 gives the rank-aware ordinary leverage)."""
    s = s.to(torch.float64)
    if rtol is None:
        rtol = 0.0
    top = s.amax(-1, keepdim=True) if s.shape[-1] else s.sum(-1, keepdim=True)
    keep = s > rtol * top
    s2 = (s * s).unsqueeze(-2)
    lam = lams.reshape(-1, 1)
    # s2 / (s2 + lam), written to be exact at lam = 0 and safe at s = 0
    weights = torch.where(lam > 0, s2 / (s2 + lam), torch.ones_like(s2))
    return torch.where(keep.unsqueeze(-2), weights, torch.zeros_like(weights))


def _default_rtol(m, n, dtype):
    return max(m, n) * torch.finfo(dtype).eps


def _leverage_svd(a, scale, lams, rtol, backend, compute_dtype):
    """Scores of the matrices a (..., m, n) that were divided by `scale` (..., 1, 1)."""
    u, s, _ = batched_svd(a, backend=backend, compute_dtype=compute_dtype)
    s = s.to(torch.float64) * scale.squeeze(-1).to(torch.float64)  # σ of the unscaled input
    weights = leverage_weights(s, lams, rtol).to(u.dtype)  # (..., L, p)
    return torch.einsum("...mp,...lp->...lm", u * u, weights)


def _gram(a):
    """aᵀa in float64, accumulated over row chunks (a is never copied whole)."""
    n = a.shape[-1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=a.device)
    chunk = max(1, (1 << 24) // max(n, 1))
    for start in range(0, a.shape[0], chunk):
        block = a[start:start + chunk].to(torch.float64)
        gram += block.T @ block
    return gram


# Matrices whose largest |entry| lies in this range are used as they are: their σ² and
# centring sums fit float32 for any size this library handles. Outside it they are scaled.
_UNSCALED_RANGE = (2.0**-40, 2.0**40)


def _power_of_two_scale(x):
    """(..., 1, 1): 1 for every (m, n) matrix of x (..., m, n) whose largest |entry| is in
    _UNSCALED_RANGE (or 0); else 2^e with 2^e ≤ max|x| < 2^(e+1), which divides x exactly to
    at most 2 in magnitude, so that neither the centring mean nor the SVD of inputs near the
    dtype's largest value overflows (their top singular value may not fit), nor tiny ones
    underflow."""
    ones = torch.ones(*x.shape[:-2], 1, 1, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return ones
    # max |x| without a copy (abs) or vector_norm's slow inf-norm path: the larger of max and -min
    top = torch.maximum(x.amax((-2, -1), keepdim=True), -x.amin((-2, -1), keepdim=True))
    _, exponent = torch.frexp(top)
    low, high = _UNSCALED_RANGE
    return torch.where((top == 0) | ((top >= low) & (top <= high)), ones, torch.ldexp(ones, exponent - 1))


def _leverage_primal(a, lams, rtol, backend):
    """τ_i = a_i · (aᵀa + λI)⁻¹ a_i for 2-D a, streaming the rows through rowwise_bilinear."""
    work = reference.accumulation_dtype(a.dtype)
    a = a.to(work).contiguous()
    evals, evecs = torch.linalg.eigh(_gram(a))
    evals = evals.clamp_min(0)
    # eigenvalues of aᵀa are σ², so rtol applies to their square roots; and eigh of the
    # float64 Gram matrix is only accurate to about n·eps·σ_max²: below that an eigenvalue
    # is noise, and 1/λ at λ = 0 would blow it up
    top = float(evals.max()) if evals.numel() else 0.0
    floor = max((rtol * top ** 0.5) ** 2, evals.shape[-1] * torch.finfo(torch.float64).eps * top)
    keep = evals > floor
    rows = []
    for lam in lams.tolist():
        inv = torch.where(keep, 1.0 / (evals + lam) if lam > 0 else 1.0 / evals,
                          torch.zeros_like(evals))
        inverse = (evecs * inv) @ evecs.T
        rows.append(rowwise_bilinear(a, inverse.to(work), a, backend=backend))
    return torch.stack(rows)


def ridge_leverage_scores(a, lam, center=False, *, method="auto", backend=None, rtol=None,
                          compute_dtype=None):
    """Ridge leverage scores of the rows (items) of every (m, n) matrix of `a` (..., m, n):
    τ_i = [K (K + λI)⁻¹]_ii with K = a aᵀ, or K = H a aᵀ H (columns centred over the items)
    when `center`. `lam` a number -> (..., m); a 1-D tensor (or list) of L values ->
    (..., L, m), all from one decomposition. λ = 0 gives ordinary leverage scores, rank-aware:
    singular values at or below rtol·σ_max (default max(m, n)·eps of the compute dtype)
    count as zero.

    method: "svd" (τ_i = Σ_j U_ij² σ_j²/(σ_j² + λ), from batched_svd), "primal"
    (τ_i = a_i · (aᵀa + λI)⁻¹ a_i: the float64 Gram matrix, then the rows streamed once per λ
    through rowwise_bilinear; 2-D inputs only; it squares the condition number, so prefer
    it for λ well above the small singular values), or "auto" (primal for 2-D inputs with
    m >= 8n, m >= 4096 and every λ > 0; else svd). Results are float32 (float64 for
    float64 inputs).
    """
    _check_input("a", a)
    if method not in ("auto", "svd", "primal"):
        raise ValueError(f"method must be 'auto', 'svd' or 'primal', got {method!r}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    lams, scalar = _lambdas(lam, a.device)
    out_dtype = reference.accumulation_dtype(a.dtype)
    work = _compute_dtype(a.dtype, compute_dtype)
    *batch, m, n = a.shape
    if rtol is None:
        rtol = _default_rtol(m, n, work)
    elif isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 <= rtol < math.inf:
        raise ValueError(f"rtol must be a finite number >= 0 (or None for the default), got {rtol!r}")
    # τ is unchanged when a is scaled by c and λ by c²: work on a / c, c a power of two
    x = a.to(work)
    scale = _power_of_two_scale(x)
    if bool((scale != 1).any()):  # most inputs need no division (and no copy)
        x = x / scale
    if center:
        x = x - x.mean(-2, keepdim=True)
    if method == "auto":
        primal = (a.dim() == 2 and m >= _PRIMAL_RATIO * n and m >= _PRIMAL_MIN_ROWS
                  and bool((lams > 0).all()))
        method = "primal" if primal else "svd"
    if method == "primal":
        if a.dim() != 2:
            raise ValueError(f"method='primal' needs a 2-D a (m, n), got shape {tuple(a.shape)}")
        scores = _leverage_primal(x, lams / float(scale) ** 2, rtol, backend)
    elif m == 0 or n == 0:
        scores = torch.zeros(*batch, lams.numel(), m, dtype=work, device=a.device)
    else:
        svd_backend(a.device, backend)  # reject a backend batched_svd cannot use
        scores = _leverage_svd(x, scale, lams, rtol, backend, compute_dtype)
    scores = scores.to(out_dtype)
    return scores.squeeze(-2) if scalar else scores


# ---------------------------------------------------------------- torch.compile support
if backends.COMPILED:
    torch.library.register_fake("fastmix::batched_svd")(_fake.batched_svd)
