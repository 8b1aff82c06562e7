// Checks the CPU weight_grad_dots kernel against naive double-precision loops, without torch.
// Errors are bounded relative to the sum of |terms| of each result, as the Python tests do.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "weight_grad.h"

using fastmix::DType;

namespace {

int failures = 0;

double tolerance(DType dtype) { return dtype == DType::f64 ? 1e-10 : 2e-5; }

void expect_close(const char* what, double got, double want, double bound) {
  if (!(std::fabs(got - want) <= bound)) {
    std::printf("FAIL %s: got %.9g want %.9g (error %.3g > %.3g)\n", what, got, want,
                std::fabs(got - want), bound);
    ++failures;
  }
}

// Random values stored as `dtype` bytes; `values` is rounded to what the dtype holds
// (bf16 by truncating the float's low half, which the kernel widens back exactly).
std::vector<char> random_bytes(std::mt19937& rng, DType dtype, int64_t count,
                               std::vector<double>& values) {
  std::normal_distribution<double> normal(0.0, 1.0);
  values.resize(static_cast<size_t>(count));
  std::vector<char> bytes(static_cast<size_t>(count * fastmix::element_size(dtype)));
  for (int64_t i = 0; i < count; ++i) {
    double value = normal(rng);
    if (dtype == DType::f64) {
      std::memcpy(bytes.data() + 8 * i, &value, 8);
    } else {
      float f = static_cast<float>(value);
      if (dtype == DType::bf16) {
        uint32_t word;
        std::memcpy(&word, &f, 4);
        const auto bits = static_cast<uint16_t>(word >> 16);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
        f = fastmix::bf16_bits_to_float(bits);
      } else {
        std::memcpy(bytes.data() + 4 * i, &f, 4);
      }
      value = f;
    }
    values[static_cast<size_t>(i)] = value;
  }
  return bytes;
}

double read(DType dtype, const std::vector<char>& out, int64_t i) {
  if (dtype == DType::f64) return reinterpret_cast<const double*>(out.data())[i];
  return reinterpret_cast<const float*>(out.data())[i];
}

// Random offsets in [0, n], non-decreasing: rows outside them and empty segments included.
std::vector<int64_t> random_offsets(std::mt19937& rng, int64_t n, int64_t k) {
  std::uniform_int_distribution<int64_t> pick(0, n);
  std::vector<int64_t> offsets(static_cast<size_t>(k + 1));
  for (auto& o : offsets) o = pick(rng);
  std::sort(offsets.begin(), offsets.end());
  return offsets;
}

void check(std::mt19937& rng, DType dtype, int64_t n, int64_t d_in, int64_t d_out, int64_t k,
           bool bias) {
  std::vector<double> x, g, v, vb;
  const auto xb = random_bytes(rng, dtype, n * d_in, x), gb = random_bytes(rng, dtype, n * d_out, g);
  const auto vbytes = random_bytes(rng, dtype, d_out * d_in, v), vbb = random_bytes(rng, dtype, d_out, vb);
  const auto offsets = random_offsets(rng, n, k);
  const size_t acc = dtype == DType::f64 ? 8 : 4;
  std::vector<char> gw(static_cast<size_t>(d_out * d_in) * acc), gbias(static_cast<size_t>(d_out) * acc),
      dots(static_cast<size_t>(k) * acc);
  fastmix::weight_grad_dots_cpu(dtype, xb.data(), gb.data(), vbytes.data(), bias ? vbb.data() : nullptr,
                                n, d_in, d_out, offsets.data(), k, gw.data(),
                                bias ? gbias.data() : nullptr, dots.data());
  char label[160];
  for (int64_t o = 0; o < d_out; ++o) {
    double bias_sum = 0, bias_scale = 0;
    for (int64_t r = 0; r < n; ++r) bias_sum += g[r * d_out + o], bias_scale += std::fabs(g[r * d_out + o]);
    if (bias) {
      std::snprintf(label, sizeof label, "grad_bias dtype=%d n=%lld o=%lld", static_cast<int>(dtype),
                    (long long)n, (long long)o);
      expect_close(label, read(dtype, gbias, o), bias_sum, tolerance(dtype) * bias_scale);
    }
    for (int64_t i = 0; i < d_in; ++i) {
      double sum = 0, scale = 0;
      for (int64_t r = 0; r < n; ++r) {
        sum += g[r * d_out + o] * x[r * d_in + i];
        scale += std::fabs(g[r * d_out + o] * x[r * d_in + i]);
      }
      std::snprintf(label, sizeof label, "grad_weight dtype=%d n=%lld d_in=%lld d_out=%lld (%lld, %lld)",
                    static_cast<int>(dtype), (long long)n, (long long)d_in, (long long)d_out,
                    (long long)o, (long long)i);
      expect_close(label, read(dtype, gw, o * d_in + i), sum, tolerance(dtype) * scale);
    }
  }
  for (int64_t s = 0; s < k; ++s) {
    double want = 0, scale = 0;
    for (int64_t r = offsets[s]; r < offsets[s + 1]; ++r)
      for (int64_t o = 0; o < d_out; ++o) {
        double row = 0, row_scale = 0;
        for (int64_t i = 0; i < d_in; ++i) {
          row += v[o * d_in + i] * x[r * d_in + i];
          row_scale += std::fabs(v[o * d_in + i] * x[r * d_in + i]);
        }
        if (bias) row += vb[o], row_scale += std::fabs(vb[o]);
        want += g[r * d_out + o] * row;
        scale += std::fabs(g[r * d_out + o]) * row_scale;
      }
    std::snprintf(label, sizeof label, "dots dtype=%d n=%lld d_in=%lld d_out=%lld k=%lld seg=%lld",
                  static_cast<int>(dtype), (long long)n, (long long)d_in, (long long)d_out,
                  (long long)k, (long long)s);
    expect_close(label, read(dtype, dots, s), want, tolerance(dtype) * scale);
  }
}

// add_piece_dot_cpu: the dot against naive double sums, and the piece added exactly.
template <typename Acc>
void check_piece_dot(std::mt19937& rng, int64_t count, bool add) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<Acc> piece(static_cast<size_t>(count)), out(piece.size()), v(piece.size());
  double want = 0, scale = 0;
  for (size_t i = 0; i < piece.size(); ++i) {
    piece[i] = static_cast<Acc>(normal(rng)), out[i] = static_cast<Acc>(normal(rng)), v[i] = static_cast<Acc>(normal(rng));
    want += static_cast<double>(piece[i]) * v[i], scale += std::fabs(static_cast<double>(piece[i]) * v[i]);
  }
  const std::vector<Acc> before = out;
  const double got = fastmix::add_piece_dot_cpu(piece.data(), add ? out.data() : nullptr, v.data(), count);
  char label[96];
  std::snprintf(label, sizeof label, "add_piece_dot_cpu size=%d count=%lld add=%d", static_cast<int>(sizeof(Acc)),
                (long long)count, add);
  expect_close(label, got, want, tolerance(sizeof(Acc) == 8 ? DType::f64 : DType::f32) * scale);
  for (size_t i = 0; i < piece.size(); ++i)
    if (out[i] != (add ? static_cast<Acc>(before[i] + piece[i]) : before[i])) {
      std::printf("FAIL %s: out[%zu]\n", label, i);
      ++failures;
      break;
    }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  for (DType dtype : {DType::f32, DType::f64, DType::bf16}) {
    check(rng, dtype, 1, 1, 1, 1, true);     // one row, k = 1
    check(rng, dtype, 7, 5, 3, 1, false);
    check(rng, dtype, 70, 33, 17, 20, true);  // many empty segments
    // Crosses the 6 x 32 register tiles, the 96-row thread tiles and the 256-row blocks.
    check(rng, dtype, 600, 70, 200, 9, true);
    check(rng, dtype, 300, 64, 96, 300, false);  // one row per segment
  }
  check(rng, DType::f32, 0, 4, 3, 2, true);  // no rows: zeros
  check(rng, DType::f32, 5, 0, 3, 2, true);  // no inputs: the bias still sums
  for (int64_t count : {0, 1, 17, 1024, 1025, 200003})  // chunks and their tails, one and many threads
    for (bool add : {false, true}) check_piece_dot<float>(rng, count, add), check_piece_dot<double>(rng, count, add);
  if (failures) {
    std::printf("%d failed\n", failures);
    return 1;
  }
  std::printf("weight_grad_dots CPU kernel: all checks passed\n");
  return 0;
}
