// CPU kernel for weight_grad_dots (contract in weight_grad.h).
//
// A blocked GEMM, C = Gᵀ X with the row dimension N as the shared one. Each thread owns a
// slice of the rows (small outputs: each thread its own output) or of the output rows, and
// walks its rows kBlockRows at a time: the block's g (its slice of columns) and x are packed
// into panels of kMr and kNr columns (widened to the accumulation type), and walked kL2Panels
// g panels at a time against each x panel, so the panels in use stay in L1/L2; the output and
// the target are kept tile by tile, in the order the epilogues read them (a row-major d_in =
// 1024 target put its tiles' rows 4 KiB apart, the same L1 sets). The register tile of the
// micro-kernel starts from zero at every segment boundary, so when a segment ends its piece of
// G_i is still in registers: it is added to the output and dotted with the same tile of V
// there (the epilogue), and G_i never reaches memory. On x86-64 (checked at run time) the
// float micro-kernel is written with AVX-512 or AVX2+FMA intrinsics, accumulators that never
// spill; elsewhere, plain C++.
#include <algorithm>
#include <memory>
#include <vector>

#include "weight_grad.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTMIX_X86_AVX2 1
#endif

namespace fastmix {
namespace {

constexpr int64_t kMr = 6;            // output rows (d_out) of a register tile
constexpr int64_t kNr = 32;           // output columns (d_in) of a register tile
constexpr int64_t kBlockRows = 256;   // rows walked at once: 16-32 KiB of an x panel in L1
constexpr int64_t kL2Panels = 32;     // g panels (6 KiB each in a block) walked against each x panel
constexpr int64_t kDotLanes = 16;     // lanes of a piece's dot, summed once per block and tile
// Below this many multiply-adds a call runs on one thread (waking the other costs more).
constexpr int64_t kParallelWork = int64_t(1) << 18;
// Outputs of up to this many elements (512 KiB in float32) are computed by threads that split
// the rows, each with an output of its own; larger ones by threads that split the output.
constexpr int64_t kSplitRowsOutput = int64_t(1) << 17;

int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

template <typename Acc>
void load_row(DType dtype, const char* src, int64_t count, Acc* dst) {
  if constexpr (sizeof(Acc) == sizeof(double)) {
    std::copy_n(reinterpret_cast<const double*>(src), count, dst);
  } else {
    widen_to_float(dtype, src, count, dst);
  }
}

// c[u][j] += Σ_r a[r][u] b[r][j] over `rows` packed rows; returns Σ_{u,j} (that sum) v[u][j].
// a is packed [rows][kMr], b [rows][kNr]; c and v have leading dimension ld.
template <typename Acc>
FASTMIX_ALWAYS_INLINE Acc register_tile(const Acc* a, const Acc* b, int64_t rows, Acc* c,
                                        const Acc* v, int64_t ld) {
  Acc acc[kMr][kNr] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* b_row = b + r * kNr;
    for (int64_t u = 0; u < kMr; ++u) {
      const Acc value = a[r * kMr + u];
      for (int64_t j = 0; j < kNr; ++j) acc[u][j] += value * b_row[j];
    }
  }
  Acc dot = 0;
  for (int64_t u = 0; u < kMr; ++u)
    for (int64_t j = 0; j < kNr; ++j) {
      c[u * ld + j] += acc[u][j];
      dot += acc[u][j] * v[u * ld + j];
    }
  return dot;
}

#ifdef FASTMIX_X86_AVX2
// All the pieces of a block with AVX2 on a 6 x 16 tile (half the width of the panels; the
// caller walks both halves), rows split into pieces at starts[0..count]. Twelve ymm
// accumulators keep the FMAs' latency hidden, which leaves no room for a running sum (as the
// AVX-512 kernel keeps; six accumulators would wait on the latency): each piece adds into the
// output tile, which stays in L1. The dot of a piece is kept in lanes, added to
// piece_dots[piece][0, 8).
__attribute__((target("avx2,fma"))) void pieces_tile_avx2(const float* a, const float* b,
                                                         const int64_t* starts, int64_t count,
                                                         float* c, const float* v, int64_t ld,
                                                         float* piece_dots) {
  static_assert(kMr == 6 && kDotLanes >= 8, "written for 6-row tiles");
  for (int64_t piece = 0; piece < count; ++piece) {
    // Named accumulators, not an array: GCC would keep an array in memory.
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t r = starts[piece]; r < starts[piece + 1]; ++r) {
      const __m256 low = _mm256_loadu_ps(b + r * kNr);
      const __m256 high = _mm256_loadu_ps(b + r * kNr + 8);
      const float* a_row = a + r * kMr;
      __m256 w = _mm256_broadcast_ss(a_row);
      c00 = _mm256_fmadd_ps(w, low, c00);
      c01 = _mm256_fmadd_ps(w, high, c01);
      w = _mm256_broadcast_ss(a_row + 1);
      c10 = _mm256_fmadd_ps(w, low, c10);
      c11 = _mm256_fmadd_ps(w, high, c11);
      w = _mm256_broadcast_ss(a_row + 2);
      c20 = _mm256_fmadd_ps(w, low, c20);
      c21 = _mm256_fmadd_ps(w, high, c21);
      w = _mm256_broadcast_ss(a_row + 3);
      c30 = _mm256_fmadd_ps(w, low, c30);
      c31 = _mm256_fmadd_ps(w, high, c31);
      w = _mm256_broadcast_ss(a_row + 4);
      c40 = _mm256_fmadd_ps(w, low, c40);
      c41 = _mm256_fmadd_ps(w, high, c41);
      w = _mm256_broadcast_ss(a_row + 5);
      c50 = _mm256_fmadd_ps(w, low, c50);
      c51 = _mm256_fmadd_ps(w, high, c51);
    }
    // Epilogue: add the piece to the output tile and dot it with the target, two chains.
    __m256 dot0 = _mm256_mul_ps(c00, _mm256_loadu_ps(v));
    __m256 dot1 = _mm256_mul_ps(c01, _mm256_loadu_ps(v + 8));
    dot0 = _mm256_fmadd_ps(c10, _mm256_loadu_ps(v + ld), dot0);
    dot1 = _mm256_fmadd_ps(c11, _mm256_loadu_ps(v + ld + 8), dot1);
    dot0 = _mm256_fmadd_ps(c20, _mm256_loadu_ps(v + 2 * ld), dot0);
    dot1 = _mm256_fmadd_ps(c21, _mm256_loadu_ps(v + 2 * ld + 8), dot1);
    dot0 = _mm256_fmadd_ps(c30, _mm256_loadu_ps(v + 3 * ld), dot0);
    dot1 = _mm256_fmadd_ps(c31, _mm256_loadu_ps(v + 3 * ld + 8), dot1);
    dot0 = _mm256_fmadd_ps(c40, _mm256_loadu_ps(v + 4 * ld), dot0);
    dot1 = _mm256_fmadd_ps(c41, _mm256_loadu_ps(v + 4 * ld + 8), dot1);
    dot0 = _mm256_fmadd_ps(c50, _mm256_loadu_ps(v + 5 * ld), dot0);
    dot1 = _mm256_fmadd_ps(c51, _mm256_loadu_ps(v + 5 * ld + 8), dot1);
    float* lanes = piece_dots + piece * kDotLanes;
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_loadu_ps(lanes), _mm256_add_ps(dot0, dot1)));
    const __m256 parts[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                  {c30, c31}, {c40, c41}, {c50, c51}};
    for (int64_t u = 0; u < kMr; ++u) {
      float* c_row = c + u * ld;
      _mm256_storeu_ps(c_row, _mm256_add_ps(_mm256_loadu_ps(c_row), parts[u][0]));
      _mm256_storeu_ps(c_row + 8, _mm256_add_ps(_mm256_loadu_ps(c_row + 8), parts[u][1]));
    }
  }
}

// All the pieces of a block in one call, for rows split into pieces at starts[0..count]:
// twelve zmm accumulators for the current piece and twelve for the running sum, so a piece's
// epilogue is twelve adds and twelve FMAs with the target (kept in lanes, summed later into
// piece_dots[piece][0..16)), and the output tile is read and written once per block.
__attribute__((target("avx512f"))) void pieces_tile_avx512(const float* a, const float* b,
                                                           const int64_t* starts, int64_t count,
                                                           float* c, const float* v, int64_t ld,
                                                           float* piece_dots) {
  __m512 t00 = _mm512_setzero_ps(), t01 = _mm512_setzero_ps();
  __m512 t10 = _mm512_setzero_ps(), t11 = _mm512_setzero_ps();
  __m512 t20 = _mm512_setzero_ps(), t21 = _mm512_setzero_ps();
  __m512 t30 = _mm512_setzero_ps(), t31 = _mm512_setzero_ps();
  __m512 t40 = _mm512_setzero_ps(), t41 = _mm512_setzero_ps();
  __m512 t50 = _mm512_setzero_ps(), t51 = _mm512_setzero_ps();
  for (int64_t piece = 0; piece < count; ++piece) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    for (int64_t r = starts[piece]; r < starts[piece + 1]; ++r) {
      const __m512 low = _mm512_loadu_ps(b + r * kNr);
      const __m512 high = _mm512_loadu_ps(b + r * kNr + 16);
      const float* a_row = a + r * kMr;
      __m512 w = _mm512_set1_ps(a_row[0]);
      c00 = _mm512_fmadd_ps(w, low, c00);
      c01 = _mm512_fmadd_ps(w, high, c01);
      w = _mm512_set1_ps(a_row[1]);
      c10 = _mm512_fmadd_ps(w, low, c10);
      c11 = _mm512_fmadd_ps(w, high, c11);
      w = _mm512_set1_ps(a_row[2]);
      c20 = _mm512_fmadd_ps(w, low, c20);
      c21 = _mm512_fmadd_ps(w, high, c21);
      w = _mm512_set1_ps(a_row[3]);
      c30 = _mm512_fmadd_ps(w, low, c30);
      c31 = _mm512_fmadd_ps(w, high, c31);
      w = _mm512_set1_ps(a_row[4]);
      c40 = _mm512_fmadd_ps(w, low, c40);
      c41 = _mm512_fmadd_ps(w, high, c41);
      w = _mm512_set1_ps(a_row[5]);
      c50 = _mm512_fmadd_ps(w, low, c50);
      c51 = _mm512_fmadd_ps(w, high, c51);
    }
    __m512 dot0 = _mm512_mul_ps(c00, _mm512_loadu_ps(v));
    __m512 dot1 = _mm512_mul_ps(c01, _mm512_loadu_ps(v + 16));
    dot0 = _mm512_fmadd_ps(c10, _mm512_loadu_ps(v + ld), dot0);
    dot1 = _mm512_fmadd_ps(c11, _mm512_loadu_ps(v + ld + 16), dot1);
    dot0 = _mm512_fmadd_ps(c20, _mm512_loadu_ps(v + 2 * ld), dot0);
    dot1 = _mm512_fmadd_ps(c21, _mm512_loadu_ps(v + 2 * ld + 16), dot1);
    dot0 = _mm512_fmadd_ps(c30, _mm512_loadu_ps(v + 3 * ld), dot0);
    dot1 = _mm512_fmadd_ps(c31, _mm512_loadu_ps(v + 3 * ld + 16), dot1);
    dot0 = _mm512_fmadd_ps(c40, _mm512_loadu_ps(v + 4 * ld), dot0);
    dot1 = _mm512_fmadd_ps(c41, _mm512_loadu_ps(v + 4 * ld + 16), dot1);
    dot0 = _mm512_fmadd_ps(c50, _mm512_loadu_ps(v + 5 * ld), dot0);
    dot1 = _mm512_fmadd_ps(c51, _mm512_loadu_ps(v + 5 * ld + 16), dot1);
    float* lanes = piece_dots + piece * 16;
    _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), _mm512_add_ps(dot0, dot1)));
    t00 = _mm512_add_ps(t00, c00), t01 = _mm512_add_ps(t01, c01);
    t10 = _mm512_add_ps(t10, c10), t11 = _mm512_add_ps(t11, c11);
    t20 = _mm512_add_ps(t20, c20), t21 = _mm512_add_ps(t21, c21);
    t30 = _mm512_add_ps(t30, c30), t31 = _mm512_add_ps(t31, c31);
    t40 = _mm512_add_ps(t40, c40), t41 = _mm512_add_ps(t41, c41);
    t50 = _mm512_add_ps(t50, c50), t51 = _mm512_add_ps(t51, c51);
  }
  const __m512 sums[kMr][2] = {{t00, t01}, {t10, t11}, {t20, t21},
                               {t30, t31}, {t40, t41}, {t50, t51}};
  for (int64_t u = 0; u < kMr; ++u) {
    float* c_row = c + u * ld;
    _mm512_storeu_ps(c_row, _mm512_add_ps(_mm512_loadu_ps(c_row), sums[u][0]));
    _mm512_storeu_ps(c_row + 16, _mm512_add_ps(_mm512_loadu_ps(c_row + 16), sums[u][1]));
  }
}
#endif

// The pieces of a block, one register tile each: the dot of piece i goes to piece_dots[i][0].
template <typename Acc>
void pieces_tile(const Acc* a, const Acc* b, const int64_t* starts, int64_t count, Acc* c,
                 const Acc* v, int64_t ld, Acc* piece_dots) {
  for (int64_t i = 0; i < count; ++i)
    piece_dots[i * kDotLanes] += register_tile(a + starts[i] * kMr, b + starts[i] * kNr,
                                               starts[i + 1] - starts[i], c, v, ld);
}

// The pieces kernel for this CPU (checked per call, cheaply) and the columns of a panel it covers:
// AVX-512 the whole 32, AVX2 16 (the caller walks both halves, so the half of an x panel in
// use, 16 KiB, stays in L1 while g's panels stream past it), plain C++ the whole 32.
template <typename Acc>
struct PiecesKernel {
  void (*run)(const Acc*, const Acc*, const int64_t*, int64_t, Acc*, const Acc*, int64_t, Acc*);
  int64_t width;
};

template <typename Acc>
PiecesKernel<Acc> pieces_kernel() {
  if constexpr (sizeof(Acc) == sizeof(float)) {
#ifdef FASTMIX_X86_AVX2
    if (__builtin_cpu_supports("avx512f")) return {pieces_tile_avx512, kNr};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {pieces_tile_avx2, kNr / 2};
#endif
  }
  return {pieces_tile<Acc>, kNr};
}

// Piece boundaries: piece j covers rows [bounds[j], bounds[j + 1]); pieces 1..k are the
// segments, piece 0 and piece k + 1 the rows outside them. Offsets are clamped monotone.
std::vector<int64_t> piece_bounds(const int64_t* offsets, int64_t num_segments, int64_t n_rows) {
  std::vector<int64_t> bounds(static_cast<size_t>(num_segments + 3));
  bounds[0] = 0;
  for (int64_t i = 0; i <= num_segments; ++i)
    bounds[i + 1] = std::min(std::max(offsets[i], bounds[i]), n_rows);
  bounds[num_segments + 2] = n_rows;
  return bounds;
}

// Scratch that lives across calls of the calling thread: fresh allocations of this size cost
// more in page faults than the packing itself.
template <typename Acc>
Acc* scratch(std::vector<Acc>& buffer, int64_t count) {
  if (buffer.size() < static_cast<size_t>(count)) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

// total[c] += row[c] for c < count; returns Σ_c row[c]·b[c], kept in lanes (vectorized without
// reassociating).
template <typename Acc>
FASTMIX_ALWAYS_INLINE Acc add_row_and_dot(const Acc* __restrict row, int64_t count, Acc* __restrict total,
                                          const Acc* __restrict b) {
  Acc lanes[8] = {};
  int64_t c = 0;
  for (; c + 8 <= count; c += 8)
    for (int64_t lane = 0; lane < 8; ++lane) {
      total[c + lane] += row[c + lane];
      lanes[lane] += row[c + lane] * b[c + lane];
    }
  Acc dot = 0;
  for (; c < count; ++c) {
    total[c] += row[c];
    dot += row[c] * b[c];
  }
  for (const Acc lane : lanes) dot += lane;
  return dot;
}

// Row r of a block of `rows` rows, `count` elements, into `panels` panels of `width` columns:
// dst[p][r][j] = src[p width + j], zero past count.
template <typename Acc>
FASTMIX_ALWAYS_INLINE void pack_row(const Acc* src, int64_t count, int64_t panels, int64_t width,
                                    int64_t rows, int64_t r, Acc* dst) {
  const int64_t whole = std::min(panels, count / width);
  for (int64_t p = 0; p < whole; ++p) {
    Acc* out = dst + (p * rows + r) * width;
    for (int64_t j = 0; j < width; ++j) out[j] = src[p * width + j];
  }
  for (int64_t p = whole; p < panels; ++p) {
    Acc* out = dst + (p * rows + r) * width;
    for (int64_t j = 0; j < width; ++j) out[j] = p * width + j < count ? src[p * width + j] : Acc(0);
  }
}

template <typename Acc>
void weight_grad_dots_impl(DType dtype, const void* x, const void* g, const void* target,
                           const void* target_bias, int64_t n_rows, int64_t d_in, int64_t d_out,
                           const int64_t* offsets, int64_t num_segments, Acc* grad_weight,
                           Acc* grad_bias, Acc* dots) {
  const int64_t size = element_size(dtype);
  const auto* x_bytes = static_cast<const char*>(x);
  const auto* g_bytes = static_cast<const char*>(g);
  const std::vector<int64_t> bounds = piece_bounds(offsets, num_segments, n_rows);
  const int64_t n_pieces = num_segments + 2;

  // The output and the target, padded to whole register tiles and stored tile by tile: tile
  // (p, q) (rows p kMr.., columns q kNr..) is kMr x kNr contiguous at (q a_panels + p) kMr kNr,
  // so the epilogues, which walk p for each q, read them in order (prefetched).
  const int64_t out_rows = round_up(d_out, kMr), ld = round_up(d_in, kNr);
  const int64_t a_panels = out_rows / kMr, b_panels = ld / kNr, tile = kMr * kNr;
  auto tile_of = [&](int64_t o, int64_t i) { return ((i / kNr) * a_panels + o / kMr) * tile + (o % kMr) * kNr + i % kNr; };
  thread_local std::vector<Acc> out_buffer, target_buffer, pack_buffer;
  Acc* v = scratch(target_buffer, out_rows * ld);  // written by the threads, below
  const auto* target_bytes = static_cast<const char*>(target);
  std::vector<Acc> bias_target(static_cast<size_t>(out_rows), Acc(0));
  if (target_bias) load_row<Acc>(dtype, static_cast<const char*>(target_bias), d_out, bias_target.data());

  // No barrier per block (on a loaded machine one stalled every thread): one after the target's
  // tiles and one before the copy out. Each thread owns either a slice of the rows and all of
  // the output, in an output of its own that is summed at the end (split_rows), or a slice of
  // the output rows (a_panels split evenly) and all the rows; every thread packs the rows it
  // walks. Splitting the rows packs each row once, splitting the output packs all of x in every
  // thread but keeps one output: on 2 cores the first was 3-17% faster for outputs up to
  // kSplitRowsOutput (widths 128-512), the second up to 7% faster for 768 x 768 and 1024 x 1024
  // ones at N <= 4·d_out (bench/RESULTS.md).
  const bool parallel = n_rows * d_in * d_out > kParallelWork;
  const bool split_rows = parallel && out_rows * ld <= kSplitRowsOutput;
  // Threads: at most one per kParallelWork multiply-adds (each has an output or a slice to zero
  // and sum), per row or per output panel.
  const int64_t work_threads = std::max<int64_t>(n_rows * d_in * d_out / kParallelWork, 1);
  const int threads = static_cast<int>(std::min({static_cast<int64_t>(parallel ? max_threads() : 1), work_threads,
                                                std::max<int64_t>(split_rows ? n_rows : a_panels, 1)}));
  const int outputs = split_rows ? threads : 1;
  Acc* out = scratch(out_buffer, outputs * out_rows * ld);  // zeroed by the threads, below
  const int64_t block = std::min(kBlockRows, n_rows);
  const PiecesKernel<Acc> kernel = pieces_kernel<Acc>();
  const int64_t slice = split_rows ? a_panels : (a_panels + threads - 1) / std::max(threads, 1);
  // Per thread: a_pack[p][r][u] = g[n0 + r][(p0 + p) kMr + u] and b_pack[q][r][j] = x[n0 + r][q kNr + j]
  // for a block of rows from n0, zero past the edges, so each micro-kernel reads contiguous rows;
  // a row of x and g (widened) on the way.
  const int64_t per_thread = block * (slice * kMr + ld) + out_rows + ld;
  Acc* packs = scratch(pack_buffer, threads * per_thread);
  std::vector<double> local_dots(static_cast<size_t>(threads * num_segments), 0.0);
  const bool with_bias = grad_bias != nullptr || target_bias != nullptr;
  std::vector<Acc> bias_totals(static_cast<size_t>(threads * out_rows), Acc(0));
  // Per thread: the pieces of the current block (at most block + 2) and their dots' lanes.
  std::vector<int64_t> piece_lists(static_cast<size_t>(threads * 2 * (block + 3)));
  std::vector<Acc> dot_lanes(static_cast<size_t>(threads * (block + 2) * kDotLanes), Acc(0));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const bool direct = size == static_cast<int64_t>(sizeof(Acc));  // the input is of the accumulation type
    // The target's tiles, zero in the padding (its rows split between the threads; all done
    // before any thread starts on the rows).
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out_rows; ++o)
      for (int64_t i = 0; i < ld; i += kNr) {
        Acc* dst = v + tile_of(o, i);
        const int64_t width = o < d_out ? std::min(kNr, d_in - i) : 0;
        if (width) load_row<Acc>(dtype, target_bytes + (o * d_in + i) * size, width, dst);
        std::fill_n(dst + width, kNr - width, Acc(0));
      }
    // Part t (of the rows, or of the output rows) is walked by one thread; a team smaller than
    // asked for (a nested region, OMP_DYNAMIC) walks the parts in turn.
    for (int64_t t = thread_index(); t < threads; t += team_size()) {
      const int64_t p0 = split_rows ? 0 : std::min(a_panels, t * slice);
      const int64_t p1 = split_rows ? a_panels : std::min(a_panels, p0 + slice);
      const int64_t r0 = split_rows ? n_rows * t / threads : 0;
      const int64_t r1 = split_rows ? n_rows * (t + 1) / threads : n_rows;
      Acc* my_out = out + (split_rows ? t * out_rows * ld : 0);
      Acc* a_pack = packs + t * per_thread;
      Acc* b_pack = a_pack + block * slice * kMr;
      Acc* row = b_pack + block * ld;
      double* my_dots = local_dots.data() + t * num_segments;
      Acc* bias_total = bias_totals.data() + t * out_rows;
      int64_t* starts = piece_lists.data() + t * 2 * (block + 3);
      int64_t* piece_ids = starts + block + 3;
      Acc* piece_dots = dot_lanes.data() + t * (block + 2) * kDotLanes;
      std::fill_n(row, out_rows + ld, Acc(0));
      if (split_rows)  // this part's output, zeroed
        std::fill_n(my_out, out_rows * ld, Acc(0));
      else
        for (int64_t q = 0; q < b_panels; ++q) std::fill_n(out + (q * a_panels + p0) * tile, (p1 - p0) * tile, Acc(0));
      int64_t piece = 0;
      for (int64_t n0 = r0; n0 < r1 && p1 > p0; n0 += block) {
        const int64_t n1 = std::min(n0 + block, r1), rows = n1 - n0;
        const int64_t cols = std::min(d_out, p1 * kMr) - p0 * kMr;  // this slice's columns of g
        while (bounds[piece + 1] <= n0) ++piece;  // the piece holding row n0
        // The block's non-empty pieces: rows [starts[i], starts[i + 1]) of it are piece piece_ids[i].
        int64_t count = 0;
        starts[0] = 0;
        for (int64_t j = piece; j < n_pieces && bounds[j] < n1; ++j) {
          const int64_t hi = std::min(bounds[j + 1], n1) - n0;
          if (hi <= starts[count]) continue;
          piece_ids[count] = j;
          starts[++count] = hi;
        }
        for (int64_t r = 0, i = 0; r < rows; ++r) {
          const char* x_src = x_bytes + (n0 + r) * d_in * size;
          const char* g_src = g_bytes + ((n0 + r) * d_out + p0 * kMr) * size;
          const Acc* g_row = row + ld;
          if (direct) {  // packed straight from the input, the last panels' tails zero
            g_row = reinterpret_cast<const Acc*>(g_src);
            pack_row(reinterpret_cast<const Acc*>(x_src), d_in, b_panels, kNr, rows, r, b_pack);
            pack_row(g_row, cols, p1 - p0, kMr, rows, r, a_pack);
          } else {  // widened into zero-padded rows first
            load_row<Acc>(dtype, x_src, d_in, row);
            pack_row(row, ld, b_panels, kNr, rows, r, b_pack);
            load_row<Acc>(dtype, g_src, cols, row + ld);
            std::fill_n(row + ld + cols, (p1 - p0) * kMr - cols, Acc(0));
            pack_row(row + ld, (p1 - p0) * kMr, p1 - p0, kMr, rows, r, a_pack);
          }
          if (with_bias) {  // this slice of the bias gradient, and the row's dot with the target's bias
            while (r >= starts[i + 1]) ++i;
            const Acc dot = add_row_and_dot(g_row, cols, bias_total + p0 * kMr, bias_target.data() + p0 * kMr);
            if (target_bias && piece_ids[i] >= 1 && piece_ids[i] <= num_segments) my_dots[piece_ids[i] - 1] += dot;
          }
        }
        // kL2Panels of g's panels at a time (they stay in L2), against each part of x's panels.
        for (int64_t chunk = p0; chunk < p1; chunk += kL2Panels)
          for (int64_t q = 0; q < b_panels; ++q)
            for (int64_t column = 0; column < kNr; column += kernel.width) {
              const Acc* b_panel = b_pack + q * rows * kNr + column;
              for (int64_t p = chunk; p < std::min(p1, chunk + kL2Panels); ++p) {
                const int64_t offset = (q * a_panels + p) * tile + column;
                kernel.run(a_pack + (p - p0) * rows * kMr, b_panel, starts, count, my_out + offset, v + offset,
                           kNr, piece_dots);
              }
            }
        for (int64_t i = 0; i < count; ++i) {
          Acc dot = 0;
          for (int64_t lane = 0; lane < kDotLanes; ++lane) dot += piece_dots[i * kDotLanes + lane];
          std::fill_n(piece_dots + i * kDotLanes, kDotLanes, Acc(0));
          if (piece_ids[i] >= 1 && piece_ids[i] <= num_segments) my_dots[piece_ids[i] - 1] += dot;
        }
      }
    }
    // grad_weight from the tiles (the threads' outputs summed), its rows split between the threads
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t o = 0; o < d_out; ++o)
      for (int64_t i = 0; i < d_in; i += kNr) {
        Acc* dst = grad_weight + o * d_in + i;
        const int64_t width = std::min(kNr, d_in - i);
        std::copy_n(out + tile_of(o, i), width, dst);
        for (int other = 1; other < outputs; ++other) {
          const Acc* part = out + other * out_rows * ld + tile_of(o, i);
          for (int64_t j = 0; j < width; ++j) dst[j] += part[j];
        }
      }
  }

  if (grad_bias)
    for (int64_t o = 0; o < d_out; ++o) {
      Acc total = 0;
      for (int t = 0; t < threads; ++t) total += bias_totals[t * out_rows + o];
      grad_bias[o] = total;
    }
  for (int64_t i = 0; i < num_segments; ++i) {
    double total = 0;
    for (int t = 0; t < threads; ++t) total += local_dots[t * num_segments + i];
    dots[i] = static_cast<Acc>(total);
  }
}

constexpr int64_t kPieceChunk = 1024;  // elements of one chunk of add_piece_dot_cpu's sum

// One chunk of add_piece_dot_cpu: the dot in 16 lanes (vectorized without reassociating).
template <typename Acc>
FASTMIX_ALWAYS_INLINE double piece_chunk(const Acc* __restrict piece, Acc* __restrict out,
                                         const Acc* __restrict v, int64_t count) {
  Acc lanes[16] = {};
  int64_t j = 0;
  for (; j + 16 <= count; j += 16)
    for (int64_t lane = 0; lane < 16; ++lane) lanes[lane] += piece[j + lane] * v[j + lane];
  double dot = 0;
  for (; j < count; ++j) dot += static_cast<double>(piece[j]) * v[j];
  for (const Acc lane : lanes) dot += lane;
  if (out)
    for (j = 0; j < count; ++j) out[j] += piece[j];
  return dot;
}

FASTMIX_MULTIVERSION double piece_chunk_mv(const float* piece, float* out, const float* v,
                                           int64_t count) {
  return piece_chunk(piece, out, v, count);
}

FASTMIX_MULTIVERSION double piece_chunk_mv(const double* piece, double* out, const double* v,
                                           int64_t count) {
  return piece_chunk(piece, out, v, count);
}

template <typename Acc>
double add_piece_dot(const Acc* piece, Acc* out, const Acc* v, int64_t count) {
  const int64_t chunks = (count + kPieceChunk - 1) / kPieceChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  // Memory-bound: both cores' bandwidth to L3 helps, so it is split above a few chunks.
#pragma omp parallel for schedule(static) if (chunks > 16)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kPieceChunk, length = std::min(kPieceChunk, count - start);
    partial[static_cast<size_t>(c)] =
        piece_chunk_mv(piece + start, out ? out + start : nullptr, v + start, length);
  }
  double dot = 0;
  for (const double value : partial) dot += value;
  return dot;
}

}  // namespace

double add_piece_dot_cpu(const float* piece, float* out, const float* v, int64_t count) {
  return add_piece_dot(piece, out, v, count);
}

double add_piece_dot_cpu(const double* piece, double* out, const double* v, int64_t count) {
  return add_piece_dot(piece, out, v, count);
}

void weight_grad_dots_cpu(DType dtype, const void* x, const void* g, const void* target,
                          const void* target_bias, int64_t n_rows, int64_t d_in, int64_t d_out,
                          const int64_t* offsets, int64_t num_segments, void* grad_weight,
                          void* grad_bias, void* dots) {
  if (dtype == DType::f64) {
    weight_grad_dots_impl<double>(dtype, x, g, target, target_bias, n_rows, d_in, d_out, offsets,
                                  num_segments, static_cast<double*>(grad_weight),
                                  static_cast<double*>(grad_bias), static_cast<double*>(dots));
  } else {
    weight_grad_dots_impl<float>(dtype, x, g, target, target_bias, n_rows, d_in, d_out, offsets,
                                 num_segments, static_cast<float*>(grad_weight),
                                 static_cast<float*>(grad_bias), static_cast<float*>(dots));
  }
}

}  // namespace fastmix
