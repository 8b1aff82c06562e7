// CPU bindings of the alignment ops: checks, contiguous copies, then the raw kernels.
#include <torch/library.h>

#include "../kernels/alignment.h"
#include "alignment_args.h"

namespace fastmix {
namespace {

at::Tensor rowwise_bilinear_cpu_op(const at::Tensor& a, const at::Tensor& m, const at::Tensor& b,
                                   const std::optional<at::Tensor>& segment_ids,
                                   int64_t num_segments) {
  at::Tensor out = prepare_rowwise_bilinear(a, m, b, segment_ids, num_segments);
  const at::Tensor a_c = a.contiguous(), m_c = m.contiguous(), b_c = b.contiguous();
  std::optional<at::Tensor> ids;
  if (segment_ids) ids = segment_ids->contiguous();
  rowwise_bilinear_cpu(kernel_dtype(a, "a"), a_c.data_ptr(), m_c.data_ptr(), b_c.data_ptr(),
                       a.size(0), a.size(1), b.size(1), segment_pointer(ids), num_segments,
                       out.data_ptr());
  return out;
}

at::Tensor ghost_dots_cpu_op(const at::Tensor& x, const at::Tensor& grad_out,
                             const at::Tensor& target_x, const at::Tensor& target_grad_out,
                             const at::Tensor& segment_ids, int64_t num_segments) {
  at::Tensor out =
      prepare_ghost_dots(x, grad_out, target_x, target_grad_out, segment_ids, num_segments);
  const at::Tensor x_c = x.contiguous(), g_c = grad_out.contiguous();
  const at::Tensor tx_c = target_x.contiguous(), tg_c = target_grad_out.contiguous();
  const at::Tensor ids = segment_ids.contiguous();
  ghost_dots_cpu(kernel_dtype(x, "x"), x_c.data_ptr(), g_c.data_ptr(), tx_c.data_ptr(),
                 tg_c.data_ptr(), x.size(0), target_x.size(0), x.size(1), grad_out.size(1),
                 ids.data_ptr<int64_t>(), num_segments, out.data_ptr());
  return out;
}

}  // namespace
}  // namespace fastmix

TORCH_LIBRARY_IMPL(fastmix, CPU, m) {
  m.impl("rowwise_bilinear", &fastmix::rowwise_bilinear_cpu_op);
  m.impl("ghost_dots", &fastmix::ghost_dots_cpu_op);
}
