// CPU kernels for rowwise_bilinear and ghost_dots (contract in alignment.h).
//
// Rows are processed in chunks of kChunkRows, widened to the accumulation type once.
// The right-hand matrix is packed once into panels of kPanel columns so the inner loop
// is a broadcast-and-FMA over contiguous memory; each kRows x kPanel tile of the GEMM
// lives in registers and is folded into the row results at once, so the N x p product
// never touches memory. On x86-64 with AVX2+FMA (checked at run time) the float tile is
// an intrinsics micro-kernel whose 12 accumulators never spill; elsewhere, plain C++.
#include <algorithm>
#include <vector>

#include "alignment.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTMIX_X86_AVX2 1
#endif

namespace fastmix {
namespace {

constexpr int64_t kChunkRows = 64;  // rows widened and kept hot in L2 at once
// Below this many multiply-adds a call runs on one thread: waking the others costs more than
// it saves, and far more on a busy machine (milliseconds for microseconds of work).
constexpr int64_t kParallelWork = int64_t(1) << 18;
constexpr int64_t kRows = 6;        // rows per register tile: 6 x 16 floats = 12 ymm accumulators
constexpr int64_t kPanel = 16;      // columns per register tile (one zmm or two ymm of float)
constexpr int64_t kDepth = 256;     // shared-dimension slice: a 16 KiB float panel slice fits L1

template <typename Acc>
void load_rows(DType dtype, const void* src, int64_t count, Acc* dst) {
  if constexpr (sizeof(Acc) == sizeof(double)) {
    std::copy_n(static_cast<const double*>(src), count, dst);  // f64 stays f64
  } else {
    widen_to_float(dtype, src, count, dst);
  }
}

// Packs the rows of `m` (p x q) as panels of kPanel rows, transposed:
// panels[pb][i][j] = m[pb * kPanel + j][i], zero beyond p.
template <typename Acc>
std::vector<Acc> pack_panels(DType dtype, const void* m, int64_t p, int64_t q) {
  const int64_t n_panels = (p + kPanel - 1) / kPanel;
  std::vector<Acc> panels(static_cast<size_t>(n_panels * q * kPanel), Acc(0));
  std::vector<Acc> row(static_cast<size_t>(q));
  const auto* bytes = static_cast<const char*>(m);
  for (int64_t o = 0; o < p; ++o) {
    load_rows<Acc>(dtype, bytes + o * q * element_size(dtype), q, row.data());
    Acc* panel = panels.data() + (o / kPanel) * q * kPanel + (o % kPanel);
    for (int64_t i = 0; i < q; ++i) panel[i * kPanel] = row[i];
  }
  return panels;
}

// acc[u][j] += Σ_{i<depth} rows[u][i] * panel[i][j]: one register tile of the GEMM.
template <typename Acc>
FASTMIX_ALWAYS_INLINE void register_tile(const Acc* const rows[kRows], int64_t depth,
                                         const Acc* panel, Acc acc[kRows][kPanel]) {
  for (int64_t i = 0; i < depth; ++i) {
    const Acc* column = panel + i * kPanel;
    for (int64_t u = 0; u < kRows; ++u) {
      const Acc value = rows[u][i];
      for (int64_t j = 0; j < kPanel; ++j) acc[u][j] += value * column[j];
    }
  }
}

#ifdef FASTMIX_X86_AVX2
__attribute__((target("avx2,fma"))) void register_tile_avx2(const float* const rows[kRows],
                                                            int64_t depth, const float* panel,
                                                            float acc[kRows][kPanel]) {
  static_assert(kRows == 6 && kPanel == 16, "the micro-kernel is written for 6 x 16 tiles");
  // Twelve named accumulators, not an array: GCC keeps an array in memory and stores it
  // back every iteration, which halves the speed.
  __m256 c00 = _mm256_loadu_ps(acc[0]), c01 = _mm256_loadu_ps(acc[0] + 8);
  __m256 c10 = _mm256_loadu_ps(acc[1]), c11 = _mm256_loadu_ps(acc[1] + 8);
  __m256 c20 = _mm256_loadu_ps(acc[2]), c21 = _mm256_loadu_ps(acc[2] + 8);
  __m256 c30 = _mm256_loadu_ps(acc[3]), c31 = _mm256_loadu_ps(acc[3] + 8);
  __m256 c40 = _mm256_loadu_ps(acc[4]), c41 = _mm256_loadu_ps(acc[4] + 8);
  __m256 c50 = _mm256_loadu_ps(acc[5]), c51 = _mm256_loadu_ps(acc[5] + 8);
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4],
              *r5 = rows[5];
  for (int64_t i = 0; i < depth; ++i) {
    const __m256 low = _mm256_loadu_ps(panel + i * kPanel);
    const __m256 high = _mm256_loadu_ps(panel + i * kPanel + 8);
    __m256 v = _mm256_broadcast_ss(r0 + i);
    c00 = _mm256_fmadd_ps(v, low, c00);
    c01 = _mm256_fmadd_ps(v, high, c01);
    v = _mm256_broadcast_ss(r1 + i);
    c10 = _mm256_fmadd_ps(v, low, c10);
    c11 = _mm256_fmadd_ps(v, high, c11);
    v = _mm256_broadcast_ss(r2 + i);
    c20 = _mm256_fmadd_ps(v, low, c20);
    c21 = _mm256_fmadd_ps(v, high, c21);
    v = _mm256_broadcast_ss(r3 + i);
    c30 = _mm256_fmadd_ps(v, low, c30);
    c31 = _mm256_fmadd_ps(v, high, c31);
    v = _mm256_broadcast_ss(r4 + i);
    c40 = _mm256_fmadd_ps(v, low, c40);
    c41 = _mm256_fmadd_ps(v, high, c41);
    v = _mm256_broadcast_ss(r5 + i);
    c50 = _mm256_fmadd_ps(v, low, c50);
    c51 = _mm256_fmadd_ps(v, high, c51);
  }
  _mm256_storeu_ps(acc[0], c00), _mm256_storeu_ps(acc[0] + 8, c01);
  _mm256_storeu_ps(acc[1], c10), _mm256_storeu_ps(acc[1] + 8, c11);
  _mm256_storeu_ps(acc[2], c20), _mm256_storeu_ps(acc[2] + 8, c21);
  _mm256_storeu_ps(acc[3], c30), _mm256_storeu_ps(acc[3] + 8, c31);
  _mm256_storeu_ps(acc[4], c40), _mm256_storeu_ps(acc[4] + 8, c41);
  _mm256_storeu_ps(acc[5], c50), _mm256_storeu_ps(acc[5] + 8, c51);
}
#endif

using FloatTile = void (*)(const float* const[kRows], int64_t, const float*, float[kRows][kPanel]);

// The float register tile for this CPU, chosen once.
FloatTile float_tile() {
#ifdef FASTMIX_X86_AVX2
  static const FloatTile tile = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                                    ? register_tile_avx2
                                    : register_tile<float>;
  return tile;
#else
  return register_tile<float>;
#endif
}

template <typename Acc>
FASTMIX_ALWAYS_INLINE void tile(const Acc* const rows[kRows], int64_t depth, const Acc* panel,
                                Acc acc[kRows][kPanel]) {
  if constexpr (sizeof(Acc) == sizeof(float)) {
    float_tile()(rows, depth, panel, acc);
  } else {
    register_tile(rows, depth, panel, acc);
  }
}

// Points the kRows tile rows at rows r0.. of `base`; past the end they repeat the last
// valid row so the tile stays branch-free (those results are ignored).
template <typename Acc>
FASTMIX_ALWAYS_INLINE void tile_rows(const Acc* base, int64_t width, int64_t r0,
                                     int64_t count, const Acc* rows[kRows]) {
  for (int64_t u = 0; u < kRows; ++u) rows[u] = base + (r0 + std::min(u, count - r0 - 1)) * width;
}

// row_out[r] = a[r] · (m b[r]) for the rows of one chunk. The shared dimension is walked
// kDepth at a time so the panel slice in use stays in L1; tile partials wait in `tiles`.
template <typename Acc>
FASTMIX_ALWAYS_INLINE void bilinear_chunk(const Acc* a, const Acc* b, int64_t count, int64_t p,
                                          int64_t q, const Acc* panels, Acc* row_out) {
  Acc tiles[kChunkRows][kPanel];
  std::fill_n(row_out, count, Acc(0));
  for (int64_t pb = 0; pb * kPanel < p; ++pb) {
    const Acc* panel = panels + pb * q * kPanel;
    const int64_t cols = std::min(kPanel, p - pb * kPanel);
    for (int64_t r = 0; r < count; ++r) std::fill_n(tiles[r], kPanel, Acc(0));
    for (int64_t i0 = 0; i0 < q; i0 += kDepth) {
      const int64_t depth = std::min(kDepth, q - i0);
      for (int64_t r0 = 0; r0 < count; r0 += kRows) {
        const Acc* rows[kRows];
        tile_rows(b + i0, q, r0, count, rows);
        Acc acc[kRows][kPanel];
        for (int64_t u = 0; u < kRows; ++u)
          for (int64_t j = 0; j < kPanel; ++j) acc[u][j] = tiles[std::min(r0 + u, count - 1)][j];
        tile(rows, depth, panel + i0 * kPanel, acc);
        for (int64_t u = 0; u < std::min(kRows, count - r0); ++u)
          for (int64_t j = 0; j < kPanel; ++j) tiles[r0 + u][j] = acc[u][j];
      }
    }
    for (int64_t r = 0; r < count; ++r) {
      const Acc* a_row = a + r * p + pb * kPanel;
      Acc dot = 0;
      for (int64_t j = 0; j < cols; ++j) dot += tiles[r][j] * a_row[j];
      row_out[r] += dot;
    }
  }
}

// row_out[r] = Σ_t (x[r] · tx[t]) (g[r] · tg[t]) for the rows of one chunk.
template <typename Acc>
FASTMIX_ALWAYS_INLINE void ghost_chunk(const Acc* x, const Acc* g, int64_t count,
                                       int64_t n_target, int64_t d_in, int64_t d_out,
                                       const Acc* x_panels, const Acc* g_panels, Acc* row_out) {
  std::fill_n(row_out, count, Acc(0));
  for (int64_t pb = 0; pb * kPanel < n_target; ++pb) {
    const int64_t cols = std::min(kPanel, n_target - pb * kPanel);
    for (int64_t r0 = 0; r0 < count; r0 += kRows) {
      const Acc* rows[kRows];
      Acc x_dots[kRows][kPanel] = {};
      Acc g_dots[kRows][kPanel] = {};
      tile_rows(x, d_in, r0, count, rows);
      tile(rows, d_in, x_panels + pb * d_in * kPanel, x_dots);
      tile_rows(g, d_out, r0, count, rows);
      tile(rows, d_out, g_panels + pb * d_out * kPanel, g_dots);
      for (int64_t u = 0; u < std::min(kRows, count - r0); ++u) {
        Acc sum = 0;
        for (int64_t j = 0; j < cols; ++j) sum += x_dots[u][j] * g_dots[u][j];
        row_out[r0 + u] += sum;
      }
    }
  }
}

// Runs `chunk(start, count, row_out)` over all rows in parallel and writes either the
// per-row results or their per-segment sums (in double, whatever Acc is) to `out`.
template <typename Acc, typename Chunk>
void reduce_rows(int64_t n_rows, int64_t work_per_row, const int64_t* segment_ids,
                 int64_t num_segments, Acc* out, const Chunk& chunk) {
  const int64_t n_chunks = (n_rows + kChunkRows - 1) / kChunkRows;
  const bool parallel = n_chunks > 1 && n_rows * work_per_row > kParallelWork;
  std::vector<double> totals(segment_ids ? static_cast<size_t>(num_segments) : 0, 0.0);
  const int threads = parallel ? max_threads() : 1;
  std::vector<Acc> row_outs(static_cast<size_t>(threads) * kChunkRows);
  std::vector<double> locals(static_cast<size_t>(threads) * totals.size(), 0.0);
#pragma omp parallel if (parallel) num_threads(threads)
  {
    Acc* row_out = row_outs.data() + static_cast<size_t>(thread_index()) * kChunkRows;
    double* local = locals.data() + static_cast<size_t>(thread_index()) * totals.size();
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t start = c * kChunkRows;
      const int64_t count = std::min(kChunkRows, n_rows - start);
      chunk(start, count, row_out);
      for (int64_t r = 0; r < count; ++r) {
        if (!segment_ids) {
          out[start + r] = row_out[r];
        } else {
          const int64_t id = segment_ids[start + r];
          if (id >= 0 && id < num_segments) local[id] += row_out[r];
        }
      }
    }
#pragma omp critical
    for (size_t i = 0; i < totals.size(); ++i) totals[i] += local[i];
  }
  for (size_t i = 0; i < totals.size(); ++i) out[i] = static_cast<Acc>(totals[i]);
}

template <typename Acc>
void rowwise_bilinear_impl(DType dtype, const void* a, const void* m, const void* b,
                           int64_t n_rows, int64_t p, int64_t q, const int64_t* segment_ids,
                           int64_t num_segments, Acc* out) {
  const std::vector<Acc> panels = pack_panels<Acc>(dtype, m, p, q);
  const auto* a_bytes = static_cast<const char*>(a);
  const auto* b_bytes = static_cast<const char*>(b);
  const int64_t size = element_size(dtype);
  reduce_rows<Acc>(n_rows, p * q, segment_ids, num_segments, out,
                   [&](int64_t start, int64_t count, Acc* row_out) {
                     thread_local std::vector<Acc> a_rows, b_rows;
                     a_rows.resize(static_cast<size_t>(count * p));
                     b_rows.resize(static_cast<size_t>(count * q));
                     load_rows<Acc>(dtype, a_bytes + start * p * size, count * p, a_rows.data());
                     load_rows<Acc>(dtype, b_bytes + start * q * size, count * q, b_rows.data());
                     bilinear_chunk(a_rows.data(), b_rows.data(), count, p, q, panels.data(),
                                    row_out);
                   });
}

template <typename Acc>
void ghost_dots_impl(DType dtype, const void* x, const void* g, const void* target_x,
                     const void* target_g, int64_t n_rows, int64_t n_target, int64_t d_in,
                     int64_t d_out, const int64_t* segment_ids, int64_t num_segments,
                     Acc* out) {
  const std::vector<Acc> x_panels = pack_panels<Acc>(dtype, target_x, n_target, d_in);
  const std::vector<Acc> g_panels = pack_panels<Acc>(dtype, target_g, n_target, d_out);
  const auto* x_bytes = static_cast<const char*>(x);
  const auto* g_bytes = static_cast<const char*>(g);
  const int64_t size = element_size(dtype);
  reduce_rows<Acc>(n_rows, n_target * (d_in + d_out), segment_ids, num_segments, out,
                   [&](int64_t start, int64_t count, Acc* row_out) {
                     thread_local std::vector<Acc> x_rows, g_rows;
                     x_rows.resize(static_cast<size_t>(count * d_in));
                     g_rows.resize(static_cast<size_t>(count * d_out));
                     load_rows<Acc>(dtype, x_bytes + start * d_in * size, count * d_in,
                                    x_rows.data());
                     load_rows<Acc>(dtype, g_bytes + start * d_out * size, count * d_out,
                                    g_rows.data());
                     ghost_chunk(x_rows.data(), g_rows.data(), count, n_target, d_in, d_out,
                                 x_panels.data(), g_panels.data(), row_out);
                   });
}

}  // namespace

void rowwise_bilinear_cpu(DType dtype, const void* a, const void* m, const void* b,
                          int64_t n_rows, int64_t p, int64_t q, const int64_t* segment_ids,
                          int64_t num_segments, void* out) {
  if (dtype == DType::f64) {
    rowwise_bilinear_impl<double>(dtype, a, m, b, n_rows, p, q, segment_ids, num_segments,
                                  static_cast<double*>(out));
  } else {
    rowwise_bilinear_impl<float>(dtype, a, m, b, n_rows, p, q, segment_ids, num_segments,
                                 static_cast<float*>(out));
  }
}

void ghost_dots_cpu(DType dtype, const void* x, const void* g, const void* target_x,
                    const void* target_g, int64_t n_rows, int64_t n_target_rows, int64_t d_in,
                    int64_t d_out, const int64_t* segment_ids, int64_t num_segments,
                    void* out) {
  if (dtype == DType::f64) {
    ghost_dots_impl<double>(dtype, x, g, target_x, target_g, n_rows, n_target_rows, d_in,
                            d_out, segment_ids, num_segments, static_cast<double*>(out));
  } else {
    ghost_dots_impl<float>(dtype, x, g, target_x, target_g, n_rows, n_target_rows, d_in,
                           d_out, segment_ids, num_segments, static_cast<float*>(out));
  }
}

}  // namespace fastmix
