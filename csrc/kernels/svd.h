// Batched thin SVD by one-sided (Hestenes) Jacobi, on raw pointers.
//
// For each of `batch` row-major matrices A (m x n), with p = min(m, n):
//   u  (m x p), s (p), vh (p x n)   with A = u diag(s) vh, s descending,
// u and vh with orthonormal columns / rows (null directions completed to an orthonormal
// set), like LAPACK's gesdd with full_matrices=False (signs may differ).
//
// Method (the CUDA kernel; the CPU kernel differs as said in svd_cpu.cpp: it rotates the
// rows of R from a pivoted QR of W0ᵀ, does not accumulate Z, and derives the other side
// from one product):
// W holds the p "short side" vectors of A as rows (the columns of A when m >= n,
// else the rows of A) scaled by a power of two so no square overflows; pairs of rows of W
// are rotated until every pair is orthogonal to a relative tolerance (|w_i·w_j| <=
// tol ||w_i|| ||w_j||, tol = sqrt(q) eps), accumulating the rotations in Z (p x p). Then
// W = Z W0, so W0 = Zᵀ diag(s) Ũ with Ũ the normalised rows of W: for m >= n, u = Ũᵀ and
// vh = Z; for m < n, u = Zᵀ and vh = Ũ. Rows of W whose norm is below p·eps of the largest
// are null: Ũ's row there is replaced by a unit vector orthogonal to all others.
//
// Inputs must be finite (the torch layer checks); the sweep count is bounded anyway.
// dtype is f32 or f64 (the torch layer converts f16/bf16); u, s, vh have the input dtype.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastmix {

// Sweeps after which the Jacobi iteration stops even if not converged (it converges
// quadratically; random 256 x 256 matrices need about 10).
constexpr int kSvdMaxSweeps = 60;

// CPU: OpenMP-parallel over the batch.
void batched_svd_cpu(DType dtype, const void* a, int64_t batch, int64_t m, int64_t n, void* u,
                     void* s, void* vh);

// CUDA: one thread block per matrix, W and Z in shared memory (dynamic), parallel
// (round-robin) pair ordering. Launched on `stream` (a cudaStream_t); returns a CUDA error
// code (0 on success). `svd_cuda_shared_bytes` is the shared memory one block needs:
// callers check it against the device's opt-in limit before calling (the fast path).
int64_t svd_cuda_shared_bytes(DType dtype, int64_t m, int64_t n);
int batched_svd_cuda(DType dtype, const void* a, int64_t batch, int64_t m, int64_t n, void* u,
                     void* s, void* vh, void* stream);

}  // namespace fastmix
