// CPU binding of batched_svd: checks, output allocation, then the raw kernel.
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/svd.h"
#include "checks.h"

namespace fastmix {

// Checks a (batch, m, n) float32/float64 and allocates (u (batch, m, p), s (batch, p),
// vh (batch, p, n)), p = min(m, n). Shared with the CUDA binding (svd_cuda.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_batched_svd(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 3, "a must be 3-D (batch, m, n), got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "a must be float32 or float64 (convert float16/bfloat16 first), got ",
              a.scalar_type());
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2), p = std::min(m, n);
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX, "a: matrices of shape (", m, ", ", n,
              ") are too large");
  return {at::empty({batch, m, p}, a.options()), at::empty({batch, p}, a.options()),
          at::empty({batch, p, n}, a.options())};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cpu_op(const at::Tensor& a) {
  auto [u, s, vh] = prepare_batched_svd(a);
  const at::Tensor a_c = a.contiguous();
  TORCH_CHECK(at::isfinite(a_c).all().item<bool>(),
              "a contains NaN or infinity; the SVD needs finite values");
  batched_svd_cpu(kernel_dtype(a, "a"), a_c.data_ptr(), a.size(0), a.size(1), a.size(2),
                  u.data_ptr(), s.data_ptr(), vh.data_ptr());
  return {u, s, vh};
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CPU, m) {
  m.impl("batched_svd", &fastmix::batched_svd_cpu_op);
}
