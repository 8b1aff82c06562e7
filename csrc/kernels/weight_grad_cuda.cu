// CUDA kernel for weight_grad_dots (contract in weight_grad.h).
//
// One thread block owns a kTile x kTile tile of the weight gradient (each thread a 4x4
// register tile). It walks the rows piece by piece (the rows before the first domain, each
// domain, the rows after the last), staging kDepth rows of g and x in shared memory at a
// time. When a piece ends, its part of G_i is still in registers: it is added to the
// gradient and dotted with the thread's entries of the target (read once), and the dot is
// reduced over the warp and added to dots[i] with one atomic per warp. Plain CUDA cores,
// no tensor cores: the Triton backend is the fast path on GPUs; this one needs nothing
// beyond the toolkit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "weight_grad.h"

namespace fastmix {
namespace {

constexpr int kTile = 64;      // outputs per block tile, in each dimension
constexpr int kDepth = 16;     // rows staged in shared memory at once
constexpr int kThreads = 256;  // 16 x 16 threads, a 4 x 4 register tile each

__device__ __forceinline__ float widen_input(float v) { return v; }
__device__ __forceinline__ double widen_input(double v) { return v; }
__device__ __forceinline__ float widen_input(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen_input(__half v) { return __half2float(v); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    weight_grad_dots_kernel(const T* x, const T* g, const T* target, const T* target_bias,
                            int64_t n_rows, int64_t d_in, int64_t d_out, const int64_t* offsets,
                            int64_t num_segments, Acc* grad_weight, Acc* grad_bias, Acc* dots) {
  __shared__ Acc g_tile[kDepth][kTile];
  __shared__ Acc x_tile[kDepth][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;  // gradient rows (d_out)
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;  // gradient columns (d_in)
  // This block sums the bias (its threads 0..kTile-1, one output row each) in column tile 0.
  const bool bias_here = blockIdx.x == 0 && (grad_bias != nullptr || target_bias != nullptr);
  const int64_t bias_row = o0 + threadIdx.x;
  const bool bias_thread = bias_here && threadIdx.x < kTile && bias_row < d_out;
  const Acc bias_target =
      (bias_thread && target_bias != nullptr) ? Acc(widen_input(target_bias[bias_row])) : Acc(0);

  Acc v[4][4], total[4][4] = {};
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t o = o0 + ty * 4 + u, i = i0 + tx * 4 + w;
      v[u][w] = (o < d_out && i < d_in) ? Acc(widen_input(target[o * d_in + i])) : Acc(0);
    }
  Acc bias_total = 0;

  int64_t lo = 0;
  for (int64_t j = 0; j < num_segments + 2; ++j) {
    // Piece j ends at offsets[j] clamped into [lo, n_rows] (n_rows for the last piece).
    const int64_t hi = j <= num_segments ? min(max(offsets[j], lo), n_rows) : n_rows;
    if (hi > lo) {
      Acc piece[4][4] = {};
      Acc bias_piece = 0;
      for (int64_t n0 = lo; n0 < hi; n0 += kDepth) {
        for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
          const int kk = e / kTile, col = e % kTile;
          const int64_t n = n0 + kk;
          const bool row_ok = n < hi;
          g_tile[kk][col] = (row_ok && o0 + col < d_out) ? Acc(widen_input(g[n * d_out + o0 + col])) : Acc(0);
          x_tile[kk][col] = (row_ok && i0 + col < d_in) ? Acc(widen_input(x[n * d_in + i0 + col])) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kDepth; ++kk) {
          Acc g_frag[4], x_frag[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) g_frag[u] = g_tile[kk][ty * 4 + u];
#pragma unroll
          for (int w = 0; w < 4; ++w) x_frag[w] = x_tile[kk][tx * 4 + w];
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int w = 0; w < 4; ++w) piece[u][w] += g_frag[u] * x_frag[w];
        }
        if (bias_thread)
          for (int kk = 0; kk < kDepth; ++kk) bias_piece += g_tile[kk][threadIdx.x];
        __syncthreads();
      }
      // The epilogue: the piece joins the gradient and, for a domain, dots with the target.
      Acc dot = 0;
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          total[u][w] += piece[u][w];
          dot += piece[u][w] * v[u][w];
        }
      bias_total += bias_piece;
      dot += bias_piece * bias_target;
      if (j >= 1 && j <= num_segments) {
        dot = warp_sum(dot);
        if (threadIdx.x % 32 == 0) atomicAdd(dots + (j - 1), dot);
      }
    }
    lo = hi;
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t o = o0 + ty * 4 + u, i = i0 + tx * 4 + w;
      if (o < d_out && i < d_in) grad_weight[o * d_in + i] = total[u][w];
    }
  if (bias_thread && grad_bias != nullptr) grad_bias[bias_row] = bias_total;
}

template <typename T, typename Acc>
int launch(const void* x, const void* g, const void* target, const void* target_bias,
           int64_t n_rows, int64_t d_in, int64_t d_out, const int64_t* offsets,
           int64_t num_segments, void* grad_weight, void* grad_bias, void* dots,
           cudaStream_t stream) {
  if (num_segments > 0) {
    const cudaError_t status = cudaMemsetAsync(dots, 0, num_segments * sizeof(Acc), stream);
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  if (d_out == 0) return 0;
  // d_in = 0: no gradient entries, but the bias still sums the rows: one column tile runs.
  const dim3 grid(static_cast<unsigned int>(d_in == 0 ? 1 : (d_in + kTile - 1) / kTile),
                  static_cast<unsigned int>((d_out + kTile - 1) / kTile));
  weight_grad_dots_kernel<T, Acc><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(g), static_cast<const T*>(target),
      static_cast<const T*>(target_bias), n_rows, d_in, d_out, offsets, num_segments,
      static_cast<Acc*>(grad_weight), static_cast<Acc*>(grad_bias), static_cast<Acc*>(dots));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int weight_grad_dots_cuda(DType dtype, const void* x, const void* g, const void* target,
                          const void* target_bias, int64_t n_rows, int64_t d_in, int64_t d_out,
                          const int64_t* offsets, int64_t num_segments, void* grad_weight,
                          void* grad_bias, void* dots, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32: return launch<float, float>(x, g, target, target_bias, n_rows, d_in, d_out, offsets, num_segments, grad_weight, grad_bias, dots, s);
    case DType::f64: return launch<double, double>(x, g, target, target_bias, n_rows, d_in, d_out, offsets, num_segments, grad_weight, grad_bias, dots, s);
    case DType::bf16: return launch<__nv_bfloat16, float>(x, g, target, target_bias, n_rows, d_in, d_out, offsets, num_segments, grad_weight, grad_bias, dots, s);
    case DType::f16: return launch<__half, float>(x, g, target, target_bias, n_rows, d_in, d_out, offsets, num_segments, grad_weight, grad_bias, dots, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastmix
