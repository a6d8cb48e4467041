// Flash-attention entry points:
//   FlashAttentionForward(q, k, v, cu_q, cu_kv, mask, meta, scale) -> (out, lse)
//   FlashAttentionBackward(dout, q, k, v, out, lse, cu_q, cu_kv, mask, meta, scale) -> (dq, dk, dv)
// meta (int64 [7]) = [input layout (AttnInputLayout), head_num, sparse_mode, pre_tokens, next_tokens, has_mask,
// has_cu]; scale is float32 [1]. Without a mask or without cumulative ends (non-TND layouts) the Python face passes
// one-element placeholders and says so in meta. q/k/v/out/dout share one dtype (float32 or bfloat16); lse is
// float32 with q's shape minus D (BSH: [B, S, N]); cu_* are int64 cumulative ends; the mask is bool.
#include <string>

#include "csrc/aot_common.h"
#include "kernels/attention.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

enum Meta { kLayout = 0, kHeadNum, kSparseMode, kPreTokens, kNextTokens, kHasMask, kHasCu, kMetaSize };

// Inputs at params[q_at..q_at+2] (q, k, v), then cu_q, cu_kv, mask, meta, scale at params[cu_at..cu_at+4].
int attention_params(int q_at, int cu_at, void** params, const int* ndims, int64_t* const* shapes,
                     const char* const* dtypes, AttentionParams* p, DType* dt) {
  if (!dtype_of(dtypes[q_at], dt)) return kBadDtype;
  if (std::strcmp(dtypes[q_at], dtypes[q_at + 1]) != 0 || std::strcmp(dtypes[q_at], dtypes[q_at + 2]) != 0) {
    return kBadDtype;
  }
  const int meta_at = cu_at + 3, scale_at = cu_at + 4, mask_at = cu_at + 2;
  if (!is_dtype(dtypes[meta_at], "int64") || ndims[meta_at] != 1 || shapes[meta_at][0] != kMetaSize) {
    return kBadShape;
  }
  if (!is_dtype(dtypes[scale_at], "float32") || !is_dtype(dtypes[cu_at], "int64") ||
      !is_dtype(dtypes[cu_at + 1], "int64") || !is_dtype(dtypes[mask_at], "bool")) {
    return kBadDtype;
  }
  const int64_t* meta = static_cast<const int64_t*>(params[meta_at]);
  const bool has_mask = meta[kHasMask] != 0, has_cu = meta[kHasCu] != 0;
  if (meta[kLayout] < 0 || meta[kLayout] > 3) return kBadValue;
  const auto layout = static_cast<AttnInputLayout>(meta[kLayout]);
  if (has_cu != (layout == AttnInputLayout::kTND)) return kBadValue;
  if (has_cu && (ndims[cu_at] != 1 || ndims[cu_at + 1] != 1)) return kBadShape;
  const std::string error = attention_shapes(
      layout, meta[kHeadNum], ndims[q_at], shapes[q_at], ndims[q_at + 1], shapes[q_at + 1], ndims[q_at + 2],
      shapes[q_at + 2], has_mask ? ndims[mask_at] : 0, shapes[mask_at], has_cu ? shapes[cu_at][0] : 0,
      has_cu ? shapes[cu_at + 1][0] : 0, p);
  if (!error.empty()) return kBadShape;
  if (has_cu) {
    p->cu_q = static_cast<const int64_t*>(params[cu_at]);
    p->cu_kv = static_cast<const int64_t*>(params[cu_at + 1]);
  }
  if (has_mask) p->mask = static_cast<const uint8_t*>(params[mask_at]);
  p->sparse_mode = meta[kSparseMode];
  p->pre_tokens = meta[kPreTokens];
  p->next_tokens = meta[kNextTokens];
  p->scale = *static_cast<const float*>(params[scale_at]);
  // The face validates cumulative ends that are Python constants; ends that arrive as tensors are checked here.
  return attention_check(*p).empty() ? kOk : kBadValue;
}

}  // namespace

OMNI_FAST_AOT_ENTRY(FlashAttentionForward) {
  if (nparam != 10) return kBadArity;
  AttentionParams p;
  DType dt;
  if (int s = attention_params(0, 3, params, ndims, shapes, dtypes, &p, &dt)) return s;
  if (!is_dtype(dtypes[9], "float32")) return kBadDtype;
  if (dt == DType::kFloat32) {
    attention_forward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                      static_cast<const float*>(params[2]), static_cast<float*>(params[8]),
                      static_cast<float*>(params[9]));
  } else {
    attention_forward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                      static_cast<const bf16*>(params[2]), static_cast<bf16*>(params[8]),
                      static_cast<float*>(params[9]));
  }
  return kOk;
}

OMNI_FAST_AOT_ENTRY(FlashAttentionBackward) {
  if (nparam != 14) return kBadArity;
  AttentionParams p;
  DType dt;
  if (int s = attention_params(1, 6, params, ndims, shapes, dtypes, &p, &dt)) return s;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0 || std::strcmp(dtypes[4], dtypes[1]) != 0) return kBadDtype;
  if (!is_dtype(dtypes[5], "float32")) return kBadDtype;
  if (numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1]) ||
      numel(ndims[4], shapes[4]) != numel(ndims[1], shapes[1])) {
    return kBadShape;
  }
  if (numel(ndims[5], shapes[5]) * p.head_dim != numel(ndims[1], shapes[1])) return kBadShape;
  if (dt == DType::kFloat32) {
    attention_backward(p, static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                       static_cast<const float*>(params[2]), static_cast<const float*>(params[3]),
                       static_cast<const float*>(params[4]), static_cast<const float*>(params[5]),
                       static_cast<float*>(params[11]), static_cast<float*>(params[12]),
                       static_cast<float*>(params[13]));
  } else {
    attention_backward(p, static_cast<const bf16*>(params[0]), static_cast<const bf16*>(params[1]),
                       static_cast<const bf16*>(params[2]), static_cast<const bf16*>(params[3]),
                       static_cast<const bf16*>(params[4]), static_cast<const float*>(params[5]),
                       static_cast<bf16*>(params[11]), static_cast<bf16*>(params[12]), static_cast<bf16*>(params[13]));
  }
  return kOk;
}
