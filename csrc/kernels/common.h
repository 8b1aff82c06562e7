// Shared by the C++ and CUDA kernels: element types and the few helpers they need.
// No torch header here, on purpose: kernels build and test without torch, and nvcc
// compiles a .cu that includes only this and cuda_runtime.h in seconds.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(_OPENMP)
#include <omp.h>
#endif

// Hot loops of the CPU kernels: compiled for AVX-512, AVX2+FMA and the baseline, picked at
// load time (GCC function multi-versioning); helpers forced inline into them.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__CUDACC__)
#define FASTMIX_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMIX_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FASTMIX_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTMIX_ALWAYS_INLINE inline
#endif

namespace fastmix {

// The threads an OpenMP parallel region may use, and this thread's index in its region (1
// and 0 without OpenMP). Per-thread buffers are allocated before a region, for these many
// threads: an allocation failure must throw from the kernel, not terminate the process from
// inside the region.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The threads of the current region's team (1 outside a region or without OpenMP): it may be
// fewer than asked for.
inline int team_size() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Element type of the floating-point inputs. Results are float32 for f32/bf16/f16
// inputs and float64 for f64 inputs; accumulation is float32 or wider.
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline float f16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t word;
  if (exponent == 0x1fu) {  // inf or nan
    word = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    word = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    word = sign;
  } else {  // subnormal: normalise the mantissa
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    word = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// Widens `count` elements of `src` (of type `dtype`, not f64) into float.
inline void widen_to_float(DType dtype, const void* src, int64_t count, float* dst) {
  switch (dtype) {
    case DType::f32:
      if (count > 0) std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));  // src may be null at 0
      return;
    case DType::bf16: {
      const auto* bits = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = bf16_bits_to_float(bits[i]);
      return;
    }
    case DType::f16: {
      const auto* bits = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = f16_bits_to_float(bits[i]);
      return;
    }
    case DType::f64: {
      const auto* values = static_cast<const double*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(values[i]);
      return;
    }
  }
}

inline int64_t element_size(DType dtype) {
  return dtype == DType::f64 ? 8 : dtype == DType::f32 ? 4 : 2;
}

}  // namespace fastmix
