// CPU batched thin SVD by one-sided Jacobi (contract and method in svd.h).
//
// One matrix per OpenMP task. The p short-side vectors are stored as contiguous rows of W,
// in the input type (float rows: twice the SIMD width of double), so every dot product and
// rotation runs over contiguous memory; squared row norms are cached within a sweep
// (updated exactly by the rotation formula: α' = α − tγ, β' = β + tγ) and recomputed at the
// start of each sweep, so a pair costs one dot product plus one rotation. Round-robin pair
// order, a round of disjoint pairs at a time.
// The rotations are not accumulated: once the rows Ũ of W are orthonormal (they are the
// singular vectors on the long side), the other side comes from one product in double,
// B = W0 Ũᵀ (W0 the scaled input), whose columns are σ_j times the other singular vectors;
// those are orthonormalised (Gram-Schmidt twice, in descending σ) so directions of tiny or
// zero σ stay orthonormal. Hot loops are compiled for AVX-512, AVX2+FMA and the baseline,
// picked at load time (GCC function multi-versioning).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "svd.h"

namespace fastmix {
namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise dots

template <typename T>
FASTMIX_ALWAYS_INLINE T dot(const T* x, const T* y, int64_t len) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[k + l] * y[k + l];
  for (int64_t l = 0; k < len; ++k, ++l) acc[l] += x[k] * y[k];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)  // a tree, not a 16-add chain
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
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
        if (alpha > 0 && beta > 0 && std::fabs(g) > tol * std::sqrt(alpha * beta)) {
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

template <typename T>
struct Workspace {
  std::vector<T> w, norms, residual_t, gamma, cs, sn, tn;
  std::vector<double> w0, ut, y, sigma, residual;
  std::vector<int64_t> order, done, first, second;
};

FASTMIX_MULTIVERSION void run_sweeps(float* w, int64_t p, int64_t q, Workspace<float>& ws) {
  jacobi_sweeps(w, ws.norms.data(), p, q, ws.first.data(), ws.second.data(), ws.gamma.data(),
                ws.cs.data(), ws.sn.data(), ws.tn.data());
}

FASTMIX_MULTIVERSION void run_sweeps(double* w, int64_t p, int64_t q, Workspace<double>& ws) {
  jacobi_sweeps(w, ws.norms.data(), p, q, ws.first.data(), ws.second.data(), ws.gamma.data(),
                ws.cs.data(), ws.sn.data(), ws.tn.data());
}

// B = X Yᵀ for row-major X (p x q) and Y (p x q), in double: out[j * p + i] = x_i · y_j.
FASTMIX_MULTIVERSION void cross_products(const double* x, const double* y, int64_t p, int64_t q,
                                         double* out) {
  for (int64_t j = 0; j < p; ++j)
    for (int64_t i = 0; i < p; ++i) out[j * p + i] = dot(x + i * q, y + j * q, q);
}

// Makes row `i` of rows (len wide) a unit vector orthogonal to the rows listed in
// `done[0..count)` (orthonormal): Gram-Schmidt twice; if little is left (the row was
// null or dependent), starts over from the unit vector e_k with the largest component
// outside their span. `fresh` forces that start.
template <typename T>
void orthonormalise(T* rows, int64_t len, int64_t i, const int64_t* done, int64_t count,
                    bool fresh, std::vector<T>& residual) {
  T* v = rows + i * len;
  auto project_out = [&]() {
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t d = 0; d < count; ++d) {
        const T* r = rows + done[d] * len;
        const T proj = dot(r, v, len);
        for (int64_t k = 0; k < len; ++k) v[k] -= proj * r[k];
      }
  };
  if (!fresh) {
    const T before = std::sqrt(dot(v, v, len));
    if (before > 0) {
      for (int64_t k = 0; k < len; ++k) v[k] /= before;
      project_out();
      const T after = std::sqrt(dot(v, v, len));
      if (after > T(0.5)) {
        for (int64_t k = 0; k < len; ++k) v[k] /= after;
        return;
      }
    }
  }
  residual.assign(static_cast<size_t>(len), T(1));
  for (int64_t d = 0; d < count; ++d) {
    const T* r = rows + done[d] * len;
    for (int64_t k = 0; k < len; ++k) residual[k] -= r[k] * r[k];
  }
  const int64_t best = std::max_element(residual.begin(), residual.end()) - residual.begin();
  std::fill_n(v, len, T(0));
  v[best] = 1;
  project_out();
  const T norm = std::sqrt(dot(v, v, len));
  for (int64_t k = 0; k < len; ++k) v[k] /= norm;
}

template <typename T>
void svd_one(const T* a, int64_t m, int64_t n, T* u, T* s, T* vh, Workspace<T>& ws) {
  const bool tall = m >= n;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  const double eps = std::numeric_limits<T>::epsilon();
  ws.w.resize(static_cast<size_t>(p * q));
  ws.w0.resize(static_cast<size_t>(p * q));
  ws.ut.resize(static_cast<size_t>(p * q));
  ws.y.resize(static_cast<size_t>(p * p));
  ws.norms.resize(static_cast<size_t>(p));
  ws.sigma.resize(static_cast<size_t>(p));
  ws.order.resize(static_cast<size_t>(p));
  ws.done.resize(static_cast<size_t>(p));
  const size_t half = static_cast<size_t>(p / 2 + 1);
  for (auto* v : {&ws.gamma, &ws.cs, &ws.sn, &ws.tn}) v->resize(half);
  ws.first.resize(half);
  ws.second.resize(half);
  T* w = ws.w.data();
  double* w0 = ws.w0.data();

  // W0: the columns of A as rows (tall), or A itself (wide); scaled by 2^-e, exactly.
  double amax = 0;
  for (int64_t k = 0; k < m * n; ++k) amax = std::max(amax, std::fabs(double(a[k])));
  int exponent = 0;
  if (amax > 0) std::frexp(amax, &exponent);
  const double scale = std::ldexp(1.0, -exponent);
  if (tall) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) w0[c * q + r] = double(a[r * n + c]) * scale;
  } else {
    for (int64_t k = 0; k < m * n; ++k) w0[k] = double(a[k]) * scale;
  }
  for (int64_t k = 0; k < p * q; ++k) w[k] = static_cast<T>(w0[k]);

  run_sweeps(w, p, q, ws);

  // Ũ: the rows of W normalised; null rows (norm <= p eps of the largest) completed.
  double* sigma = ws.sigma.data();
  double top = 0;
  for (int64_t i = 0; i < p; ++i) {
    double sum = 0;
    for (int64_t k = 0; k < q; ++k) sum += double(w[i * q + k]) * double(w[i * q + k]);
    sigma[i] = std::sqrt(sum);
    top = std::max(top, sigma[i]);
  }
  int64_t count = 0;
  for (int64_t i = 0; i < p; ++i)
    if (sigma[i] > double(p) * eps * top && sigma[i] > 0) {
      for (int64_t k = 0; k < q; ++k) w[i * q + k] = static_cast<T>(w[i * q + k] / sigma[i]);
      ws.done[count++] = i;
    }
  for (int64_t i = 0; i < p; ++i)
    if (!(sigma[i] > double(p) * eps * top && sigma[i] > 0)) {
      orthonormalise(w, q, i, ws.done.data(), count, true, ws.residual_t);
      ws.done[count++] = i;
    }

  // The other side: y_j = W0 ũ_j = σ_j (other singular vector j); σ_j = |y_j|.
  double* ut = ws.ut.data();
  double* y = ws.y.data();
  for (int64_t k = 0; k < p * q; ++k) ut[k] = double(w[k]);
  cross_products(w0, ut, p, q, y);
  top = 0;
  for (int64_t j = 0; j < p; ++j) {
    sigma[j] = std::sqrt(dot(y + j * p, y + j * p, p));
    top = std::max(top, sigma[j]);
  }
  int64_t* order = ws.order.data();
  std::iota(order, order + p, int64_t(0));
  auto key = [&](int64_t i) { return std::isnan(sigma[i]) ? -1.0 : sigma[i]; };  // NaN last
  std::stable_sort(order, order + p, [&](int64_t x, int64_t z) { return key(x) > key(z); });
  for (int64_t r = 0; r < p; ++r) {
    const int64_t j = order[r];
    const bool null = !(sigma[j] > double(p) * eps * top);
    orthonormalise(y, p, j, order, r, null, ws.residual);
  }

  // Outputs in descending order, scaling undone. Rows of `left` are the columns of u,
  // rows of `right` the rows of vh.
  for (int64_t r = 0; r < p; ++r) s[r] = static_cast<T>(std::ldexp(sigma[order[r]], exponent));
  const double* left = tall ? ut : y;
  const double* right = tall ? y : ut;
  for (int64_t row = 0; row < m; ++row)
    for (int64_t r = 0; r < p; ++r) u[row * p + r] = static_cast<T>(left[order[r] * m + row]);
  for (int64_t r = 0; r < p; ++r)
    for (int64_t c = 0; c < n; ++c) vh[r * n + c] = static_cast<T>(right[order[r] * n + c]);
}

template <typename T>
void batched_svd_impl(const T* a, int64_t batch, int64_t m, int64_t n, T* u, T* s, T* vh) {
  if (batch == 0 || m == 0 || n == 0) return;
  const int64_t p = std::min(m, n);
#pragma omp parallel if (batch > 1)
  {
    Workspace<T> ws;
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
