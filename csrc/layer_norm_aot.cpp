// LayerNorm entry points: LayerNormForward(x, w, b, eps) -> y; LayerNormBackward(dy, x, w, eps) -> (dx, dw, db).
#include "csrc/aot_common.h"
#include "kernels/layer_norm.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

// x [..., H], w [H], then `nvec - 1` more [H] vectors of x's dtype (b in the forward, none in the backward), then
// eps [1] (float32).
int layer_norm_params(const int* ndims, int64_t* const* shapes, const char* const* dtypes, int nvec,
                      LayerNormParams* p, DType* dt) {
  if (!dtype_of(dtypes[0], dt)) return kBadDtype;
  if (ndims[0] < 1) return kBadShape;
  const int64_t cols = shapes[0][ndims[0] - 1];
  for (int i = 1; i <= nvec; ++i) {
    if (std::strcmp(dtypes[0], dtypes[i]) != 0) return kBadDtype;
    if (ndims[i] != 1 || shapes[i][0] != cols) return kBadShape;
  }
  if (!is_dtype(dtypes[nvec + 1], "float32")) return kBadDtype;
  p->cols = cols;
  p->rows = cols == 0 ? 0 : numel(ndims[0], shapes[0]) / cols;
  return kOk;
}

}  // namespace

OMNI_FAST_AOT_ENTRY(LayerNormForward) {
  if (nparam != 5) return kBadArity;
  LayerNormParams p;
  DType dt;
  if (int s = layer_norm_params(ndims, shapes, dtypes, 2, &p, &dt)) return s;
  p.eps = *static_cast<const float*>(params[3]);
  if (dt == DType::kFloat32) {
    layer_norm_forward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                       static_cast<const float*>(params[2]), static_cast<float*>(params[4]));
  } else {
    layer_norm_forward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                       static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[4]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(LayerNormBackward) {
  if (nparam != 7) return kBadArity;
  LayerNormParams p;
  DType dt;
  if (int s = layer_norm_params(ndims + 1, shapes + 1, dtypes + 1, 1, &p, &dt)) return s;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadDtype;
  if (numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1])) return kBadShape;
  p.eps = *static_cast<const float*>(params[3]);
  if (dt == DType::kFloat32) {
    layer_norm_backward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                        static_cast<const float*>(params[2]), static_cast<float*>(params[4]),
                        static_cast<float*>(params[5]), static_cast<float*>(params[6]));
  } else {
    layer_norm_backward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                        static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[4]),
                        static_cast<bf16*>(params[5]), static_cast<bf16*>(params[6]));
  }
  return kOk;
}
