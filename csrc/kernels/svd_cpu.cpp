// CPU batched thin SVD by one-sided Jacobi (contract and method in svd.h).
//
// One matrix per OpenMP task. The p short-side vectors are stored as contiguous rows, so
// every dot product and rotation runs over contiguous memory; squared row norms are cached
// within a sweep (updated exactly by the rotation formula: α' = α − tγ, β' = β + tγ) and
// recomputed at the start of each sweep, so a pair costs one dot product plus the
// rotation. Cyclic (row-by-row) pair order. Hot loops are compiled for AVX-512, AVX2+FMA
// and the baseline, picked at load time (GCC function multi-versioning).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "svd.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FASTMIX_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMIX_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FASTMIX_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTMIX_ALWAYS_INLINE inline
#endif

namespace fastmix {
namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise dots

template <typename T>
FASTMIX_ALWAYS_INLINE T dot(const T* x, const T* y, int64_t len) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[k + l] * y[k + l];
  T total = 0;
  for (; k < len; ++k) total += x[k] * y[k];
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
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

// All arithmetic is in double whatever the input type: in float, the product of the
// thousands of rotations a 64 x 64 matrix needs drifts from orthogonal by ~1e-5 (the
// rounded c² + s² is not 1). float inputs only stop at a float-level tolerance.
struct Workspace {
  std::vector<double> w, z, norms, residual;
  std::vector<int64_t> order;
  std::vector<char> accepted;
};

// Rotates the rows of w (p x q) until pairwise orthogonal, accumulating into z (p x p).
template <typename T>
FASTMIX_ALWAYS_INLINE void jacobi_sweeps(T* w, T* z, T* norms, int64_t p, int64_t q, T eps) {
  const T tol = std::sqrt(static_cast<T>(q)) * eps;
  for (int sweep = 0; sweep < kSvdMaxSweeps; ++sweep) {
    for (int64_t i = 0; i < p; ++i) norms[i] = dot(w + i * q, w + i * q, q);
    bool rotated = false;
    for (int64_t i = 0; i + 1 < p; ++i) {
      for (int64_t j = i + 1; j < p; ++j) {
        const T alpha = norms[i], beta = norms[j];
        if (!(alpha > 0) || !(beta > 0)) continue;
        const T gamma = dot(w + i * q, w + j * q, q);
        if (!(std::fabs(gamma) > tol * std::sqrt(alpha * beta))) continue;
        const T zeta = (beta - alpha) / (2 * gamma);
        const T root = std::fabs(zeta) < T(1e100) ? std::sqrt(1 + zeta * zeta) : std::fabs(zeta);
        const T t = (zeta >= 0 ? T(1) : T(-1)) / (std::fabs(zeta) + root);
        if (!(t != 0) || !std::isfinite(t)) continue;
        const T c = 1 / std::sqrt(1 + t * t), s = c * t;
        rotate(w + i * q, w + j * q, q, c, s);
        rotate(z + i * p, z + j * p, p, c, s);
        norms[i] = alpha - t * gamma;
        norms[j] = beta + t * gamma;
        rotated = true;
      }
    }
    if (!rotated) break;
  }
}

// eps: the machine epsilon of the output type (the convergence tolerance is sqrt(q) eps).
FASTMIX_MULTIVERSION void run_sweeps(double* w, double* z, double* norms, int64_t p, int64_t q,
                                    double eps) {
  jacobi_sweeps(w, z, norms, p, q, eps);
}

// Replaces row i of w (p x q; rows marked accepted are orthonormal) by a unit vector
// orthogonal to the accepted rows: the unit vector e_k with the largest component outside
// their span, orthogonalised twice (modified Gram-Schmidt).
template <typename T>
void complete_row(T* w, int64_t p, int64_t q, int64_t i, const char* accepted, T* residual) {
  std::fill_n(residual, q, T(1));
  for (int64_t j = 0; j < p; ++j) {
    if (!accepted[j]) continue;
    for (int64_t k = 0; k < q; ++k) residual[k] -= w[j * q + k] * w[j * q + k];
  }
  const int64_t best = std::max_element(residual, residual + q) - residual;
  T* v = w + i * q;
  std::fill_n(v, q, T(0));
  v[best] = 1;
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t j = 0; j < p; ++j) {
      if (!accepted[j]) continue;
      const T* r = w + j * q;
      const T proj = dot(r, v, q);
      for (int64_t k = 0; k < q; ++k) v[k] -= proj * r[k];
    }
  }
  const T norm = std::sqrt(dot(v, v, q));
  for (int64_t k = 0; k < q; ++k) v[k] /= norm;
}

template <typename T>
void svd_one(const T* a, int64_t m, int64_t n, T* u, T* s, T* vh, Workspace& ws) {
  const bool tall = m >= n;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  ws.w.resize(static_cast<size_t>(p * q));
  ws.z.assign(static_cast<size_t>(p * p), 0.0);
  ws.norms.resize(static_cast<size_t>(p));
  ws.residual.resize(static_cast<size_t>(q));
  ws.order.resize(static_cast<size_t>(p));
  ws.accepted.assign(static_cast<size_t>(p), 0);
  double* w = ws.w.data();
  double* z = ws.z.data();

  // W: the columns of A as rows (tall), or A itself (wide); scaled by 2^-e, exactly.
  double amax = 0;
  for (int64_t k = 0; k < m * n; ++k) amax = std::max(amax, std::fabs(double(a[k])));
  int exponent = 0;
  if (amax > 0) std::frexp(amax, &exponent);
  const double scale = std::ldexp(1.0, -exponent);
  if (tall) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) w[c * q + r] = double(a[r * n + c]) * scale;
  } else {
    for (int64_t k = 0; k < m * n; ++k) w[k] = double(a[k]) * scale;
  }
  for (int64_t i = 0; i < p; ++i) z[i * p + i] = 1;

  run_sweeps(w, z, ws.norms.data(), p, q, std::numeric_limits<T>::epsilon());

  // Singular values; normalise the non-null rows, then complete the null ones.
  double* sigma = ws.norms.data();
  double sigma_max = 0;
  for (int64_t i = 0; i < p; ++i) {
    sigma[i] = std::sqrt(dot(w + i * q, w + i * q, q));
    sigma_max = std::max(sigma_max, sigma[i]);
  }
  const double null_below = double(p) * std::numeric_limits<T>::epsilon() * sigma_max;
  for (int64_t i = 0; i < p; ++i) {
    if (sigma[i] > null_below && sigma[i] > 0) {
      for (int64_t k = 0; k < q; ++k) w[i * q + k] /= sigma[i];
      ws.accepted[i] = 1;
    }
  }
  for (int64_t i = 0; i < p; ++i) {
    if (ws.accepted[i]) continue;
    complete_row(w, p, q, i, ws.accepted.data(), ws.residual.data());
    ws.accepted[i] = 1;
  }

  // Descending order (stable), undo the scaling, write u, s, vh.
  int64_t* order = ws.order.data();
  std::iota(order, order + p, int64_t(0));
  auto key = [&](int64_t i) { return std::isnan(sigma[i]) ? -1.0 : sigma[i]; };  // NaN last
  std::stable_sort(order, order + p, [&](int64_t x, int64_t y) { return key(x) > key(y); });
  for (int64_t r = 0; r < p; ++r) s[r] = static_cast<T>(std::ldexp(sigma[order[r]], exponent));
  // Rows of `left` are the columns of u; rows of `right` are the rows of vh.
  auto write = [&](const double* left, const double* right) {
    for (int64_t row = 0; row < m; ++row)
      for (int64_t r = 0; r < p; ++r) u[row * p + r] = static_cast<T>(left[order[r] * m + row]);
    for (int64_t r = 0; r < p; ++r)
      for (int64_t c = 0; c < n; ++c) vh[r * n + c] = static_cast<T>(right[order[r] * n + c]);
  };
  if (tall) {
    write(w, z);
  } else {
    write(z, w);
  }
}

template <typename T>
void batched_svd_impl(const T* a, int64_t batch, int64_t m, int64_t n, T* u, T* s, T* vh) {
  if (batch == 0 || m == 0 || n == 0) return;
  const int64_t p = std::min(m, n);
#pragma omp parallel if (batch > 1)
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      svd_one(a + b * m * n, m, n, u + b * m * p, s + b * p, vh + b * p * n, ws);
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
