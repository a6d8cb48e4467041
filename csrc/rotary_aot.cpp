// Rotary entry points: RotaryForward(x, cos, sin) -> y; RotaryBackward(dy, cos, sin) -> dx (same kernel signature).
#include "csrc/aot_common.h"
#include "kernels/rotary.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

// x [..., N, D] (rows = product of the leading axes), cos and sin of x's dtype with rows * D elements, last axis D
// ([..., 1, D] or [..., D]); D even.
int rotary_params(const int* ndims, int64_t* const* shapes, const char* const* dtypes, RotaryParams* p, DType* dt) {
  if (!dtype_of(dtypes[0], dt)) return kBadDtype;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0 || std::strcmp(dtypes[0], dtypes[2]) != 0) return kBadDtype;
  if (ndims[0] < 2) return kBadShape;
  p->dim = shapes[0][ndims[0] - 1];
  p->heads = shapes[0][ndims[0] - 2];
  p->rows = numel(ndims[0] - 2, shapes[0]);
  if (p->dim % 2 != 0) return kBadShape;
  for (int i = 1; i <= 2; ++i) {
    if (ndims[i] < 1 || shapes[i][ndims[i] - 1] != p->dim || numel(ndims[i], shapes[i]) != p->rows * p->dim) {
      return kBadShape;
    }
  }
  return kOk;
}

template <bool kBackward>
int rotary_entry(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  if (nparam != 4) return kBadArity;
  RotaryParams p;
  DType dt;
  if (int s = rotary_params(ndims, shapes, dtypes, &p, &dt)) return s;
  if (!is_dtype(dtypes[3], dtypes[0])) return kBadDtype;
  if (numel(ndims[3], shapes[3]) != numel(ndims[0], shapes[0])) return kBadShape;
  if (dt == DType::kFloat32) {
    (kBackward ? rotary_backward<float> : rotary_forward<float>)(
        p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
        static_cast<const float*>(params[2]), static_cast<float*>(params[3]));
  } else {
    (kBackward ? rotary_backward<bf16> : rotary_forward<bf16>)(
        p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
        static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[3]));
  }
  return kOk;
}

}  // namespace

OMNI_FAST_AOT_ENTRY(RotaryForward) { return rotary_entry<false>(nparam, params, ndims, shapes, dtypes); }

OMNI_FAST_AOT_ENTRY(RotaryBackward) { return rotary_entry<true>(nparam, params, ndims, shapes, dtypes); }
