// Argument checking and output allocation shared by the CPU and CUDA bindings of
// weight_grad_dots, so both backends accept and reject exactly the same inputs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace fastmix {

// weight_grad_dots(x (N, d_in), grad_out (N, d_out), offsets (k + 1,), target (d_out, d_in),
// target_bias (d_out,)?, with_bias) -> (grad_weight, grad_bias, dots), in the accumulation
// dtype: grad_weight (d_out, d_in), grad_bias (d_out,) or (0,) without bias, dots (k,).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_weight_grad_dots(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets,
    const at::Tensor& target, const std::optional<at::Tensor>& target_bias, bool with_bias) {
  check_matrix(x, "x", x, "x");
  check_matrix(grad_out, "grad_out", x, "x");
  check_matrix(target, "target", x, "x");
  check_dim(grad_out, "grad_out", 0, x.size(0), "x.shape[0]");
  check_dim(target, "target", 0, grad_out.size(1), "grad_out.shape[1]");
  check_dim(target, "target", 1, x.size(1), "x.shape[1]");
  if (target_bias) {
    TORCH_CHECK(target_bias->dim() == 1, "target_bias must be 1-D, got shape ",
                target_bias->sizes());
    TORCH_CHECK(target_bias->scalar_type() == x.scalar_type(), "target_bias has dtype ",
                target_bias->scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(target_bias->device() == x.device(), "target_bias is on ",
                target_bias->device(), " but x is on ", x.device());
    check_dim(*target_bias, "target_bias", 0, grad_out.size(1), "grad_out.shape[1]");
  }
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1,
              "offsets must be 1-D with num_segments + 1 >= 1 entries, got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.device() == x.device(), "offsets is on ", offsets.device(),
              " but the data is on ", x.device());
  const auto options = x.options().dtype(result_dtype(x));
  return {at::empty({grad_out.size(1), x.size(1)}, options),
          at::empty({with_bias ? grad_out.size(1) : 0}, options),
          at::empty({offsets.size(0) - 1}, options)};
}

}  // namespace fastmix
