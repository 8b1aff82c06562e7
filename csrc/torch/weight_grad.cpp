// CPU binding of weight_grad_dots: checks (the offsets too, read on the host), contiguous
// copies, then the raw kernel.
#include <torch/library.h>

#include "../kernels/weight_grad.h"
#include "weight_grad_args.h"

namespace fastmix {
namespace {

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_dots_cpu_op(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets,
    const at::Tensor& target, const std::optional<at::Tensor>& target_bias, bool with_bias) {
  auto [grad_weight, grad_bias, dots] =
      prepare_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias);
  const at::Tensor offsets_c = offsets.contiguous();
  check_offsets(offsets_c, x.size(0));
  const at::Tensor x_c = x.contiguous(), g_c = grad_out.contiguous(), v_c = target.contiguous();
  std::optional<at::Tensor> bias_c;
  if (target_bias) bias_c = target_bias->contiguous();
  weight_grad_dots_cpu(kernel_dtype(x, "x"), x_c.data_ptr(), g_c.data_ptr(), v_c.data_ptr(),
                       bias_c ? bias_c->data_ptr() : nullptr, x.size(0), x.size(1),
                       grad_out.size(1), offsets_c.data_ptr<int64_t>(), dots.size(0),
                       grad_weight.data_ptr(), with_bias ? grad_bias.data_ptr() : nullptr,
                       dots.data_ptr());
  return {grad_weight, grad_bias, dots};
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CPU, m) {
  m.impl("weight_grad_dots", &fastmix::weight_grad_dots_cpu_op);
}
