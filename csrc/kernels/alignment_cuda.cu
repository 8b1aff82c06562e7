// CUDA kernels for rowwise_bilinear and ghost_dots (contract in alignment.h).
//
// One thread block owns kTile rows. Their products with kTile rows of the other operand
// are built as a shared-memory tiled GEMM (each thread a 4x4 register tile) and folded
// into per-row sums in the epilogue, so no N x p (or N x M) product ever reaches global
// memory. Per-row sums are then written, or added to their segment with one atomic each.
// Plain CUDA cores, no tensor cores: the Triton backend is the fast path on GPUs; this
// one needs nothing beyond the toolkit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "alignment.h"

namespace fastmix {
namespace {

constexpr int kTile = 64;    // rows per block tile, of each operand
constexpr int kDepth = 16;   // slice of the shared dimension staged in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, a 4 x 4 register tile each

__device__ __forceinline__ float widen_input(float v) { return v; }
__device__ __forceinline__ double widen_input(double v) { return v; }
__device__ __forceinline__ float widen_input(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen_input(__half v) { return __half2float(v); }

// acc[u][v] += Σ_k A[ty*4+u][k] * B[tx*4+v][k] over the shared dimension `depth`, for the
// kTile rows of A and of B starting at the given pointers (rows past a_rows/b_rows are 0).
template <typename T, typename Acc>
__device__ void tile_product(const T* A, int64_t a_rows, const T* B, int64_t b_rows,
                             int64_t depth, Acc (&acc)[4][4], Acc (&a_tile)[kDepth][kTile],
                             Acc (&b_tile)[kDepth][kTile]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
      const int row = e / kDepth, kk = e % kDepth;
      const bool in_depth = k0 + kk < depth;
      a_tile[kk][row] = (row < a_rows && in_depth) ? Acc(widen_input(A[row * depth + k0 + kk])) : Acc(0);
      b_tile[kk][row] = (row < b_rows && in_depth) ? Acc(widen_input(B[row * depth + k0 + kk])) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      Acc a_frag[4], b_frag[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a_frag[u] = a_tile[kk][ty * 4 + u];
#pragma unroll
      for (int v = 0; v < 4; ++v) b_frag[v] = b_tile[kk][tx * 4 + v];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += a_frag[u] * b_frag[v];
    }
    __syncthreads();
  }
}

// Writes the block's per-row sums: to out[row], or added to out[segment_ids[row]].
template <typename Acc>
__device__ void store_rows(const Acc* row_sum, int64_t r0, int64_t n_rows,
                           const int64_t* segment_ids, int64_t num_segments, Acc* out) {
  __syncthreads();
  if (threadIdx.x >= kTile || r0 + threadIdx.x >= n_rows) return;
  const int64_t row = r0 + threadIdx.x;
  if (!segment_ids) {
    out[row] = row_sum[threadIdx.x];
  } else {
    const int64_t id = segment_ids[row];
    if (id >= 0 && id < num_segments) atomicAdd(out + id, row_sum[threadIdx.x]);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    rowwise_bilinear_kernel(const T* a, const T* m, const T* b, int64_t n_rows, int64_t p,
                            int64_t q, const int64_t* segment_ids, int64_t num_segments,
                            Acc* out) {
  __shared__ Acc a_tile[kDepth][kTile];
  __shared__ Acc b_tile[kDepth][kTile];
  __shared__ Acc row_sum[kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (threadIdx.x < kTile) row_sum[threadIdx.x] = 0;
  __syncthreads();  // before any thread adds to it (tile_product's own barriers are skipped at depth 0)
  for (int64_t o0 = 0; o0 < p; o0 += kTile) {
    Acc acc[4][4] = {};
    tile_product(b + r0 * q, n_rows - r0, m + o0 * q, p - o0, q, acc, a_tile, b_tile);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t row = r0 + ty * 4 + u;
      if (row >= n_rows) continue;
      Acc partial = 0;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int64_t o = o0 + tx * 4 + v;
        if (o < p) partial += acc[u][v] * Acc(widen_input(a[row * p + o]));
      }
      atomicAdd(row_sum + ty * 4 + u, partial);
    }
  }
  store_rows(row_sum, r0, n_rows, segment_ids, num_segments, out);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    ghost_dots_kernel(const T* x, const T* g, const T* target_x, const T* target_g,
                      int64_t n_rows, int64_t n_target, int64_t d_in, int64_t d_out,
                      const int64_t* segment_ids, int64_t num_segments, Acc* out) {
  __shared__ Acc a_tile[kDepth][kTile];
  __shared__ Acc b_tile[kDepth][kTile];
  __shared__ Acc row_sum[kTile];
  const int ty = threadIdx.x / 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (threadIdx.x < kTile) row_sum[threadIdx.x] = 0;
  __syncthreads();  // before any thread adds to it (tile_product's own barriers are skipped at depth 0)
  for (int64_t t0 = 0; t0 < n_target; t0 += kTile) {
    Acc x_dots[4][4] = {}, g_dots[4][4] = {};
    tile_product(x + r0 * d_in, n_rows - r0, target_x + t0 * d_in, n_target - t0, d_in, x_dots,
                 a_tile, b_tile);
    tile_product(g + r0 * d_out, n_rows - r0, target_g + t0 * d_out, n_target - t0, d_out,
                 g_dots, a_tile, b_tile);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      Acc partial = 0;
#pragma unroll
      for (int v = 0; v < 4; ++v) partial += x_dots[u][v] * g_dots[u][v];  // 0 past n_target
      if (r0 + ty * 4 + u < n_rows) atomicAdd(row_sum + ty * 4 + u, partial);
    }
  }
  store_rows(row_sum, r0, n_rows, segment_ids, num_segments, out);
}

unsigned int blocks_for(int64_t n_rows) {
  return static_cast<unsigned int>((n_rows + kTile - 1) / kTile);
}

template <typename T, typename Acc>
int launch_bilinear(const void* a, const void* m, const void* b, int64_t n_rows, int64_t p,
                    int64_t q, const int64_t* segment_ids, int64_t num_segments, void* out,
                    cudaStream_t stream) {
  rowwise_bilinear_kernel<T, Acc><<<blocks_for(n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(m), static_cast<const T*>(b), n_rows, p,
      q, segment_ids, num_segments, static_cast<Acc*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename Acc>
int launch_ghost(const void* x, const void* g, const void* target_x, const void* target_g,
                 int64_t n_rows, int64_t n_target, int64_t d_in, int64_t d_out,
                 const int64_t* segment_ids, int64_t num_segments, void* out,
                 cudaStream_t stream) {
  ghost_dots_kernel<T, Acc><<<blocks_for(n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(g), static_cast<const T*>(target_x),
      static_cast<const T*>(target_g), n_rows, n_target, d_in, d_out, segment_ids,
      num_segments, static_cast<Acc*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int rowwise_bilinear_cuda(DType dtype, const void* a, const void* m, const void* b,
                          int64_t n_rows, int64_t p, int64_t q, const int64_t* segment_ids,
                          int64_t num_segments, void* out, void* stream) {
  if (n_rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32: return launch_bilinear<float, float>(a, m, b, n_rows, p, q, segment_ids, num_segments, out, s);
    case DType::f64: return launch_bilinear<double, double>(a, m, b, n_rows, p, q, segment_ids, num_segments, out, s);
    case DType::bf16: return launch_bilinear<__nv_bfloat16, float>(a, m, b, n_rows, p, q, segment_ids, num_segments, out, s);
    case DType::f16: return launch_bilinear<__half, float>(a, m, b, n_rows, p, q, segment_ids, num_segments, out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int ghost_dots_cuda(DType dtype, const void* x, const void* g, const void* target_x,
                    const void* target_g, int64_t n_rows, int64_t n_target_rows, int64_t d_in,
                    int64_t d_out, const int64_t* segment_ids, int64_t num_segments, void* out,
                    void* stream) {
  if (n_rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32: return launch_ghost<float, float>(x, g, target_x, target_g, n_rows, n_target_rows, d_in, d_out, segment_ids, num_segments, out, s);
    case DType::f64: return launch_ghost<double, double>(x, g, target_x, target_g, n_rows, n_target_rows, d_in, d_out, segment_ids, num_segments, out, s);
    case DType::bf16: return launch_ghost<__nv_bfloat16, float>(x, g, target_x, target_g, n_rows, n_target_rows, d_in, d_out, segment_ids, num_segments, out, s);
    case DType::f16: return launch_ghost<__half, float>(x, g, target_x, target_g, n_rows, n_target_rows, d_in, d_out, segment_ids, num_segments, out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastmix
