// Checks the CPU alignment kernels against naive double-precision loops, without torch.
// Errors are bounded relative to the sum of |terms| of each result, as the Python tests do.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "alignment.h"

using fastmix::DType;

namespace {

int failures = 0;

// Inputs are rounded to the dtype first, so only accumulation error remains: float32 (or
// float64) accumulation, relative to the sum of |terms|.
double tolerance(DType dtype) { return dtype == DType::f64 ? 1e-10 : 2e-5; }

void expect_close(const char* what, double got, double want, double bound) {
  if (!(std::fabs(got - want) <= bound)) {
    std::printf("FAIL %s: got %.9g want %.9g (error %.3g > %.3g)\n", what, got, want,
                std::fabs(got - want), bound);
    ++failures;
  }
}

std::vector<double> random_values(std::mt19937& rng, int64_t count) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> values(static_cast<size_t>(count));
  for (auto& v : values) v = normal(rng);
  return values;
}

// Random domain ids in [-1, k): -1 is padding.
std::vector<int64_t> random_ids(std::mt19937& rng, int64_t n, int64_t k) {
  std::uniform_int_distribution<int64_t> pick(-1, k - 1);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = pick(rng);
  return ids;
}

// float16 bits of `f`, which must be a multiple of 2^-8 below 8 in magnitude: such values
// have at most 11 significant bits and a normal float16 exponent, so the bits are exact.
uint16_t f16_bits(float f) {
  uint32_t word;
  std::memcpy(&word, &f, 4);
  const auto sign = static_cast<uint16_t>((word >> 16) & 0x8000u);
  if (f == 0.0f) return sign;
  const uint32_t exponent = ((word >> 23) & 0xffu) - 127u + 15u;
  const auto bits = static_cast<uint16_t>(sign | (exponent << 10) | ((word >> 13) & 0x3ffu));
  if (fastmix::f16_bits_to_float(bits) != f) {
    std::printf("f16_bits: %.9g is not exact in float16\n", f);
    std::exit(2);
  }
  return bits;
}

// Stores `values` as `dtype` bytes, and rounds `values` to what that dtype holds.
std::vector<char> encode(DType dtype, std::vector<double>& values) {
  std::vector<char> bytes(values.size() * fastmix::element_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::f64) {
      std::memcpy(bytes.data() + 8 * i, &values[i], 8);
      continue;
    }
    float f = static_cast<float>(values[i]);
    if (dtype == DType::f32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    } else if (dtype == DType::bf16) {  // truncate the float's low half; the kernel widens it back exactly
      uint32_t word;
      std::memcpy(&word, &f, 4);
      const auto bits = static_cast<uint16_t>(word >> 16);
      std::memcpy(bytes.data() + 2 * i, &bits, 2);
      f = fastmix::bf16_bits_to_float(bits);
    } else {  // f16: onto the grid of 2^-8 within (-8, 8), exact in float16
      f = static_cast<float>(std::fmax(-2047.0, std::fmin(2047.0, std::round(values[i] * 256.0))) / 256.0);
      const uint16_t bits = f16_bits(f);
      std::memcpy(bytes.data() + 2 * i, &bits, 2);
    }
    values[i] = f;
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

size_t out_bytes(DType dtype, int64_t length) {
  return static_cast<size_t>(length) * (dtype == DType::f64 ? 8 : 4);
}

void check_bilinear(std::mt19937& rng, DType dtype, int64_t n, int64_t p, int64_t q, int64_t k) {
  auto a = random_values(rng, n * p), m = random_values(rng, p * q), b = random_values(rng, n * q);
  auto ab = encode(dtype, a), mb = encode(dtype, m), bb = encode(dtype, b);
  const auto ids = random_ids(rng, n, k);

  // r_n = Σ_o a_no Σ_i m_oi b_ni, and its Σ|terms| = Σ_o |a_no| Σ_i |m_oi b_ni|
  std::vector<double> rows(static_cast<size_t>(n), 0.0), row_scale(static_cast<size_t>(n), 0.0);
  std::vector<double> segments(static_cast<size_t>(k), 0.0), segment_scale(static_cast<size_t>(k), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < p; ++o) {
      double mb_o = 0, mb_o_abs = 0;
      for (int64_t i = 0; i < q; ++i) {
        mb_o += m[o * q + i] * b[r * q + i];
        mb_o_abs += std::fabs(m[o * q + i] * b[r * q + i]);
      }
      rows[r] += a[r * p + o] * mb_o;
      row_scale[r] += std::fabs(a[r * p + o]) * mb_o_abs;
    }
    if (ids[r] >= 0) {
      segments[ids[r]] += rows[r];
      segment_scale[ids[r]] += row_scale[r];
    }
  }
  char label[128];

  std::vector<char> out(out_bytes(dtype, n));
  fastmix::rowwise_bilinear_cpu(dtype, ab.data(), mb.data(), bb.data(), n, p, q, nullptr, 0,
                                out.data());
  auto got = results(dtype, out);
  for (int64_t r = 0; r < n; ++r) {
    std::snprintf(label, sizeof label, "bilinear rows dtype=%d n=%lld p=%lld q=%lld row=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)p, (long long)q, (long long)r);
    expect_close(label, got[r], rows[r], tolerance(dtype) * row_scale[r]);
  }

  out.assign(out_bytes(dtype, k), 0);
  fastmix::rowwise_bilinear_cpu(dtype, ab.data(), mb.data(), bb.data(), n, p, q, ids.data(), k,
                                out.data());
  got = results(dtype, out);
  for (int64_t i = 0; i < k; ++i) {
    std::snprintf(label, sizeof label, "bilinear segments dtype=%d n=%lld p=%lld q=%lld seg=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)p, (long long)q, (long long)i);
    expect_close(label, got[i], segments[i], tolerance(dtype) * segment_scale[i]);
  }
}

void check_ghost(std::mt19937& rng, DType dtype, int64_t n, int64_t t, int64_t d_in,
                 int64_t d_out, int64_t k) {
  auto x = random_values(rng, n * d_in), g = random_values(rng, n * d_out);
  auto tx = random_values(rng, t * d_in), tg = random_values(rng, t * d_out);
  auto xb = encode(dtype, x), gb = encode(dtype, g), txb = encode(dtype, tx),
       tgb = encode(dtype, tg);
  const auto ids = random_ids(rng, n, k);

  // s_i = Σ_{n∈i} Σ_t (x_n·tx_t)(g_n·tg_t), and its scale Σ_{n∈i} Σ_t |x_n·tx_t| |g_n·tg_t|
  std::vector<double> want(static_cast<size_t>(k), 0.0), scale(static_cast<size_t>(k), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    if (ids[r] < 0) continue;
    for (int64_t s = 0; s < t; ++s) {
      double xdot = 0, gdot = 0;
      for (int64_t i = 0; i < d_in; ++i) xdot += x[r * d_in + i] * tx[s * d_in + i];
      for (int64_t o = 0; o < d_out; ++o) gdot += g[r * d_out + o] * tg[s * d_out + o];
      want[ids[r]] += xdot * gdot;
      scale[ids[r]] += std::fabs(xdot * gdot);
    }
  }
  std::vector<char> out(out_bytes(dtype, k), 0);
  fastmix::ghost_dots_cpu(dtype, xb.data(), gb.data(), txb.data(), tgb.data(), n, t, d_in, d_out,
                          ids.data(), k, out.data());
  auto got = results(dtype, out);
  char label[128];
  for (int64_t i = 0; i < k; ++i) {
    std::snprintf(label, sizeof label, "ghost dtype=%d n=%lld t=%lld d_in=%lld d_out=%lld seg=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)t, (long long)d_in,
                  (long long)d_out, (long long)i);
    expect_close(label, got[i], want[i], tolerance(dtype) * scale[i]);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  const DType dtypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
  for (DType dtype : dtypes) {
    check_bilinear(rng, dtype, 1, 1, 1, 1);
    check_bilinear(rng, dtype, 5, 3, 7, 2);
    check_bilinear(rng, dtype, 130, 17, 33, 5);  // spans chunks, partial tiles and panels
    check_bilinear(rng, dtype, 257, 40, 24, 64);
    check_bilinear(rng, dtype, 300, 150, 300, 7);  // q crosses the kDepth = 256 slices
    check_ghost(rng, dtype, 1, 1, 1, 1, 1);
    check_ghost(rng, dtype, 70, 19, 9, 13, 3);
    check_ghost(rng, dtype, 129, 33, 16, 5, 7);
    check_ghost(rng, dtype, 300, 150, 96, 96, 5);
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
