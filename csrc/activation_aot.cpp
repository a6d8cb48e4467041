// Activation entry points, elementwise over tensors of any shape (float32 or bfloat16, one dtype per call):
//   SwiGluForward(gate, up) -> out;  SwiGluBackward(dout, gate, up) -> (d_gate, d_up)
//   GeluForward(x) -> y;             GeluBackward(dout, x) -> dx
#include "csrc/aot_common.h"
#include "kernels/gelu.h"
#include "kernels/swiglu.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

// All nparam params (inputs and outputs) share one supported dtype and one element count, which goes to *n.
int same_elements(int nparam, const int* ndims, int64_t* const* shapes, const char* const* dtypes, DType* dt,
                  int64_t* n) {
  if (!dtype_of(dtypes[0], dt)) return kBadDtype;
  *n = numel(ndims[0], shapes[0]);
  for (int i = 1; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], dtypes[0]) != 0) return kBadDtype;
    if (numel(ndims[i], shapes[i]) != *n) return kBadShape;
  }
  return kOk;
}

template <typename T>
T* as(void* param) {
  return static_cast<T*>(param);
}

}  // namespace

OMNI_FAST_AOT_ENTRY(SwiGluForward) {
  if (nparam != 3) return kBadArity;
  SwiGluParams p;
  DType dt;
  if (int s = same_elements(nparam, ndims, shapes, dtypes, &dt, &p.n)) return s;
  if (dt == DType::kFloat32) {
    swiglu_forward(p, as<const float>(params[0]), as<const float>(params[1]), as<float>(params[2]));
  } else {
    swiglu_forward(p, as<const bf16>(params[0]), as<const bf16>(params[1]), as<bf16>(params[2]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(SwiGluBackward) {
  if (nparam != 5) return kBadArity;
  SwiGluParams p;
  DType dt;
  if (int s = same_elements(nparam, ndims, shapes, dtypes, &dt, &p.n)) return s;
  if (dt == DType::kFloat32) {
    swiglu_backward(p, as<const float>(params[0]), as<const float>(params[1]), as<const float>(params[2]),
                    as<float>(params[3]), as<float>(params[4]));
  } else {
    swiglu_backward(p, as<const bf16>(params[0]), as<const bf16>(params[1]), as<const bf16>(params[2]),
                    as<bf16>(params[3]), as<bf16>(params[4]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(GeluForward) {
  if (nparam != 2) return kBadArity;
  GeluParams p;
  DType dt;
  if (int s = same_elements(nparam, ndims, shapes, dtypes, &dt, &p.n)) return s;
  if (dt == DType::kFloat32) {
    gelu_forward(p, as<const float>(params[0]), as<float>(params[1]));
  } else {
    gelu_forward(p, as<const bf16>(params[0]), as<bf16>(params[1]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(GeluBackward) {
  if (nparam != 3) return kBadArity;
  GeluParams p;
  DType dt;
  if (int s = same_elements(nparam, ndims, shapes, dtypes, &dt, &p.n)) return s;
  if (dt == DType::kFloat32) {
    gelu_backward(p, as<const float>(params[0]), as<const float>(params[1]), as<float>(params[2]));
  } else {
    gelu_backward(p, as<const bf16>(params[0]), as<const bf16>(params[1]), as<bf16>(params[2]));
  }
  return kOk;
}
