// Checks the CPU alignment kernels against naive double-precision loops, without torch.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "alignment.h"

using fastmix::DType;

namespace {

int failures = 0;

void expect_close(const char* what, double got, double want, double tol) {
  if (std::fabs(got - want) > tol * (1.0 + std::fabs(want))) {
    std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    ++failures;
  }
}

std::vector<double> random_values(std::mt19937& rng, int64_t count) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> values(static_cast<size_t>(count));
  for (auto& v : values) v = normal(rng);
  return values;
}

// Stores `values` as `dtype` bytes, and rounds `values` to what that dtype holds.
std::vector<char> encode(DType dtype, std::vector<double>& values) {
  std::vector<char> bytes(values.size() * fastmix::element_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::f64) {
      std::memcpy(bytes.data() + 8 * i, &values[i], 8);
    } else {
      float f = static_cast<float>(values[i]);
      if (dtype == DType::f32) {
        std::memcpy(bytes.data() + 4 * i, &f, 4);
      } else {  // bf16: truncate the float's low half; the kernel widens it back exactly
        uint32_t word;
        std::memcpy(&word, &f, 4);
        uint16_t bits = static_cast<uint16_t>(word >> 16);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
        f = fastmix::bf16_bits_to_float(bits);
      }
      values[i] = f;
    }
  }
  return bytes;
}

std::vector<double> results(DType dtype, const std::vector<char>& out) {
  std::vector<double> values;
  if (dtype == DType::f64) {
    const auto* d = reinterpret_cast<const double*>(out.data());
    values.assign(d, d + out.size() / 8);
  } else {
    const auto* f = reinterpret_cast<const float*>(out.data());
    values.assign(f, f + out.size() / 4);
  }
  return values;
}

void check_bilinear(std::mt19937& rng, DType dtype, int64_t n, int64_t p, int64_t q, int64_t k) {
  auto a = random_values(rng, n * p), m = random_values(rng, p * q), b = random_values(rng, n * q);
  auto ab = encode(dtype, a), mb = encode(dtype, m), bb = encode(dtype, b);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  std::uniform_int_distribution<int64_t> pick(-1, k - 1);  // -1 is padding
  for (auto& id : ids) id = pick(rng);

  std::vector<double> rows(static_cast<size_t>(n), 0.0), segments(static_cast<size_t>(k), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < p; ++o) {
      double mb_o = 0;
      for (int64_t i = 0; i < q; ++i) mb_o += m[o * q + i] * b[r * q + i];
      rows[r] += a[r * p + o] * mb_o;
    }
    if (ids[r] >= 0) segments[ids[r]] += rows[r];
  }
  const double tol = dtype == DType::f64 ? 1e-10 : 1e-4;
  const size_t out_size = dtype == DType::f64 ? 8 : 4;
  char label[96];

  std::vector<char> out(static_cast<size_t>(n) * out_size);
  fastmix::rowwise_bilinear_cpu(dtype, ab.data(), mb.data(), bb.data(), n, p, q, nullptr, 0,
                                out.data());
  auto got = results(dtype, out);
  for (int64_t r = 0; r < n; ++r) {
    std::snprintf(label, sizeof label, "bilinear rows dtype=%d n=%lld p=%lld q=%lld row=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)p, (long long)q, (long long)r);
    expect_close(label, got[r], rows[r], tol * std::sqrt(double(p * q)));
  }

  out.assign(static_cast<size_t>(k) * out_size, 0);
  fastmix::rowwise_bilinear_cpu(dtype, ab.data(), mb.data(), bb.data(), n, p, q, ids.data(), k,
                                out.data());
  got = results(dtype, out);
  for (int64_t i = 0; i < k; ++i) {
    std::snprintf(label, sizeof label, "bilinear segments dtype=%d n=%lld k=%lld seg=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)k, (long long)i);
    expect_close(label, got[i], segments[i], tol * std::sqrt(double(n * p * q)));
  }
}

void check_ghost(std::mt19937& rng, DType dtype, int64_t n, int64_t t, int64_t d_in,
                 int64_t d_out, int64_t k) {
  auto x = random_values(rng, n * d_in), g = random_values(rng, n * d_out);
  auto tx = random_values(rng, t * d_in), tg = random_values(rng, t * d_out);
  auto xb = encode(dtype, x), gb = encode(dtype, g), txb = encode(dtype, tx),
       tgb = encode(dtype, tg);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) ids[r] = r % (k + 1) - 1;

  std::vector<double> want(static_cast<size_t>(k), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    if (ids[r] < 0) continue;
    for (int64_t s = 0; s < t; ++s) {
      double xdot = 0, gdot = 0;
      for (int64_t i = 0; i < d_in; ++i) xdot += x[r * d_in + i] * tx[s * d_in + i];
      for (int64_t o = 0; o < d_out; ++o) gdot += g[r * d_out + o] * tg[s * d_out + o];
      want[ids[r]] += xdot * gdot;
    }
  }
  std::vector<char> out(static_cast<size_t>(k) * (dtype == DType::f64 ? 8 : 4), 0);
  fastmix::ghost_dots_cpu(dtype, xb.data(), gb.data(), txb.data(), tgb.data(), n, t, d_in, d_out,
                          ids.data(), k, out.data());
  auto got = results(dtype, out);
  const double tol = dtype == DType::f64 ? 1e-10 : 1e-4;
  char label[96];
  for (int64_t i = 0; i < k; ++i) {
    std::snprintf(label, sizeof label, "ghost dtype=%d n=%lld t=%lld seg=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)t, (long long)i);
    expect_close(label, got[i], want[i], tol * std::sqrt(double(n * t * (d_in + d_out))));
  }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  const DType dtypes[] = {DType::f32, DType::f64, DType::bf16};
  for (DType dtype : dtypes) {
    check_bilinear(rng, dtype, 1, 1, 1, 1);
    check_bilinear(rng, dtype, 5, 3, 7, 2);
    check_bilinear(rng, dtype, 130, 17, 33, 5);  // spans chunks, partial tiles and panels
    check_bilinear(rng, dtype, 257, 40, 24, 64);
    check_ghost(rng, dtype, 1, 1, 1, 1, 1);
    check_ghost(rng, dtype, 70, 19, 9, 13, 3);
    check_ghost(rng, dtype, 129, 33, 16, 5, 7);
  }
  // No rows at all: segment sums are zero.
  std::vector<float> out(3, 1.0f), m(16, 1.0f);
  const int64_t no_ids[1] = {0};
  fastmix::rowwise_bilinear_cpu(DType::f32, nullptr, m.data(), nullptr, 0, 4, 4, no_ids, 3,
                                out.data());
  for (float v : out) expect_close("empty rows", v, 0.0, 0.0);

  if (failures) {
    std::printf("%d failed\n", failures);
    return 1;
  }
  std::printf("alignment CPU kernels: all checks passed\n");
  return 0;
}
