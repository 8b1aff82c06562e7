// Argument checking and output allocation shared by the CPU and CUDA bindings of the
// alignment ops, so both backends accept and reject exactly the same inputs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include "checks.h"

namespace fastmix {

// rowwise_bilinear(a (N, p), m (p, q), b (N, q), segment_ids?, num_segments)
inline at::Tensor prepare_rowwise_bilinear(const at::Tensor& a, const at::Tensor& m,
                                           const at::Tensor& b,
                                           const std::optional<at::Tensor>& segment_ids,
                                           int64_t num_segments) {
  check_matrix(a, "a", a, "a");
  check_matrix(m, "m", a, "a");
  check_matrix(b, "b", a, "a");
  check_dim(m, "m", 0, a.size(1), "a.shape[1]");
  check_dim(b, "b", 0, a.size(0), "a.shape[0]");
  check_dim(b, "b", 1, m.size(1), "m.shape[1]");
  if (segment_ids) check_segments(*segment_ids, num_segments, a.size(0), a);
  const int64_t length = segment_ids ? num_segments : a.size(0);
  return at::zeros({length}, a.options().dtype(result_dtype(a)));
}

// ghost_dots(x (N, d_in), grad_out (N, d_out), target_x (M, d_in), target_grad_out (M, d_out), ...)
inline at::Tensor prepare_ghost_dots(const at::Tensor& x, const at::Tensor& grad_out,
                                     const at::Tensor& target_x,
                                     const at::Tensor& target_grad_out,
                                     const at::Tensor& segment_ids, int64_t num_segments) {
  check_matrix(x, "x", x, "x");
  check_matrix(grad_out, "grad_out", x, "x");
  check_matrix(target_x, "target_x", x, "x");
  check_matrix(target_grad_out, "target_grad_out", x, "x");
  check_dim(grad_out, "grad_out", 0, x.size(0), "x.shape[0]");
  check_dim(target_x, "target_x", 1, x.size(1), "x.shape[1]");
  check_dim(target_grad_out, "target_grad_out", 0, target_x.size(0), "target_x.shape[0]");
  check_dim(target_grad_out, "target_grad_out", 1, grad_out.size(1), "grad_out.shape[1]");
  check_segments(segment_ids, num_segments, x.size(0), x);
  return at::zeros({num_segments}, x.options().dtype(result_dtype(x)));
}

}  // namespace fastmix
