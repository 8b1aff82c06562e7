// CUDA batched thin SVD by one-sided Jacobi (contract and method in svd.h).
//
// One thread block per matrix; W (p x q) and Z (p x p) live in dynamic shared memory for
// the whole iteration. Pairs are visited in round-robin (circle-method) order: each of the
// P - 1 rounds of a sweep (P = p rounded up to even) holds P/2 disjoint pairs, spread over
// the warps; a warp computes the pair's three dot products with lane-strided loads and
// shuffles, then rotates both rows. A sweep with no rotation ends the iteration.
// Storage and dot products are in the input type; the rotation (c, s and the rotated
// values) is computed in double, so float storage drifts from orthogonal only by its
// rounding (a float c, s makes c² + s² ≠ 1 and V drifts by ~1e-5 at 64 x 64).
// Untested on a GPU at the time of writing: it compiles; the CPU kernel is the tested twin.
#include <cuda_runtime.h>

#include "svd.h"

namespace fastmix {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);  // every lane takes the same branch on it
}

// Dynamic shared memory of one block: w (p*q), z (p*p), sigma (p), proj (p) of T, then
// order (p ints), then accepted (p chars). Keep in step with fastmix/ops/linalg.py.
template <typename T>
__host__ __device__ int64_t shared_bytes(int64_t p, int64_t q) {
  return static_cast<int64_t>(sizeof(T)) * (p * q + p * p + 2 * p) + 4 * p + p;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    svd_kernel(const T* __restrict__ a, int m, int n, T* __restrict__ u, T* __restrict__ s,
               T* __restrict__ vh, double eps) {
  extern __shared__ __align__(16) unsigned char smem[];
  const bool tall = m >= n;
  const int p = tall ? n : m, q = tall ? m : n;
  T* w = reinterpret_cast<T*>(smem);
  T* z = w + static_cast<int64_t>(p) * q;
  T* sigma = z + static_cast<int64_t>(p) * p;
  T* proj = sigma + p;
  int* order = reinterpret_cast<int*>(proj + p);
  char* accepted = reinterpret_cast<char*>(order + p);
  __shared__ double reduce_value[kWarps];
  __shared__ int reduce_index[kWarps];
  __shared__ int flag, exponent, best_k;
  __shared__ double scalar;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t mn = static_cast<int64_t>(m) * n;
  a += blockIdx.x * mn;
  u += blockIdx.x * static_cast<int64_t>(m) * p;
  s += blockIdx.x * static_cast<int64_t>(p);
  vh += blockIdx.x * static_cast<int64_t>(p) * n;

  // 1. Scale by a power of two (exact) so no square overflows or underflows; load W, Z = I.
  double amax = 0;
  for (int64_t k = tid; k < mn; k += kThreads) amax = fmax(amax, fabs(double(a[k])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    amax = fmax(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (lane == 0) reduce_value[warp] = amax;
  __syncthreads();
  if (tid == 0) {
    double top = 0;
    for (int k = 0; k < kWarps; ++k) top = fmax(top, reduce_value[k]);
    int e = 0;
    if (top > 0) frexp(top, &e);
    exponent = e;
  }
  __syncthreads();
  for (int64_t k = tid; k < mn; k += kThreads) {
    const int64_t r = k / n, c = k % n;
    // ldexp on each entry, not a product with 2^-e: for a subnormal top, 2^-e overflows
    const T v = static_cast<T>(ldexp(double(a[k]), -exponent));
    if (tall) w[c * q + r] = v; else w[k] = v;
  }
  for (int64_t k = tid; k < static_cast<int64_t>(p) * p; k += kThreads)
    z[k] = (k / p == k % p) ? T(1) : T(0);
  __syncthreads();

  // 2. Sweeps of P - 1 rounds of P / 2 disjoint pairs.
  const int P = p + (p & 1);
  const double tol = sqrt(double(q)) * eps;
  for (int sweep = 0; sweep < kSvdMaxSweeps; ++sweep) {
    if (tid == 0) flag = 0;
    __syncthreads();
    for (int round = 0; round + 1 < P; ++round) {
      for (int k = warp; k < P / 2; k += kWarps) {
        int x, y;
        if (k == 0) {
          x = round;
          y = P - 1;
        } else {
          x = (round + k) % (P - 1);
          y = (round - k + (P - 1)) % (P - 1);
        }
        const int i = min(x, y), j = max(x, y);
        if (j >= p) continue;  // the dummy partner of an odd p
        T* wi = w + static_cast<int64_t>(i) * q;
        T* wj = w + static_cast<int64_t>(j) * q;
        T alpha = 0, beta = 0, gamma = 0;
        for (int e = lane; e < q; e += 32) {
          const T xi = wi[e], xj = wj[e];
          alpha += xi * xi;
          beta += xj * xj;
          gamma += xi * xj;
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        if (!(alpha > 0) || !(beta > 0)) continue;
        if (!(fabs(double(gamma)) > tol * sqrt(double(alpha)) * sqrt(double(beta)))) continue;
        const double zeta = (double(beta) - double(alpha)) / (2.0 * double(gamma));
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + hypot(1.0, zeta));
        if (!(t != 0) || !isfinite(t)) continue;
        const double c = rsqrt(1.0 + t * t), sn = c * t;
        for (int e = lane; e < q; e += 32) {
          const double xi = wi[e], xj = wj[e];
          wi[e] = static_cast<T>(c * xi - sn * xj);
          wj[e] = static_cast<T>(sn * xi + c * xj);
        }
        T* zi = z + static_cast<int64_t>(i) * p;
        T* zj = z + static_cast<int64_t>(j) * p;
        for (int e = lane; e < p; e += 32) {
          const double xi = zi[e], xj = zj[e];
          zi[e] = static_cast<T>(c * xi - sn * xj);
          zj[e] = static_cast<T>(sn * xi + c * xj);
        }
        if (lane == 0) flag = 1;
      }
      __syncthreads();
    }
    const bool converged = flag == 0;
    __syncthreads();
    if (converged) break;
  }

  // 3. Singular values; normalise the non-null rows.
  for (int i = warp; i < p; i += kWarps) {
    const T* wi = w + static_cast<int64_t>(i) * q;
    double sum = 0;
    for (int e = lane; e < q; e += 32) sum += double(wi[e]) * double(wi[e]);
    sum = warp_sum(sum);
    if (lane == 0) sigma[i] = static_cast<T>(sqrt(sum));
  }
  __syncthreads();
  if (tid == 0) {
    double top = 0;
    for (int i = 0; i < p; ++i) top = fmax(top, double(sigma[i]));
    scalar = eps * top;  // as the CPU kernel: at or below eps·σmax a row is noise
  }
  __syncthreads();
  const double null_below = scalar;
  for (int i = warp; i < p; i += kWarps) {
    const double si = sigma[i];
    const bool keep = si > null_below && si > 0;
    if (keep) {
      T* wi = w + static_cast<int64_t>(i) * q;
      for (int e = lane; e < q; e += 32) wi[e] = static_cast<T>(double(wi[e]) / si);
    }
    if (lane == 0) accepted[i] = keep ? 1 : 0;
  }
  __syncthreads();

  // 4. Null rows (rank deficiency; rare): the unit vector e_k with the largest component
  // outside the span of the accepted rows, orthogonalised twice (classical Gram-Schmidt).
  for (int i = 0; i < p; ++i) {
    if (accepted[i]) continue;  // uniform across the block
    double best = -1;
    int best_at = 0;
    for (int k = tid; k < q; k += kThreads) {
      double res = 1;
      for (int j = 0; j < p; ++j)
        if (accepted[j]) res -= double(w[static_cast<int64_t>(j) * q + k]) * double(w[static_cast<int64_t>(j) * q + k]);
      if (res > best) {
        best = res;
        best_at = k;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_at = __shfl_xor_sync(0xffffffffu, best_at, offset);
      if (other > best || (other == best && other_at < best_at)) {
        best = other;
        best_at = other_at;
      }
    }
    if (lane == 0) {
      reduce_value[warp] = best;
      reduce_index[warp] = best_at;
    }
    __syncthreads();
    if (tid == 0) {
      int at = reduce_index[0];
      double top = reduce_value[0];
      for (int k = 1; k < kWarps; ++k)
        if (reduce_value[k] > top) {
          top = reduce_value[k];
          at = reduce_index[k];
        }
      best_k = at;
    }
    __syncthreads();
    T* v = w + static_cast<int64_t>(i) * q;
    for (int k = tid; k < q; k += kThreads) v[k] = k == best_k ? T(1) : T(0);
    __syncthreads();
    for (int pass = 0; pass < 2; ++pass) {
      for (int j = warp; j < p; j += kWarps) {
        double d = 0;
        if (accepted[j]) {
          for (int e = lane; e < q; e += 32) d += double(w[static_cast<int64_t>(j) * q + e]) * double(v[e]);
          d = warp_sum(d);
        }
        if (lane == 0) proj[j] = static_cast<T>(d);
      }
      __syncthreads();
      for (int k = tid; k < q; k += kThreads) {
        double vk = v[k];
        for (int j = 0; j < p; ++j)
          if (accepted[j]) vk -= double(proj[j]) * double(w[static_cast<int64_t>(j) * q + k]);
        v[k] = static_cast<T>(vk);
      }
      __syncthreads();
    }
    if (warp == 0) {
      double sum = 0;
      for (int e = lane; e < q; e += 32) sum += double(v[e]) * double(v[e]);
      sum = warp_sum(sum);
      if (lane == 0) scalar = sqrt(sum);
    }
    __syncthreads();
    const double norm = scalar;
    for (int k = tid; k < q; k += kThreads) v[k] = static_cast<T>(double(v[k]) / norm);
    if (tid == 0) accepted[i] = 1;
    __syncthreads();
  }

  // 5. Descending order (ties by index; a NaN, from non-finite input, sorts last so the
  // ranks stay a permutation), then the outputs.
  for (int i = tid; i < p; i += kThreads) {
    const double si = isnan(double(sigma[i])) ? -1.0 : double(sigma[i]);
    int rank = 0;
    for (int j = 0; j < p; ++j) {
      const double sj = isnan(double(sigma[j])) ? -1.0 : double(sigma[j]);
      rank += (sj > si) || (sj == si && j < i);
    }
    order[rank] = i;
  }
  __syncthreads();
  for (int r = tid; r < p; r += kThreads) s[r] = static_cast<T>(ldexp(double(sigma[order[r]]), exponent));
  const T* left = tall ? w : z;  // rows are the columns of u
  const T* right = tall ? z : w;  // rows are the rows of vh
  const int left_len = tall ? q : p, right_len = tall ? p : q;
  for (int64_t k = tid; k < static_cast<int64_t>(m) * p; k += kThreads) {
    const int64_t row = k / p, r = k % p;
    u[k] = left[static_cast<int64_t>(order[r]) * left_len + row];
  }
  for (int64_t k = tid; k < static_cast<int64_t>(p) * n; k += kThreads) {
    const int64_t r = k / n, c = k % n;
    vh[k] = right[static_cast<int64_t>(order[r]) * right_len + c];
  }
}

template <typename T>
int launch(const void* a, int64_t batch, int64_t m, int64_t n, void* u, void* s, void* vh,
           double eps, cudaStream_t stream) {
  const int64_t p = m < n ? m : n, q = m < n ? n : m;
  const int64_t bytes = shared_bytes<T>(p, q);
  cudaError_t status = cudaFuncSetAttribute(svd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes));
  if (status != cudaSuccess) return static_cast<int>(status);
  svd_kernel<T><<<static_cast<unsigned int>(batch), kThreads, static_cast<size_t>(bytes), stream>>>(
      static_cast<const T*>(a), static_cast<int>(m), static_cast<int>(n), static_cast<T*>(u),
      static_cast<T*>(s), static_cast<T*>(vh), eps);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t svd_cuda_shared_bytes(DType dtype, int64_t m, int64_t n) {
  const int64_t p = m < n ? m : n, q = m < n ? n : m;
  return dtype == DType::f64 ? shared_bytes<double>(p, q) : shared_bytes<float>(p, q);
}

int batched_svd_cuda(DType dtype, const void* a, int64_t batch, int64_t m, int64_t n, void* u,
                     void* s, void* vh, void* stream) {
  if (batch == 0 || m == 0 || n == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (dtype == DType::f64) return launch<double>(a, batch, m, n, u, s, vh, 2.220446049250313e-16, st);
  if (dtype == DType::f32) return launch<float>(a, batch, m, n, u, s, vh, 1.1920928955078125e-07, st);
  return static_cast<int>(cudaErrorInvalidValue);  // the torch layer converts f16/bf16
}

}  // namespace fastmix
