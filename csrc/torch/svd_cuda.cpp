// CUDA binding of batched_svd: the same checks as on CPU (except finiteness, which would
// cost a device sync: the Python op checks it), then the kernel on the current stream.
// The whole matrix must fit in one block's shared memory (the fast path; the Python op
// falls back to torch.linalg.svd beyond it).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/svd.h"
#include "checks.h"

namespace fastmix {

std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_batched_svd(const at::Tensor& a);  // svd.cpp

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cuda_op(const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(a.device());
  auto [u, s, vh] = prepare_batched_svd(a);
  TORCH_CHECK(a.size(0) <= INT32_MAX, "fastmix::batched_svd (CUDA): at most 2^31 - 1 matrices "
              "a call (one thread block each), got ", a.size(0));
  const DType dtype = kernel_dtype(a, "a");
  int limit = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                     a.device().index()) == cudaSuccess,
              "fastmix::batched_svd: could not query the shared memory limit");
  const int64_t needed = svd_cuda_shared_bytes(dtype, a.size(1), a.size(2)) + 1024;  // + static
  TORCH_CHECK(needed <= limit, "fastmix::batched_svd (CUDA): a (", a.size(1), " x ", a.size(2),
              ", ", a.scalar_type(), ") needs ", needed, " bytes of shared memory per matrix; "
              "this GPU allows ", limit, ". Use fastmix.ops.batched_svd, which falls back to "
              "torch.linalg.svd for such sizes.");
  const at::Tensor a_c = a.contiguous();
  const int status = batched_svd_cuda(dtype, a_c.data_ptr(), a.size(0), a.size(1), a.size(2),
                                      u.data_ptr(), s.data_ptr(), vh.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "fastmix::batched_svd CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {u, s, vh};
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) {
  m.impl("batched_svd", &fastmix::batched_svd_cuda_op);
}
