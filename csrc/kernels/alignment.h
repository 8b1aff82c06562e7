// Per-domain gradient inner products on raw pointers.
//
// rowwise_bilinear:  r_n = a_n · (m b_n)            a (N, p), m (p, q), b (N, q)
// ghost_dots:        s_i = Σ_{seg(n)=i} Σ_t (x_n · tx_t)(g_n · tg_t)
//
// All matrices are row-major and contiguous, of one element type. With segment ids,
// results are summed per segment into out[num_segments]; rows whose id lies outside
// [0, num_segments) are skipped (padding uses negative ids; the torch layer reports
// ids that are too large). Without segment ids, out[N] receives r_n.
// `out` is float*, or double* when dtype is f64.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastmix {

void rowwise_bilinear_cpu(DType dtype, const void* a, const void* m, const void* b,
                          int64_t n_rows, int64_t p, int64_t q,
                          const int64_t* segment_ids, int64_t num_segments, void* out);

void ghost_dots_cpu(DType dtype, const void* x, const void* g, const void* target_x,
                    const void* target_g, int64_t n_rows, int64_t n_target_rows,
                    int64_t d_in, int64_t d_out, const int64_t* segment_ids,
                    int64_t num_segments, void* out);

// CUDA versions: same contract, device pointers, `out` zero-filled by the caller when
// segment ids are given, launched on `stream` (a cudaStream_t). Return a CUDA error
// code (0 on success) so the caller can report it.
int rowwise_bilinear_cuda(DType dtype, const void* a, const void* m, const void* b,
                          int64_t n_rows, int64_t p, int64_t q,
                          const int64_t* segment_ids, int64_t num_segments, void* out,
                          void* stream);

int ghost_dots_cuda(DType dtype, const void* x, const void* g, const void* target_x,
                    const void* target_g, int64_t n_rows, int64_t n_target_rows,
                    int64_t d_in, int64_t d_out, const int64_t* segment_ids,
                    int64_t num_segments, void* out, void* stream);

}  // namespace fastmix
