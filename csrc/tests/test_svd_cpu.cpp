// Checks the CPU batched SVD kernel against its definition, without torch: A = U diag(S) Vh,
// U and V with orthonormal columns, S descending and non-negative, and S equal to the
// singular values of matrices built from known ones (random orthogonal factors, doubles).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "svd.h"

using fastmix::DType;

namespace {

int failures = 0;

void expect_le(const char* what, double got, double bound) {
  if (!(got <= bound)) {
    std::printf("FAIL %s: %.3g > %.3g\n", what, got, bound);
    ++failures;
  }
}

// Random matrix with orthonormal columns (rows x cols, rows >= cols), by Gram-Schmidt twice.
std::vector<double> orthonormal(std::mt19937& rng, int64_t rows, int64_t cols) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> q(static_cast<size_t>(rows * cols));
  for (auto& v : q) v = normal(rng);
  for (int64_t c = 0; c < cols; ++c) {
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t d = 0; d < c; ++d) {
        double proj = 0;
        for (int64_t r = 0; r < rows; ++r) proj += q[r * cols + c] * q[r * cols + d];
        for (int64_t r = 0; r < rows; ++r) q[r * cols + c] -= proj * q[r * cols + d];
      }
    }
    double norm = 0;
    for (int64_t r = 0; r < rows; ++r) norm += q[r * cols + c] * q[r * cols + c];
    for (int64_t r = 0; r < rows; ++r) q[r * cols + c] /= std::sqrt(norm);
  }
  return q;
}

// Runs the kernel on `batch` copies-with-variations and checks every output.
// kind: 0 random gaussian, 1 known singular values, 2 duplicated rows, 3 zero column,
// 4 all zeros.
template <typename T>
void check(std::mt19937& rng, int64_t batch, int64_t m, int64_t n, int kind, double scale) {
  const DType dtype = sizeof(T) == 8 ? DType::f64 : DType::f32;
  const int64_t p = std::min(m, n);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> a(static_cast<size_t>(batch * m * n));
  std::vector<double> known(static_cast<size_t>(batch * p), 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    T* mat = a.data() + b * m * n;
    if (kind == 1) {
      auto left = orthonormal(rng, m, p), right = orthonormal(rng, n, p);
      std::vector<double> sig(static_cast<size_t>(p));
      for (int64_t i = 0; i < p; ++i) sig[i] = std::pow(10.0, -3.0 * i / std::max<int64_t>(p, 2));
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) {
          double v = 0;
          for (int64_t i = 0; i < p; ++i) v += left[r * p + i] * sig[i] * right[c * p + i];
          mat[r * n + c] = static_cast<T>(v * scale);
        }
      for (int64_t i = 0; i < p; ++i) known[b * p + i] = sig[i] * scale;
    } else {
      for (int64_t k = 0; k < m * n; ++k) mat[k] = kind == 4 ? T(0) : static_cast<T>(normal(rng) * scale);
      if (kind == 2 && m > 1)
        for (int64_t r = 1; r < m; r += 2) std::copy_n(mat, n, mat + r * n);  // rows = row 0
      if (kind == 3)
        for (int64_t r = 0; r < m; ++r) mat[r * n + (n - 1)] = 0;
    }
  }
  std::vector<T> u(static_cast<size_t>(batch * m * p)), s(static_cast<size_t>(batch * p)),
      vh(static_cast<size_t>(batch * p * n));
  fastmix::batched_svd_cpu(dtype, a.data(), batch, m, n, u.data(), s.data(), vh.data());

  const double eps = sizeof(T) == 8 ? 1e-12 : 1e-5;
  char label[128];
  for (int64_t b = 0; b < batch; ++b) {
    const T* mat = a.data() + b * m * n;
    const T* ub = u.data() + b * m * p;
    const T* sb = s.data() + b * p;
    const T* vb = vh.data() + b * p * n;
    double a_norm = 0, err = 0;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) {
        double v = 0;
        for (int64_t i = 0; i < p; ++i) v += double(ub[r * p + i]) * sb[i] * vb[i * n + c];
        err += (v - mat[r * n + c]) * (v - mat[r * n + c]);
        a_norm += double(mat[r * n + c]) * mat[r * n + c];
      }
    std::snprintf(label, sizeof label, "reconstruction kind=%d %lldx%lld scale=%g", kind,
                  (long long)m, (long long)n, scale);
    expect_le(label, std::sqrt(err), eps * std::max(std::sqrt(a_norm), 1e-300));
    double u_err = 0, v_err = 0;
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) {
        double du = 0, dv = 0;
        for (int64_t r = 0; r < m; ++r) du += double(ub[r * p + i]) * ub[r * p + j];
        for (int64_t c = 0; c < n; ++c) dv += double(vb[i * n + c]) * vb[j * n + c];
        u_err = std::max(u_err, std::fabs(du - (i == j)));
        v_err = std::max(v_err, std::fabs(dv - (i == j)));
      }
    std::snprintf(label, sizeof label, "U orthonormal kind=%d %lldx%lld", kind, (long long)m, (long long)n);
    expect_le(label, u_err, eps);
    std::snprintf(label, sizeof label, "V orthonormal kind=%d %lldx%lld", kind, (long long)m, (long long)n);
    expect_le(label, v_err, eps);
    for (int64_t i = 0; i < p; ++i) {
      std::snprintf(label, sizeof label, "S descending kind=%d %lldx%lld i=%lld", kind,
                    (long long)m, (long long)n, (long long)i);
      expect_le(label, i + 1 < p ? double(sb[i + 1]) - sb[i] : 0.0, 0.0);
      expect_le(label, -double(sb[i]), 0.0);
      if (kind == 1) {
        std::snprintf(label, sizeof label, "S known kind=%d %lldx%lld i=%lld", kind, (long long)m,
                      (long long)n, (long long)i);
        expect_le(label, std::fabs(sb[i] - known[b * p + i]), eps * known[b * p]);
      }
      if (kind == 4) expect_le("S of zeros", std::fabs(double(sb[i])), 0.0);
    }
    if (kind == 3 && n <= m) {
      std::snprintf(label, sizeof label, "zero column -> zero singular value %lldx%lld", (long long)m, (long long)n);
      expect_le(label, std::fabs(double(sb[p - 1])), eps * sb[0]);
    }
  }
}

template <typename T>
void check_all(std::mt19937& rng) {
  const int64_t shapes[][2] = {{1, 1}, {1, 6}, {6, 1}, {2, 2}, {8, 8},  {17, 5},
                               {5, 17}, {33, 33}, {64, 64}, {40, 70}, {70, 40}};
  for (auto& shape : shapes) {
    for (int kind = 0; kind <= 4; ++kind) check<T>(rng, 3, shape[0], shape[1], kind, 1.0);
  }
  check<T>(rng, 2, 24, 16, 0, sizeof(T) == 8 ? 1e200 : 1e30);   // squares would overflow
  check<T>(rng, 2, 16, 24, 1, sizeof(T) == 8 ? 1e-200 : 1e-30);  // squares would underflow
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  check_all<float>(rng);
  check_all<double>(rng);
  check<float>(rng, 0, 4, 4, 0, 1.0);  // empty batch
  if (failures) {
    std::printf("%d failed\n", failures);
    return 1;
  }
  std::printf("svd CPU kernel: all checks passed\n");
  return 0;
}
