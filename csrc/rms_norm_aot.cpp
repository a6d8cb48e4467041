// RMSNorm entry points: RmsNormForward(x, w, eps) -> y; RmsNormBackward(dy, x, w, eps) -> (dx, dw).
#include "csrc/aot_common.h"
#include "kernels/rms_norm.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

// x [..., H], w [H], eps [1] (float32).
int rms_norm_params(const int* ndims, int64_t* const* shapes, const char* const* dtypes, RmsNormParams* p,
                    DType* dt) {
  if (!dtype_of(dtypes[0], dt) || std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadDtype;
  if (!is_dtype(dtypes[2], "float32")) return kBadDtype;
  if (ndims[0] < 1 || ndims[1] != 1 || shapes[1][0] != shapes[0][ndims[0] - 1]) return kBadShape;
  p->cols = shapes[0][ndims[0] - 1];
  p->rows = p->cols == 0 ? 0 : numel(ndims[0], shapes[0]) / p->cols;
  return kOk;
}

}  // namespace

OMNI_FAST_AOT_ENTRY(RmsNormForward) {
  if (nparam != 4) return kBadArity;
  RmsNormParams p;
  DType dt;
  if (int s = rms_norm_params(ndims, shapes, dtypes, &p, &dt)) return s;
  p.eps = *static_cast<const float*>(params[2]);
  if (dt == DType::kFloat32) {
    rms_norm_forward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                     static_cast<float*>(params[3]));
  } else {
    rms_norm_forward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                     static_cast<bf16*>(params[3]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(RmsNormBackward) {
  if (nparam != 6) return kBadArity;
  RmsNormParams p;
  DType dt;
  if (int s = rms_norm_params(ndims + 1, shapes + 1, dtypes + 1, &p, &dt)) return s;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadDtype;
  if (numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1])) return kBadShape;
  p.eps = *static_cast<const float*>(params[3]);
  if (dt == DType::kFloat32) {
    rms_norm_backward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                      static_cast<const float*>(params[2]), static_cast<float*>(params[4]),
                      static_cast<float*>(params[5]));
  } else {
    rms_norm_backward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                      static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[4]),
                      static_cast<bf16*>(params[5]));
  }
  return kOk;
}
