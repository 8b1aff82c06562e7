// CPU batched thin SVD by one-sided Jacobi (contract and method in svd.h).
//
// Per matrix, in double: W0 (the p short-side vectors as rows, scaled by a power of two),
// then a Householder QR with column pivoting of X = W0ᵀ (q x p): X P = Q R. The rows of R
// (p x p, in the input type) are what Jacobi rotates: R is graded by the pivoting, so it
// needs fewer sweeps than W0 (about 7.7 instead of 9.2 for random 64 x 64 float32), and its
// rows are p long, not q. Once J R = Σ Ũ_R, the short-side singular vectors are the
// columns of P Ũ_Rᵀ and the long-side ones come from one product in double, y_j = X ũ_j
// = σ_j (long-side vector j); those are orthonormalised in descending σ (Gram-Schmidt, a
// fresh unit vector for null directions) so directions of tiny or zero σ stay orthonormal.
// The rotations are not accumulated.
//
// The sweeps: squared row norms are cached within a sweep (updated exactly by the
// rotation formula: α' = α − tγ, β' = β + tγ) and recomputed at the start of each sweep,
// so a pair costs one dot product plus one rotation; round-robin pair order. With AVX2+FMA
// (checked at run time), 8 float32 or 4 float64 matrices are rotated at once, one per SIMD
// lane (lane_sweeps): no horizontal sums, and the rotation angles are computed in SIMD
// too. OpenMP-parallel over those groups. Other hot loops are compiled for AVX-512,
// AVX2+FMA and the baseline, picked at load time (GCC function multi-versioning).
#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <numeric>
#include <vector>

#include "svd.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTMIX_X86_AVX2 1
#endif

namespace fastmix {
namespace {

// Dot product in 32-byte vectors (GCC vector extensions: AVX in the AVX clones, SSE pairs
// in the baseline one), two accumulators, summed once at the end: no reduction through
// memory, which costs more than the products themselves at these lengths.
template <typename T>
FASTMIX_ALWAYS_INLINE T dot(const T* x, const T* y, int64_t len) {
  constexpr int64_t W = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32), aligned(sizeof(T)), __may_alias__));
  V a0 = {}, a1 = {};
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W) {
    a0 += *reinterpret_cast<const V*>(x + k) * *reinterpret_cast<const V*>(y + k);
    a1 += *reinterpret_cast<const V*>(x + k + W) * *reinterpret_cast<const V*>(y + k + W);
  }
  if (k + W <= len) {
    a0 += *reinterpret_cast<const V*>(x + k) * *reinterpret_cast<const V*>(y + k);
    k += W;
  }
  a0 += a1;
  T sum = 0;
  for (int64_t l = 0; l < W; ++l) sum += a0[l];
  for (; k < len; ++k) sum += x[k] * y[k];
  return sum;
}

// (x, y) <- (c x - s y, s x + c y)
template <typename T>
FASTMIX_ALWAYS_INLINE void rotate(T* x, T* y, int64_t len, T c, T s) {
  for (int64_t k = 0; k < len; ++k) {
    const T xk = x[k], yk = y[k];
    x[k] = c * xk - s * yk;
    y[k] = s * xk + c * yk;
  }
}

// Rotates the rows of w (p x q) until pairwise orthogonal to sqrt(q) eps. Round-robin
// order: each round holds disjoint pairs, so their dot products, their rotation angles
// (a chain of divisions and square roots that would otherwise bound the speed by its
// latency) and their rotations are each computed for the whole round at once.
template <typename T>
FASTMIX_ALWAYS_INLINE void jacobi_sweeps(T* w, T* norms, int64_t p, int64_t q, int64_t* first,
                                         int64_t* second, T* gamma, T* cs, T* sn, T* tn) {
  const T tol = std::sqrt(static_cast<T>(q)) * std::numeric_limits<T>::epsilon();
  const int64_t P = p + (p & 1);
  for (int sweep = 0; sweep < kSvdMaxSweeps; ++sweep) {
    for (int64_t i = 0; i < p; ++i) norms[i] = dot(w + i * q, w + i * q, q);
    bool rotated = false;
    for (int64_t round = 0; round + 1 < P; ++round) {
      int64_t pairs = 0;
      for (int64_t k = 0; k < P / 2; ++k) {
        const int64_t x = k == 0 ? round : (round + k) % (P - 1);
        const int64_t y = k == 0 ? P - 1 : (round - k + (P - 1)) % (P - 1);
        if (std::max(x, y) >= p) continue;  // the dummy partner of an odd p
        first[pairs] = std::min(x, y);
        second[pairs] = std::max(x, y);
        ++pairs;
      }
      for (int64_t t = 0; t < pairs; ++t) gamma[t] = dot(w + first[t] * q, w + second[t] * q, q);
      for (int64_t t = 0; t < pairs; ++t) {
        const T alpha = norms[first[t]], beta = norms[second[t]], g = gamma[t];
        T tt = 0;
        // sqrt(alpha) * sqrt(beta), not sqrt(alpha * beta): the product of two tiny norms
        // underflows to 0 in float, and the test would then never stop rotating
        if (alpha > 0 && beta > 0 && std::fabs(g) > tol * std::sqrt(alpha) * std::sqrt(beta)) {
          const T zeta = (beta - alpha) / (2 * g);
          const T root = std::fabs(zeta) < T(1e18) ? std::sqrt(1 + zeta * zeta) : std::fabs(zeta);
          tt = (zeta >= 0 ? T(1) : T(-1)) / (std::fabs(zeta) + root);
          if (!std::isfinite(tt)) tt = 0;
        }
        tn[t] = tt;
        cs[t] = 1 / std::sqrt(1 + tt * tt);
        sn[t] = cs[t] * tt;
      }
      for (int64_t t = 0; t < pairs; ++t) {
        if (tn[t] == 0) continue;
        rotate(w + first[t] * q, w + second[t] * q, q, cs[t], sn[t]);
        norms[first[t]] -= tn[t] * gamma[t];
        norms[second[t]] += tn[t] * gamma[t];
        rotated = true;
      }
    }
    if (!rotated) break;
  }
}


#ifdef FASTMIX_X86_AVX2
// The same sweeps for a group of matrices at once, one per SIMD lane (8 float or 4 double
// lanes of AVX2): w holds the p x q rows of all of them interleaved, element (i, k) of lane
// l at w[(i q + k) L + l], so a pair's dot product, its rotation angle and its rotation
// are plain vertical SIMD, with no horizontal sum. A lane whose pair is orthogonal gets
// t = 0, so c = 1, s = 0 and its rows are left exactly as they are; the group stops when
// a sweep rotates no pair in any lane. `pairs` lists the round-robin rounds (P - 1 rounds of
// P / 2 pairs, -1 marking the dummy partner of an odd p).
#define FASTMIX_AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline
struct F8 {
  using T = float;
  using V = __m256;
  static constexpr int L = 8;
  FASTMIX_AVX2 V load(const T* x) { return _mm256_load_ps(x); }
  FASTMIX_AVX2 void store(T* x, V v) { _mm256_store_ps(x, v); }
  FASTMIX_AVX2 V set1(T v) { return _mm256_set1_ps(v); }
  FASTMIX_AVX2 V zero() { return _mm256_setzero_ps(); }
  FASTMIX_AVX2 V add(V a, V b) { return _mm256_add_ps(a, b); }
  FASTMIX_AVX2 V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  FASTMIX_AVX2 V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  FASTMIX_AVX2 V div(V a, V b) { return _mm256_div_ps(a, b); }
  FASTMIX_AVX2 V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  FASTMIX_AVX2 V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  FASTMIX_AVX2 V sqrt(V a) { return _mm256_sqrt_ps(a); }
  FASTMIX_AVX2 V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  FASTMIX_AVX2 V gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  FASTMIX_AVX2 V ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  FASTMIX_AVX2 V lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  FASTMIX_AVX2 V and_(V a, V b) { return _mm256_and_ps(a, b); }
  FASTMIX_AVX2 V blend(V f, V t, V mask) { return _mm256_blendv_ps(f, t, mask); }
  FASTMIX_AVX2 int any(V mask) { return _mm256_movemask_ps(mask); }
};
struct D4 {
  using T = double;
  using V = __m256d;
  static constexpr int L = 4;
  FASTMIX_AVX2 V load(const T* x) { return _mm256_load_pd(x); }
  FASTMIX_AVX2 void store(T* x, V v) { _mm256_store_pd(x, v); }
  FASTMIX_AVX2 V set1(T v) { return _mm256_set1_pd(v); }
  FASTMIX_AVX2 V zero() { return _mm256_setzero_pd(); }
  FASTMIX_AVX2 V add(V a, V b) { return _mm256_add_pd(a, b); }
  FASTMIX_AVX2 V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  FASTMIX_AVX2 V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  FASTMIX_AVX2 V div(V a, V b) { return _mm256_div_pd(a, b); }
  FASTMIX_AVX2 V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  FASTMIX_AVX2 V fmsub(V a, V b, V c) { return _mm256_fmsub_pd(a, b, c); }
  FASTMIX_AVX2 V sqrt(V a) { return _mm256_sqrt_pd(a); }
  FASTMIX_AVX2 V abs(V a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  FASTMIX_AVX2 V gt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  FASTMIX_AVX2 V ge(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
  FASTMIX_AVX2 V lt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  FASTMIX_AVX2 V and_(V a, V b) { return _mm256_and_pd(a, b); }
  FASTMIX_AVX2 V blend(V f, V t, V mask) { return _mm256_blendv_pd(f, t, mask); }
  FASTMIX_AVX2 int any(V mask) { return _mm256_movemask_pd(mask); }
};

template <typename S>
FASTMIX_AVX2 typename S::V lane_dot(const typename S::T* x, const typename S::T* y, int64_t q) {
  constexpr int L = S::L;
  typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t k = 0;
  for (; k + 4 <= q; k += 4) {
    a0 = S::fmadd(S::load(x + (k + 0) * L), S::load(y + (k + 0) * L), a0);
    a1 = S::fmadd(S::load(x + (k + 1) * L), S::load(y + (k + 1) * L), a1);
    a2 = S::fmadd(S::load(x + (k + 2) * L), S::load(y + (k + 2) * L), a2);
    a3 = S::fmadd(S::load(x + (k + 3) * L), S::load(y + (k + 3) * L), a3);
  }
  for (; k < q; ++k) a0 = S::fmadd(S::load(x + k * L), S::load(y + k * L), a0);
  return S::add(S::add(a0, a1), S::add(a2, a3));
}

template <typename S>
__attribute__((target("avx2,fma"))) void lane_sweeps(typename S::T* w, typename S::T* norms,
                                                     int64_t p, int64_t q, const int64_t* pairs,
                                                     int64_t P) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int L = S::L;
  const V tol = S::set1(std::sqrt(static_cast<T>(q)) * std::numeric_limits<T>::epsilon());
  const V zero = S::zero(), one = S::set1(1), minus_one = S::set1(-1), two = S::set1(2);
  const V huge = S::set1(T(1e18)), inf = S::set1(std::numeric_limits<T>::infinity());
  for (int sweep = 0; sweep < kSvdMaxSweeps; ++sweep) {
    for (int64_t i = 0; i < p; ++i)
      S::store(norms + i * L, lane_dot<S>(w + i * q * L, w + i * q * L, q));
    bool rotated = false;
    for (int64_t t = 0; t < (P - 1) * (P / 2); ++t) {
      const int64_t x = pairs[2 * t], y = pairs[2 * t + 1];
      if (y < 0) continue;
      T* wx = w + x * q * L;
      T* wy = w + y * q * L;
      const V g = lane_dot<S>(wx, wy, q);
      const V alpha = S::load(norms + x * L), beta = S::load(norms + y * L);
      V mask = S::and_(S::and_(S::gt(alpha, zero), S::gt(beta, zero)),
                       S::gt(S::abs(g), S::mul(S::mul(tol, S::sqrt(alpha)), S::sqrt(beta))));
      if (!S::any(mask)) continue;
      const V zeta = S::div(S::sub(beta, alpha), S::mul(two, g));
      const V az = S::abs(zeta);
      const V root = S::blend(az, S::sqrt(S::fmadd(zeta, zeta, one)), S::lt(az, huge));
      V tt = S::div(S::blend(minus_one, one, S::ge(zeta, zero)), S::add(az, root));
      mask = S::and_(mask, S::lt(S::abs(tt), inf));  // finite (NaN compares false)
      tt = S::and_(mask, tt);
      if (!S::any(mask)) continue;
      const V c = S::div(one, S::sqrt(S::fmadd(tt, tt, one)));
      const V sn = S::mul(c, tt);
      for (int64_t k = 0; k < q; ++k) {
        const V xk = S::load(wx + k * L), yk = S::load(wy + k * L);
        S::store(wx + k * L, S::fmsub(c, xk, S::mul(sn, yk)));
        S::store(wy + k * L, S::fmadd(sn, xk, S::mul(c, yk)));
      }
      const V tg = S::mul(tt, g);
      S::store(norms + x * L, S::sub(alpha, tg));
      S::store(norms + y * L, S::add(beta, tg));
      rotated = true;
    }
    if (!rotated) break;
  }
}
#undef FASTMIX_AVX2

bool lanes_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif  // FASTMIX_X86_AVX2

// 32-byte aligned storage for the interleaved lanes (aligned AVX loads).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
  bool operator!=(const AlignedAllocator&) const { return false; }
};

template <typename T>
struct Workspace {
  std::vector<T> w, norms, residual_t, gamma, cs, sn, tn;
  std::vector<double> w0, x, ut, y, sigma, residual, proj, cnorm;
  std::vector<int64_t> order, done, first, second, perm;
  std::vector<int> exponent;
};

FASTMIX_MULTIVERSION void run_sweeps(float* w, int64_t p, int64_t q, Workspace<float>& ws) {
  jacobi_sweeps(w, ws.norms.data(), p, q, ws.first.data(), ws.second.data(), ws.gamma.data(),
                ws.cs.data(), ws.sn.data(), ws.tn.data());
}

FASTMIX_MULTIVERSION void run_sweeps(double* w, int64_t p, int64_t q, Workspace<double>& ws) {
  jacobi_sweeps(w, ws.norms.data(), p, q, ws.first.data(), ws.second.data(), ws.gamma.data(),
                ws.cs.data(), ws.sn.data(), ws.tn.data());
}

// Makes row `i` of rows (len wide, double) a unit vector orthogonal to the rows listed in
// `done[0..count)` (orthonormal): classical Gram-Schmidt (all projections at once, so the
// loops vectorise), accepted when more than half of the unit row is left; if less is
// left (the row was null or dependent), starts over, with Gram-Schmidt twice,
// from the unit vector e_k with the largest component outside their span. `fresh` forces
// that start. `proj` holds count values, `residual` len.
FASTMIX_MULTIVERSION void orthonormalise(double* rows, int64_t len, int64_t i, const int64_t* done,
                                         int64_t count, bool fresh, double* residual,
                                         double* proj) {
  double* v = rows + i * len;
  auto project_out = [&](int passes) {
    for (int pass = 0; pass < passes; ++pass) {
      for (int64_t d = 0; d < count; ++d) proj[d] = dot(rows + done[d] * len, v, len);
      for (int64_t d = 0; d < count; ++d) {
        const double* r = rows + done[d] * len;
        const double pd = proj[d];
        for (int64_t k = 0; k < len; ++k) v[k] -= pd * r[k];
      }
    }
  };
  if (!fresh) {
    const double before = std::sqrt(dot(v, v, len));
    if (before > 0) {
      for (int64_t k = 0; k < len; ++k) v[k] /= before;
      // One pass is enough when it leaves most of v (the rows in `done` are orthonormal
      // to working accuracy): the loss of orthogonality grows with before / after only.
      project_out(1);
      const double after = std::sqrt(dot(v, v, len));
      if (after > 0.5) {
        for (int64_t k = 0; k < len; ++k) v[k] /= after;
        return;
      }
    }
  }
  std::fill_n(residual, len, 1.0);
  for (int64_t d = 0; d < count; ++d) {
    const double* r = rows + done[d] * len;
    for (int64_t k = 0; k < len; ++k) residual[k] -= r[k] * r[k];
  }
  const int64_t best = std::max_element(residual, residual + len) - residual;
  std::fill_n(v, len, 0.0);
  v[best] = 1;
  project_out(2);
  const double norm = std::sqrt(dot(v, v, len));
  for (int64_t k = 0; k < len; ++k) v[k] /= norm;
}

// Householder QR with column pivoting of X (q x p, q >= p), given as its columns: the rows
// of x (p x q, overwritten). X P = Q R; writes R (p x p, upper triangular) into r (row
// major, type T) and the permutation into perm (column l of X P is column perm[l] of X).
template <typename T>
FASTMIX_ALWAYS_INLINE void pivoted_qr(double* x, int64_t p, int64_t q, T* r, int64_t* perm,
                                      double* cnorm) {
  for (int64_t j = 0; j < p; ++j) perm[j] = j;
  std::fill_n(r, p * p, T(0));
  double total = 0;
  for (int64_t j = 0; j < p; ++j) total += cnorm[j] = dot(x + j * q, x + j * q, q);
  // What is left below eps |X|_F is noise: the rest of R is set to zero (a backward error
  // of that size), which also keeps the reflections of noise from underflowing.
  const double negligible = total * std::numeric_limits<double>::epsilon() *
                            std::numeric_limits<double>::epsilon();
  for (int64_t k = 0; k < p; ++k) {
    int64_t best = k;
    for (int64_t j = k; j < p; ++j)
      if (cnorm[j] > cnorm[best]) best = j;
    if (best != k) {
      std::swap_ranges(x + k * q, x + (k + 1) * q, x + best * q);
      std::swap(perm[k], perm[best]);
      std::swap(cnorm[k], cnorm[best]);
      for (int64_t i = 0; i < k; ++i) std::swap(r[i * p + k], r[i * p + best]);
    }
    cnorm[k] = dot(x + k * q + k, x + k * q + k, q - k);  // exact for the pivot
    double* v = x + k * q + k;  // the Householder vector, in place
    const int64_t len = q - k;
    if (!(cnorm[k] > negligible)) break;  // R's remaining rows stay zero
    const double norm = std::sqrt(cnorm[k]);
    const double alpha = v[0] >= 0 ? -norm : norm;
    v[0] -= alpha;
    const double vnorm2 = dot(v, v, len);
    r[k * p + k] = static_cast<T>(alpha);
    if (vnorm2 > 0) {
      const double f = 2 / vnorm2;
      for (int64_t j = k + 1; j < p; ++j) {
        double* xj = x + j * q + k;
        const double c = f * dot(v, xj, len);
        for (int64_t i = 0; i < len; ++i) xj[i] -= c * v[i];
      }
    }
    for (int64_t j = k + 1; j < p; ++j) {
      const double rkj = x[j * q + k];
      r[k * p + j] = static_cast<T>(rkj);
      // downdate the remaining norm; recompute when cancellation has eaten its accuracy
      const double rest = cnorm[j] - rkj * rkj;
      cnorm[j] = rest > 1e-4 * cnorm[j] ? rest : dot(x + j * q + k + 1, x + j * q + k + 1, q - k - 1);
    }
  }
}

FASTMIX_MULTIVERSION void run_qr(double* x, int64_t p, int64_t q, float* r, int64_t* perm,
                                 double* cnorm) {
  pivoted_qr(x, p, q, r, perm, cnorm);
}
FASTMIX_MULTIVERSION void run_qr(double* x, int64_t p, int64_t q, double* r, int64_t* perm,
                                 double* cnorm) {
  pivoted_qr(x, p, q, r, perm, cnorm);
}

// y (p x q) = S W0, S (p x p) row-major, W0 (p x q): y_j = sum_k S[j][k] W0[k].
FASTMIX_MULTIVERSION void combine_rows(const double* sm, const double* w0, int64_t p, int64_t q,
                                       double* y) {
  for (int64_t j = 0; j < p; ++j) {
    double* yj = y + j * q;
    std::fill_n(yj, q, 0.0);
    for (int64_t k = 0; k < p; ++k) {
      const double c = sm[j * p + k];
      const double* wk = w0 + k * q;
      for (int64_t i = 0; i < q; ++i) yj[i] += c * wk[i];
    }
  }
}

// Sizes the workspace for p x q problems (one matrix's scratch; `lanes` matrices' inputs).
template <typename T>
void reserve(Workspace<T>& ws, int64_t p, int64_t q, int64_t lanes) {
  ws.w.resize(static_cast<size_t>(lanes * p * p));
  ws.w0.resize(static_cast<size_t>(lanes * p * q));
  ws.perm.resize(static_cast<size_t>(lanes * p));
  ws.exponent.resize(static_cast<size_t>(lanes));
  ws.x.resize(static_cast<size_t>(p * q));
  ws.ut.resize(static_cast<size_t>(p * p));
  ws.y.resize(static_cast<size_t>(p * q));
  ws.norms.resize(static_cast<size_t>(p));
  ws.sigma.resize(static_cast<size_t>(p));
  ws.cnorm.resize(static_cast<size_t>(p));
  ws.proj.resize(static_cast<size_t>(p));
  ws.residual.resize(static_cast<size_t>(q));
  ws.order.resize(static_cast<size_t>(p));
  ws.done.resize(static_cast<size_t>(p));
  const size_t half = static_cast<size_t>(p / 2 + 1);
  for (auto* v : {&ws.gamma, &ws.cs, &ws.sn, &ws.tn}) v->resize(half);
  ws.first.resize(half);
  ws.second.resize(half);
}

// Lane `l` of the workspace from A: W0 (scaled, p x q) and R (p x p, to be rotated).
template <typename T>
void prepare_one(const T* a, int64_t m, int64_t n, Workspace<T>& ws, int64_t l) {
  const bool tall = m >= n;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  double* w0 = ws.w0.data() + l * p * q;

  // W0: the columns of A as rows (tall), or A itself (wide); scaled by 2^-e, exactly.
  double amax = 0;
  for (int64_t k = 0; k < m * n; ++k) amax = std::max(amax, std::fabs(double(a[k])));
  int exponent = 0;
  if (amax > 0) std::frexp(amax, &exponent);
  ws.exponent[l] = exponent;
  // ldexp on each entry, not a product with 2^-e: for a subnormal amax, 2^-e overflows
  if (tall) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) w0[c * q + r] = std::ldexp(double(a[r * n + c]), -exponent);
  } else {
    for (int64_t k = 0; k < m * n; ++k) w0[k] = std::ldexp(double(a[k]), -exponent);
  }

  // Preconditioning: X = W0ᵀ (q x p), X P = Q R by pivoted Householder QR (in double); the
  // rows of R (p x p) are rotated instead of those of W0: J R = Σ Ũ_R, so the short-side
  // singular vectors are the columns of P Ũ_Rᵀ and the long-side ones X P Ũ_Rᵀ / σ. Fewer
  // sweeps (the pivoted R is graded), and rows of length p, not q.
  std::copy_n(w0, p * q, ws.x.data());
  run_qr(ws.x.data(), p, q, ws.w.data() + l * p * p, ws.perm.data() + l * p, ws.cnorm.data());
}

// The outputs of lane `l`, once its rows of R are rotated to orthogonality.
template <typename T>
void finish_one(int64_t m, int64_t n, Workspace<T>& ws, int64_t l, T* u, T* s, T* vh) {
  const bool tall = m >= n;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  const double eps = std::numeric_limits<T>::epsilon();
  const T* w = ws.w.data() + l * p * p;
  const double* w0 = ws.w0.data() + l * p * q;
  const int64_t* perm = ws.perm.data() + l * p;
  const int exponent = ws.exponent[l];

  // Ũ_R: the rows of W normalised; null rows (norm <= p eps of the largest) completed.
  double* sigma = ws.sigma.data();
  double* ut = ws.ut.data();
  double top = 0;
  for (int64_t i = 0; i < p; ++i) {
    double sum = 0;
    for (int64_t k = 0; k < p; ++k) sum += double(w[i * p + k]) * double(w[i * p + k]);
    sigma[i] = std::sqrt(sum);
    top = std::max(top, sigma[i]);
  }
  // ut row j: the short-side vector j, the permutation undone. Rows of σ at or below eps·σmax
  // are noise: replaced by a completion of the basis (a threshold of p·eps·σmax dropped real
  // σ·u·vᵀ terms of graded inputs: 10x LAPACK's reconstruction error)
  int64_t count = 0;
  for (int64_t i = 0; i < p; ++i)
    if (sigma[i] > eps * top && sigma[i] > 0) {
      for (int64_t k = 0; k < p; ++k) ut[i * p + perm[k]] = double(w[i * p + k]) / sigma[i];
      ws.done[count++] = i;
    }
  for (int64_t i = 0; i < p; ++i)
    if (!(sigma[i] > eps * top && sigma[i] > 0)) {
      orthonormalise(ut, p, i, ws.done.data(), count, true, ws.residual.data(), ws.proj.data());
      ws.done[count++] = i;
    }

  // The other side: y_j = X ũ_j = Σ_k ũ_j[k] W0_k = σ_j (long-side vector j); σ_j = |y_j|.
  double* y = ws.y.data();
  combine_rows(ut, w0, p, q, y);
  top = 0;
  for (int64_t j = 0; j < p; ++j) {
    sigma[j] = std::sqrt(dot(y + j * q, y + j * q, q));
    top = std::max(top, sigma[j]);
  }
  int64_t* order = ws.order.data();
  std::iota(order, order + p, int64_t(0));
  auto key = [&](int64_t i) { return std::isnan(sigma[i]) ? -1.0 : sigma[i]; };  // NaN last
  std::stable_sort(order, order + p, [&](int64_t x, int64_t z) { return key(x) > key(z); });
  for (int64_t r = 0; r < p; ++r) {
    const int64_t j = order[r];
    const bool null = !(sigma[j] > eps * top);
    orthonormalise(y, q, j, order, r, null, ws.residual.data(), ws.proj.data());
  }

  // Outputs in descending order, scaling undone. Rows of `left` are the columns of u,
  // rows of `right` the rows of vh.
  for (int64_t r = 0; r < p; ++r) s[r] = static_cast<T>(std::ldexp(sigma[order[r]], exponent));
  const double* left = tall ? y : ut;
  const double* right = tall ? ut : y;
  for (int64_t row = 0; row < m; ++row)
    for (int64_t r = 0; r < p; ++r) u[row * p + r] = static_cast<T>(left[order[r] * m + row]);
  for (int64_t r = 0; r < p; ++r)
    for (int64_t c = 0; c < n; ++c) vh[r * n + c] = static_cast<T>(right[order[r] * n + c]);
}

template <typename T> struct LaneOps;
#ifdef FASTMIX_X86_AVX2
template <> struct LaneOps<float> { using S = F8; };
template <> struct LaneOps<double> { using S = D4; };
#endif

template <typename T>
void batched_svd_impl(const T* a, int64_t batch, int64_t m, int64_t n, T* u, T* s, T* vh) {
  if (batch == 0 || m == 0 || n == 0) return;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  int64_t lanes = 1;
#ifdef FASTMIX_X86_AVX2
  if (lanes_supported()) lanes = LaneOps<T>::S::L;
#endif
  // Groups of `lanes` matrices rotated together (a last, smaller group has idle lanes; a
  // group of one goes through the one-matrix sweeps).
  const int64_t groups = (batch + lanes - 1) / lanes;
  // Round-robin pair schedule: P - 1 rounds of P / 2 disjoint pairs (-1: dummy partner).
  const int64_t P = p + (p & 1);
  std::vector<int64_t> pairs(static_cast<size_t>(2 * (P - 1) * (P / 2)));
  for (int64_t round = 0, t = 0; round + 1 < P; ++round)
    for (int64_t k = 0; k < P / 2; ++k, ++t) {
      const int64_t x = k == 0 ? round : (round + k) % (P - 1);
      const int64_t y = k == 0 ? P - 1 : (round - k + (P - 1)) % (P - 1);
      pairs[2 * t] = std::max(x, y) >= p ? -1 : std::min(x, y);
      pairs[2 * t + 1] = std::max(x, y) >= p ? -1 : std::max(x, y);
    }
  // per-thread workspaces, allocated here (see max_threads)
  const int threads = groups > 1 ? max_threads() : 1;
  std::vector<Workspace<T>> spaces(static_cast<size_t>(threads));
  std::vector<std::vector<T, AlignedAllocator<T>>> lane_ws(spaces.size()), lane_norms_of(spaces.size());
  for (size_t t = 0; t < spaces.size(); ++t) {
    reserve(spaces[t], p, q, lanes);
    if (lanes > 1) {
      lane_ws[t].resize(static_cast<size_t>(lanes * p * p));
      lane_norms_of[t].resize(static_cast<size_t>(lanes * p));
    }
  }
#pragma omp parallel if (groups > 1) num_threads(threads)
  {
    Workspace<T>& ws = spaces[thread_index()];
    auto& lane_w = lane_ws[thread_index()];
    auto& lane_norms = lane_norms_of[thread_index()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * lanes, count = std::min(lanes, batch - first);
      for (int64_t l = 0; l < count; ++l) prepare_one(a + (first + l) * m * n, m, n, ws, l);
      if (count == 1) {
        run_sweeps(ws.w.data(), p, p, ws);
      } else {
#ifdef FASTMIX_X86_AVX2
        // interleave (lanes past count stay zero: nothing to rotate there)
        std::fill(lane_w.begin(), lane_w.end(), T(0));
        for (int64_t l = 0; l < count; ++l)
          for (int64_t k = 0; k < p * p; ++k) lane_w[k * lanes + l] = ws.w[l * p * p + k];
        lane_sweeps<typename LaneOps<T>::S>(lane_w.data(), lane_norms.data(), p, p,
                                            pairs.data(), P);
        for (int64_t l = 0; l < count; ++l)
          for (int64_t k = 0; k < p * p; ++k) ws.w[l * p * p + k] = lane_w[k * lanes + l];
#endif
      }
      for (int64_t l = 0; l < count; ++l) {
        const int64_t b = first + l;
        finish_one(m, n, ws, l, u + b * m * p, s + b * p, vh + b * p * n);
      }
    }
  }
}

}  // namespace

void batched_svd_cpu(DType dtype, const void* a, int64_t batch, int64_t m, int64_t n, void* u,
                     void* s, void* vh) {
  if (dtype == DType::f64) {
    batched_svd_impl(static_cast<const double*>(a), batch, m, n, static_cast<double*>(u),
                     static_cast<double*>(s), static_cast<double*>(vh));
  } else {  // f32 (the torch layer converts f16/bf16)
    batched_svd_impl(static_cast<const float*>(a), batch, m, n, static_cast<float*>(u),
                     static_cast<float*>(s), static_cast<float*>(vh));
  }
}

}  // namespace fastmix
