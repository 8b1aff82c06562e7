// Argument checks shared by the torch bindings. Messages name the argument, so a user
// calling torch.ops.fastmix.* directly learns what to fix.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "../kernels/common.h"

namespace fastmix {

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

// Results are float32, or float64 for float64 inputs.
inline at::ScalarType result_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like,
                         const char* like_name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but ", like_name, " has dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
  kernel_dtype(t, name);
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                      const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".shape[", dim, "] is ", t.size(dim),
              " but must equal ", what, " (", expected, ")");
}

// segment_ids: int64 of shape (n_rows,) on the data's device; num_segments >= 0.
inline void check_segments(const at::Tensor& ids, int64_t num_segments, int64_t n_rows,
                           const at::Tensor& like) {
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n_rows, "segment_ids must have shape (",
              n_rows, ",), got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "segment_ids must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.device() == like.device(), "segment_ids is on ", ids.device(),
              " but the data is on ", like.device());
  TORCH_CHECK(num_segments >= 0, "num_segments must be >= 0, got ", num_segments);
}

inline const int64_t* segment_pointer(const std::optional<at::Tensor>& ids) {
  return ids ? ids->data_ptr<int64_t>() : nullptr;
}

}  // namespace fastmix
