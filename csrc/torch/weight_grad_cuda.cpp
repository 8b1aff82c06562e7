// CUDA binding of weight_grad_dots: the same checks as on CPU except the offsets' values
// (reading them would cost a device sync: the kernel clamps them, and the Python op builds
// them itself), then the kernel on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../kernels/weight_grad.h"
#include "weight_grad_args.h"

namespace fastmix {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_dots_cuda_op(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& offsets,
    const at::Tensor& target, const std::optional<at::Tensor>& target_bias, bool with_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto [grad_weight, grad_bias, dots] =
      prepare_weight_grad_dots(x, grad_out, offsets, target, target_bias, with_bias);
  const at::Tensor offsets_c = offsets.contiguous();
  const at::Tensor x_c = x.contiguous(), g_c = grad_out.contiguous(), v_c = target.contiguous();
  std::optional<at::Tensor> bias_c;
  if (target_bias) bias_c = target_bias->contiguous();
  const int status = weight_grad_dots_cuda(
      kernel_dtype(x, "x"), x_c.data_ptr(), g_c.data_ptr(), v_c.data_ptr(),
      bias_c ? bias_c->data_ptr() : nullptr, x.size(0), x.size(1), grad_out.size(1),
      offsets_c.data_ptr<int64_t>(), dots.size(0), grad_weight.data_ptr(),
      with_bias ? grad_bias.data_ptr() : nullptr, dots.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "fastmix::weight_grad_dots CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {grad_weight, grad_bias, dots};
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) {
  m.impl("weight_grad_dots", &fastmix::weight_grad_dots_cuda_op);
}
