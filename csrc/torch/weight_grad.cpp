// CPU binding of weight_grad_dots: checks (the offsets too, read on the host), contiguous
// copies, then the kernels.
//
// Segments of at least kBlasRows rows take MKL (at::mm): G_i is formed in one scratch matrix,
// dotted with V and added into grad_weight in one pass (add_piece_dot_cpu), so the GEMM runs at
// BLAS speed and the dot costs one read of G_i and V per segment, ≈ 4·d_in·d_out memory
// accesses against the GEMM's 2·rows·d_in·d_out flops. The first piece is written straight into
// grad_weight, so at k = 1 the op is one GEMM and one dot. Runs of smaller segments (and rows
// outside the segments) go to the raw kernel, whose register-tile epilogue costs less there.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../kernels/weight_grad.h"
#include "weight_grad_args.h"

namespace fastmix {
namespace {

// Rows from which a segment's G_i is cheaper by at::mm and a pass over it than in the raw
// kernel (bench/RESULTS.md, "weight_grad_dots": both about 1.2-1.3x torch.mm at 128 rows, the
// kernel ahead below, MKL above).
constexpr int64_t kBlasRows = 128;

void check_offsets(const at::Tensor& offsets, int64_t n_rows) {
  const int64_t* values = offsets.data_ptr<int64_t>();
  int64_t previous = 0;
  for (int64_t i = 0; i < offsets.size(0); ++i) {
    TORCH_CHECK(values[i] >= previous && values[i] <= n_rows, "offsets must be non-decreasing "
                "within [0, x.shape[0]] = [0, ", n_rows, "], got offsets[", i, "] = ", values[i],
                i > 0 ? " after " : "", i > 0 ? std::to_string(previous) : std::string());
    previous = values[i];
  }
}

void run_kernel(const at::Tensor& x, const at::Tensor& g, const at::Tensor& v,
                const at::Tensor* v_bias, int64_t row0, int64_t row1, const int64_t* offsets,
                int64_t num_segments, const at::Tensor& grad_weight, const at::Tensor* grad_bias,
                void* dots) {
  const int64_t d_in = x.size(1), d_out = g.size(1), size = x.element_size();
  weight_grad_dots_cpu(kernel_dtype(x, "x"), static_cast<const char*>(x.data_ptr()) + row0 * d_in * size,
                       static_cast<const char*>(g.data_ptr()) + row0 * d_out * size, v.data_ptr(),
                       v_bias ? v_bias->data_ptr() : nullptr, row1 - row0, d_in, d_out, offsets,
                       num_segments, grad_weight.data_ptr(), grad_bias ? grad_bias->data_ptr() : nullptr,
                       dots);
}

// Rows of piece j: j = 0 the rows before offsets[0], j = 1..k segment j - 1, j = k + 1 the rows
// from offsets[k] on (the pieces of the raw kernel).
int64_t piece_start(const int64_t* offsets, int64_t j) { return j == 0 ? 0 : offsets[j - 1]; }
int64_t piece_end(const int64_t* offsets, int64_t num_segments, int64_t n_rows, int64_t j) {
  return j <= num_segments ? offsets[j] : n_rows;
}

// Large segments by at::mm, runs of small pieces by the raw kernel, all in the accumulation
// dtype (16-bit inputs widened once, exactly). x, g, v and v_bias are contiguous.
template <typename Acc>
void blas_and_kernel(const at::Tensor& x, const at::Tensor& g, const at::Tensor& v,
                     const std::optional<at::Tensor>& v_bias, const int64_t* offsets,
                     int64_t num_segments, at::Tensor grad_weight, const at::Tensor& grad_bias,
                     bool with_bias, const at::Tensor& dots) {
  const int64_t n_rows = x.size(0), pieces = num_segments + 2;
  auto rows = [&](int64_t j) { return piece_end(offsets, num_segments, n_rows, j) - piece_start(offsets, j); };
  dots.zero_();
  Acc* dot = dots.data_ptr<Acc>();
  bool written = false;  // grad_weight holds the pieces so far; until then it is not written
  at::Tensor scratch;
  // ⟨Σ_{n∈i} g_n, V_b⟩ of every segment from one product g V_b, summed per segment here: a
  // sum, a dot and a host read per segment cost more than the GEMM at small widths
  at::Tensor row_bias_dots;
  if (v_bias) row_bias_dots = at::mv(g, *v_bias);
  const Acc* bias_dot = v_bias ? row_bias_dots.data_ptr<Acc>() : nullptr;
  auto segment_bias_dot = [&](int64_t start, int64_t stop) {
    double total = 0;
    for (int64_t n = start; n < stop; ++n) total += bias_dot[n];
    return total;
  };
  auto output = [&]() {  // where the next piece goes: grad_weight first, then the scratch
    if (!written) return written = true, grad_weight;
    if (!scratch.defined()) scratch = at::empty_like(grad_weight);
    return scratch;
  };
  for (int64_t j = 0; j < pieces;) {
    const int64_t start = piece_start(offsets, j);
    if (rows(j) < kBlasRows) {  // a run of small pieces, j..end - 1: one kernel call
      int64_t end = j + 1;
      while (end < pieces && rows(end) < kBlasRows) ++end;
      const int64_t stop = piece_end(offsets, num_segments, n_rows, end - 1);
      const int64_t first = std::max<int64_t>(j, 1) - 1, last = std::min(end, num_segments + 1) - 1;
      j = end;
      if (stop == start) continue;  // no rows: its segments' dots stay 0
      std::vector<int64_t> local(static_cast<size_t>(last - first + 1));
      for (int64_t i = first; i <= last; ++i) local[static_cast<size_t>(i - first)] = offsets[i] - start;
      const bool add = written;
      const at::Tensor out = output();
      run_kernel(x, g, v, nullptr, start, stop, local.data(), last - first, out, nullptr, dot + first);
      if (add) grad_weight.add_(out);
      if (bias_dot)
        for (int64_t i = first; i < last; ++i) dot[i] += segment_bias_dot(offsets[i], offsets[i + 1]);
      continue;
    }
    const int64_t stop = piece_end(offsets, num_segments, n_rows, j), segment = j - 1;
    const at::Tensor g_t = g.slice(0, start, stop).t(), x_rows = x.slice(0, start, stop);
    ++j;
    if (segment < 0 || segment >= num_segments) {  // rows in no segment: the gradient alone
      if (written) {
        grad_weight.addmm_(g_t, x_rows);
      } else {
        at::Tensor out = output();
        at::mm_out(out, g_t, x_rows);
      }
      continue;
    }
    const bool add = written;
    at::Tensor out = output();
    at::mm_out(out, g_t, x_rows);
    double total = add_piece_dot_cpu(out.data_ptr<Acc>(), add ? grad_weight.data_ptr<Acc>() : nullptr,
                                     v.data_ptr<Acc>(), out.numel());
    if (bias_dot) total += segment_bias_dot(start, stop);
    dot[segment] = static_cast<Acc>(total);
  }
  if (with_bias) grad_bias.copy_(at::sum(g, 0));
}

// The kernels' inputs: contiguous, of one dtype.
struct KernelInputs {
  at::Tensor x, g, v;
  std::optional<at::Tensor> v_bias;
};

KernelInputs contiguous_as(at::ScalarType dtype, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& target, const std::optional<at::Tensor>& target_bias) {
  auto prepare = [dtype](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  KernelInputs inputs{prepare(x), prepare(grad_out), prepare(target), std::nullopt};
  if (target_bias) inputs.v_bias = prepare(*target_bias);
  return inputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_dots_cpu_op(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets,
    const at::Tensor& target, const std::optional<at::Tensor>& target_bias, bool with_bias) {
  auto [grad_weight, grad_bias, dots] =
      prepare_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias);
  const at::Tensor offsets_c = offsets.contiguous();
  const int64_t n_rows = x.size(0), num_segments = dots.size(0);
  check_offsets(offsets_c, n_rows);
  const int64_t* bounds = offsets_c.data_ptr<int64_t>();
  bool large = false;  // a piece for at::mm
  for (int64_t j = 0; j < num_segments + 2 && !large; ++j)
    large = piece_end(bounds, num_segments, n_rows, j) - piece_start(bounds, j) >= kBlasRows;
  if (large && grad_weight.numel() > 0) {  // at::mm in the accumulation dtype
    const auto acc = grad_weight.scalar_type();
    const KernelInputs in = contiguous_as(acc, x, grad_out, target, target_bias);
    if (acc == at::kDouble)
      blas_and_kernel<double>(in.x, in.g, in.v, in.v_bias, bounds, num_segments, grad_weight, grad_bias, with_bias, dots);
    else
      blas_and_kernel<float>(in.x, in.g, in.v, in.v_bias, bounds, num_segments, grad_weight, grad_bias, with_bias, dots);
    return {grad_weight, grad_bias, dots};
  }
  const KernelInputs in = contiguous_as(x.scalar_type(), x, grad_out, target, target_bias);
  run_kernel(in.x, in.g, in.v, in.v_bias ? &*in.v_bias : nullptr, 0, n_rows, bounds, num_segments,
             grad_weight, with_bias ? &grad_bias : nullptr, dots.data_ptr());
  return {grad_weight, grad_bias, dots};
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CPU, m) {
  m.impl("weight_grad_dots", &fastmix::weight_grad_dots_cpu_op);
}
