// Multimodal scatter entry points, M = number of modalities (0..3; the Python face always passes all three, an
// absent one as a [0, H] tensor):
//   MultimodalScatterForward(embeds [..., H], ids [...] int32|int64, token_ids [M] int64, f_0 .. f_{M-1} [n_m, H])
//     -> out (embeds' shape)
//   MultimodalScatterBackward(d_out, ids, token_ids, f_0 .. f_{M-1}) -> (d_embeds, d_f_0 .. d_f_{M-1})
// f_m holds the features of token_ids[m]; the backward takes the features only for their shapes.
// A placeholder count that differs from its features' rows (only possible when the ids were not checked on the
// host, i.e. under ms.jit) returns kCountMismatch + m for token_ids[m] before anything is read or written.
#include "csrc/aot_common.h"
#include "kernels/scatter.h"

namespace {

using namespace omni_fast;
using namespace omni_fast::aot;

constexpr int kCountMismatch = 16;

// Fills p from embeds (param 0), ids (1), token_ids (2) and the M feature tensors (3 .. 2 + M).
int scatter_params(int m, const int* ndims, int64_t* const* shapes, const char* const* dtypes,
                   const void* const* params, ScatterParams* p, DType* dt, bool* ids64) {
  if (!dtype_of(dtypes[0], dt)) return kBadDtype;
  *ids64 = is_dtype(dtypes[1], "int64");
  if (!*ids64 && !is_dtype(dtypes[1], "int32")) return kBadDtype;
  if (!is_dtype(dtypes[2], "int64")) return kBadDtype;
  if (ndims[0] < 1 || ndims[2] != 1) return kBadShape;
  p->hidden = shapes[0][ndims[0] - 1];
  p->tokens = numel(ndims[1], shapes[1]);
  if (numel(ndims[0], shapes[0]) != p->tokens * p->hidden) return kBadShape;
  p->modalities = static_cast<int>(shapes[2][0]);
  if (p->modalities != m) return kBadShape;
  const auto* token_ids = static_cast<const int64_t*>(params[2]);
  for (int i = 0; i < p->modalities; ++i) {
    p->token_id[i] = token_ids[i];
    for (int j = 0; j < i; ++j) {
      if (token_ids[j] == token_ids[i]) return kBadValue;
    }
    const int f = 3 + i;
    if (std::strcmp(dtypes[f], dtypes[0]) != 0) return kBadDtype;
    if (ndims[f] != 2 || shapes[f][1] != p->hidden) return kBadShape;
    p->rows[i] = shapes[f][0];
  }
  return kOk;
}

// The two kernels as types, so `dispatch` instantiates either for the four (dtype, ids dtype) pairs.
struct Forward {
  template <typename T, typename Id>
  static int run(const ScatterParams& p, int m, void** params) {
    const T* features[kScatterMaxModalities] = {};
    for (int i = 0; i < m; ++i) features[i] = static_cast<const T*>(params[3 + i]);
    int64_t counts[kScatterMaxModalities];
    const int bad = multimodal_scatter_forward(p, static_cast<const T*>(params[0]),
                                               static_cast<const Id*>(params[1]), features,
                                               static_cast<T*>(params[3 + m]), counts);
    return bad == kScatterOk ? kOk : kCountMismatch + bad;
  }
};

struct Backward {
  template <typename T, typename Id>
  static int run(const ScatterParams& p, int m, void** params) {
    T* d_features[kScatterMaxModalities] = {};
    for (int i = 0; i < m; ++i) d_features[i] = static_cast<T*>(params[4 + m + i]);
    int64_t counts[kScatterMaxModalities];
    const int bad = multimodal_scatter_backward(p, static_cast<const T*>(params[0]),
                                                static_cast<const Id*>(params[1]), static_cast<T*>(params[3 + m]),
                                                d_features, counts);
    return bad == kScatterOk ? kOk : kCountMismatch + bad;
  }
};

template <typename Kernel>
int dispatch(DType dt, bool ids64, const ScatterParams& p, int m, void** params) {
  if (dt == DType::kFloat32) {
    return ids64 ? Kernel::template run<float, int64_t>(p, m, params)
                 : Kernel::template run<float, int32_t>(p, m, params);
  }
  return ids64 ? Kernel::template run<bf16, int64_t>(p, m, params) : Kernel::template run<bf16, int32_t>(p, m, params);
}

}  // namespace

OMNI_FAST_AOT_ENTRY(MultimodalScatterForward) {
  const int m = nparam - 4;  // embeds, ids, token_ids, features..., out
  if (m < 0 || m > kScatterMaxModalities) return kBadArity;
  ScatterParams p;
  DType dt;
  bool ids64;
  if (int s = scatter_params(m, ndims, shapes, dtypes, params, &p, &dt, &ids64)) return s;
  if (std::strcmp(dtypes[3 + m], dtypes[0]) != 0 || numel(ndims[3 + m], shapes[3 + m]) != p.tokens * p.hidden) {
    return kBadShape;
  }
  return dispatch<Forward>(dt, ids64, p, m, params);
}

OMNI_FAST_AOT_ENTRY(MultimodalScatterBackward) {
  if (nparam < 4 || (nparam - 4) % 2 != 0) return kBadArity;
  const int m = (nparam - 4) / 2;  // d_out, ids, token_ids, features..., d_embeds, d_features...
  if (m > kScatterMaxModalities) return kBadArity;
  ScatterParams p;
  DType dt;
  bool ids64;
  if (int s = scatter_params(m, ndims, shapes, dtypes, params, &p, &dt, &ids64)) return s;
  for (int i = 0; i <= m; ++i) {
    const int o = 3 + m + i;
    const int64_t want = i == 0 ? p.tokens * p.hidden : p.rows[i - 1] * p.hidden;
    if (std::strcmp(dtypes[o], dtypes[0]) != 0 || numel(ndims[o], shapes[o]) != want) return kBadShape;
  }
  return dispatch<Backward>(dt, ids64, p, m, params);
}
