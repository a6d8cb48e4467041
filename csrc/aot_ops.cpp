// MindSpore custom-op entry points (ops.Custom(func_type="aot")).
//
// Each entry point is thin: check what MindSpore hands over (the Python face has already validated shapes and
// dtypes and raised a readable error; these checks only guard against a mismatched caller), fill a params
// struct and dispatch on dtype. A non-zero return becomes a RuntimeError in MindSpore.
//
// ABI: params = [inputs..., outputs...], with ndims/shapes/dtypes per param; see MindSpore's
// custom_aot_cpu_kernel.h. Shapes are those of contiguous row-major buffers.
#include <cstdint>
#include <cstring>

#include "kernels/rms_norm.h"

namespace {

enum Status : int { kOk = 0, kBadArity = 1, kBadDtype = 2, kBadShape = 3 };

bool dtype_of(const char* name, omni_fast::DType* out) {
  if (std::strcmp(name, "float32") == 0) {
    *out = omni_fast::DType::kFloat32;
    return true;
  }
  if (std::strcmp(name, "bfloat16") == 0) {
    *out = omni_fast::DType::kBFloat16;
    return true;
  }
  return false;
}

int64_t numel(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// x [..., H], w [H], eps [1] (float32). Returns the status and fills p.
int rms_norm_params(int* ndims, int64_t** shapes, const char** dtypes, omni_fast::RmsNormParams* p,
                     omni_fast::DType* dt) {
  if (!dtype_of(dtypes[0], dt) || std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadDtype;
  if (std::strcmp(dtypes[2], "float32") != 0) return kBadDtype;
  if (ndims[0] < 1 || ndims[1] != 1 || shapes[1][0] != shapes[0][ndims[0] - 1]) return kBadShape;
  p->cols = shapes[0][ndims[0] - 1];
  p->rows = p->cols == 0 ? 0 : numel(ndims[0], shapes[0]) / p->cols;
  return kOk;
}

}  // namespace

extern "C" {

// inputs: x, w, eps; output: y
int RmsNormForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 4) return kBadArity;
  omni_fast::RmsNormParams p;
  omni_fast::DType dt;
  if (int s = rms_norm_params(ndims, shapes, dtypes, &p, &dt)) return s;
  p.eps = *static_cast<const float*>(params[2]);
  if (dt == omni_fast::DType::kFloat32) {
    omni_fast::rms_norm_forward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                                static_cast<float*>(params[3]));
  } else {
    using omni_fast::bf16;
    omni_fast::rms_norm_forward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                                static_cast<bf16*>(params[3]));
  }
  return kOk;
}

// inputs: dy, x, w, eps; outputs: dx, dw
int RmsNormBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 6) return kBadArity;
  omni_fast::RmsNormParams p;
  omni_fast::DType dt;
  if (int s = rms_norm_params(ndims + 1, shapes + 1, dtypes + 1, &p, &dt)) return s;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadDtype;
  if (numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1])) return kBadShape;
  p.eps = *static_cast<const float*>(params[3]);
  if (dt == omni_fast::DType::kFloat32) {
    omni_fast::rms_norm_backward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                                 static_cast<const float*>(params[2]), static_cast<float*>(params[4]),
                                 static_cast<float*>(params[5]));
  } else {
    using omni_fast::bf16;
    omni_fast::rms_norm_backward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                                 static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[4]),
                                 static_cast<bf16*>(params[5]));
  }
  return kOk;
}

}  // extern "C"
