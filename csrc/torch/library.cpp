// The fastmix operator library: schemas of every op, and the Python module `fastmix._C`
// whose import loads the registrations. Implementations are registered per dispatch key
// beside their bindings (alignment.cpp for CPU, alignment_cuda.cpp for CUDA).
#include <Python.h>
#include <torch/library.h>

#define FASTMIX_STRINGIFY_(x) #x
#define FASTMIX_STRINGIFY(x) FASTMIX_STRINGIFY_(x)

extern "C" {
// Importing fastmix._C runs the static registrations below. The module only records how
// it was built, for `fastmix info`.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTMIX_WITH_CUDA
  const char* cuda_arch_list = FASTMIX_STRINGIFY(FASTMIX_CUDA_ARCHS);
#else
  const char* cuda_arch_list = "";
#endif
  if (PyModule_AddStringConstant(module, "cuda_arch_list", cuda_arch_list) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fastmix, m) {
  // r_n = a_n · (m @ b_n); per row, or summed per segment (ids outside [0, num_segments)
  // are skipped). float32 result (float64 for float64 inputs).
  m.def("rowwise_bilinear(Tensor a, Tensor m, Tensor b, Tensor? segment_ids, int num_segments) -> Tensor");
  // s_i = Σ_{seg(n)=i} Σ_t (x_n · target_x_t)(grad_out_n · target_grad_out_t)
  m.def("ghost_dots(Tensor x, Tensor grad_out, Tensor target_x, Tensor target_grad_out, Tensor segment_ids, int num_segments) -> Tensor");
  // Thin SVD of each (m, n) matrix of a (batch, m, n), float32 or float64: a = u diag(s) vh
  // with s descending; u (batch, m, p), s (batch, p), vh (batch, p, n), p = min(m, n).
  // The weight gradient of rows grouped in segments [offsets[i], offsets[i+1]) with the
  // per-segment dots ⟨G_i, target⟩ (+ ⟨Σ_{n∈i} grad_out_n, target_bias⟩), in one pass:
  // (grad_weight (d_out, d_in), grad_bias (d_out,) or (0,), dots (k,)), float32 (float64).
  m.def("weight_grad_dots(Tensor x, Tensor grad_out, Tensor offsets, Tensor target, Tensor? target_bias, bool with_bias) -> (Tensor, Tensor, Tensor)");
  m.def("batched_svd(Tensor a) -> (Tensor, Tensor, Tensor)");
}
