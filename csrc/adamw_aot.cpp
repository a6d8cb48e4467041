// Multi-tensor AdamW entry points, n = number of parameter tensors (n >= 1):
//   AdamWUpdate(grad_0..n-1, weight_0..n-1, exp_avg_0..n-1, exp_avg_sq_0..n-1, low_0..n-1, decay [n] int64,
//               hyper [8] float32) -> ok [1] float32
//     Updates weight, exp_avg, exp_avg_sq and a bfloat16 low_i IN PLACE (the Python side marks the op
//     side_effect_mem). low_i is the bfloat16 parameter whose float32 master is weight_i, or weight_i itself (float32)
//     when there is no master: then nothing more is written. grad_i is float32 or bfloat16; the rest float32; all five
//     tensors of a parameter have one shape. hyper = [lr_wd, step_size, bc2_sqrt, grad_scale, 1 - beta1, beta2,
//     1 - beta2, eps]. The output is 1 (the op needs one).
//   GradSquaredSum(grad_0..n-1) -> [1] float32: the sum of every squared entry, accumulated in double.
#include <vector>

#include "csrc/aot_common.h"
#include "kernels/adamw.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

constexpr int kHyperSize = 8;

bool same_shape(int i, int j, const int* ndims, int64_t* const* shapes) {
  if (ndims[i] != ndims[j]) return false;
  for (int d = 0; d < ndims[i]; ++d) {
    if (shapes[i][d] != shapes[j][d]) return false;
  }
  return true;
}

int grad_tensor(int i, void* const* params, const int* ndims, int64_t* const* shapes, const char* const* dtypes,
                GradTensor* g) {
  if (!dtype_of(dtypes[i], &g->dtype)) return kBadDtype;
  g->data = params[i];
  g->numel = numel(ndims[i], shapes[i]);
  return kOk;
}

int check_scalar_output(int i, const int* ndims, int64_t* const* shapes, const char* const* dtypes) {
  if (!is_dtype(dtypes[i], "float32")) return kBadDtype;
  return numel(ndims[i], shapes[i]) == 1 ? kOk : kBadShape;
}

}  // namespace

OMNI_FAST_AOT_ENTRY(AdamWUpdate) {
  if (nparam < 8 || (nparam - 3) % 5 != 0) return kBadArity;
  const int n = (nparam - 3) / 5;
  const int decay = 5 * n, hyper = decay + 1, out = hyper + 1;
  if (!is_dtype(dtypes[decay], "int64") || !is_dtype(dtypes[hyper], "float32")) return kBadDtype;
  if (ndims[decay] != 1 || shapes[decay][0] != n || ndims[hyper] != 1 || shapes[hyper][0] != kHyperSize) {
    return kBadShape;
  }
  if (int s = check_scalar_output(out, ndims, shapes, dtypes)) return s;
  const auto* flags = static_cast<const int64_t*>(params[decay]);
  std::vector<AdamWTensor> tensors(n);
  for (int t = 0; t < n; ++t) {
    const int w = n + t, m = 2 * n + t, v = 3 * n + t, low = 4 * n + t;
    AdamWTensor& x = tensors[t];
    if (int s = grad_tensor(t, params, ndims, shapes, dtypes, &x.grad)) return s;
    for (const int f : {w, m, v}) {
      if (!is_dtype(dtypes[f], "float32")) return kBadDtype;
    }
    const bool bf16_low = is_dtype(dtypes[low], "bfloat16");
    if (!bf16_low && !is_dtype(dtypes[low], "float32")) return kBadDtype;
    for (const int f : {w, m, v, low}) {
      if (!same_shape(t, f, ndims, shapes)) return kBadShape;
    }
    x.weight = static_cast<float*>(params[w]);
    x.exp_avg = static_cast<float*>(params[m]);
    x.exp_avg_sq = static_cast<float*>(params[v]);
    x.low = bf16_low ? static_cast<bf16*>(params[low]) : nullptr;
    x.decay = flags[t] != 0;
  }
  const auto* h = static_cast<const float*>(params[hyper]);
  AdamWParams p;
  p.lr_wd = h[0];
  p.step_size = h[1];
  p.bc2_sqrt = h[2];
  p.grad_scale = h[3];
  p.one_minus_beta1 = h[4];
  p.beta2 = h[5];
  p.one_minus_beta2 = h[6];
  p.eps = h[7];
  adamw_update(p, tensors.data(), n);
  *static_cast<float*>(params[out]) = 1.0f;
  return kOk;
}

OMNI_FAST_AOT_ENTRY(GradSquaredSum) {
  if (nparam < 2) return kBadArity;
  const int n = nparam - 1;
  if (int s = check_scalar_output(n, ndims, shapes, dtypes)) return s;
  std::vector<GradTensor> grads(n);
  for (int t = 0; t < n; ++t) {
    if (int s = grad_tensor(t, params, ndims, shapes, dtypes, &grads[t])) return s;
  }
  *static_cast<float*>(params[n]) = static_cast<float>(squared_sum(grads.data(), n));
  return kOk;
}
