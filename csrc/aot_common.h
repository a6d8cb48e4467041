// Helpers shared by the MindSpore custom-op entry points (ops.Custom(func_type="aot")).
//
// ABI: params = [inputs..., outputs...], with ndims/shapes/dtypes per param (contiguous row-major buffers); see
// MindSpore's custom_aot_cpu_kernel.h. A non-zero return becomes a RuntimeError in MindSpore. The Python faces
// validate shapes and dtypes first and raise readable errors; these checks only guard against a mismatched caller.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/common.h"

namespace omni_fast::aot {

enum Status : int { kOk = 0, kBadArity = 1, kBadDtype = 2, kBadShape = 3, kBadValue = 4 };

inline bool dtype_of(const char* name, DType* out) {
  if (std::strcmp(name, "float32") == 0) {
    *out = DType::kFloat32;
    return true;
  }
  if (std::strcmp(name, "bfloat16") == 0) {
    *out = DType::kBFloat16;
    return true;
  }
  return false;
}

inline bool is_dtype(const char* name, const char* want) { return std::strcmp(name, want) == 0; }

inline int64_t numel(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

}  // namespace omni_fast::aot

// Every entry point has this signature (stream and extra are unused on CPU).
#define OMNI_FAST_AOT_ENTRY(name) \
  extern "C" int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*)
