// The weight gradient of a linear layer with its per-domain dots, in one pass.
//
// With the rows of a batch grouped by domain (segment i = rows [offsets[i], offsets[i+1])),
// the weight gradient is a sum of per-domain pieces G_i = Δ_iᵀ X_i. The kernels compute it
// segment by segment and, while each piece is still in registers, dot it with the same tile
// of the target V (d_out, d_in), so all k scores ⟨G_i, V⟩ cost k·d_in·d_out multiply-adds
// and one read of V on top of the GEMM:
//
//   grad_weight = Σ_n g_nᵀ x_n               (d_out, d_in), every row n < n_rows
//   grad_bias   = Σ_n g_n                    (d_out), when grad_bias is not null
//   dots[i]     = ⟨G_i, V⟩ + ⟨Σ_{n∈i} g_n, target_bias⟩ (the second term when target_bias
//                 is not null)
//
// x (n_rows, d_in), g (n_rows, d_out), target (d_out, d_in) and target_bias (d_out) are
// row-major, contiguous, of one element type. offsets has num_segments + 1 entries; rows
// before offsets[0] or from offsets[num_segments] on count in the gradients but in no
// segment. The kernels clamp each offset into [previous offset, n_rows], so bad offsets
// never read out of bounds (the torch layer reports them). Outputs are float* (double*
// for f64 inputs), accumulated in float32 or wider, and overwritten.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastmix {

void weight_grad_dots_cpu(DType dtype, const void* x, const void* g, const void* target,
                          const void* target_bias, int64_t n_rows, int64_t d_in, int64_t d_out,
                          const int64_t* offsets, int64_t num_segments, void* grad_weight,
                          void* grad_bias, void* dots);

// The epilogue of a piece G_i formed elsewhere (the torch layer forms large segments' pieces
// with a BLAS GEMM): returns Σ_j piece[j]·v[j] over j < count and, when out is not null, adds
// the piece into out. The sum runs in fixed chunks (float lanes within one, double across), so
// it is the same for any number of threads.
double add_piece_dot_cpu(const float* piece, float* out, const float* v, int64_t count);
double add_piece_dot_cpu(const double* piece, double* out, const double* v, int64_t count);

// CUDA version: same contract, device pointers, launched on `stream` (a cudaStream_t).
// Returns a CUDA error code (0 on success) so the caller can report it.
int weight_grad_dots_cuda(DType dtype, const void* x, const void* g, const void* target,
                          const void* target_bias, int64_t n_rows, int64_t d_in, int64_t d_out,
                          const int64_t* offsets, int64_t num_segments, void* grad_weight,
                          void* grad_bias, void* dots, void* stream);

}  // namespace fastmix
