// Fused (flash) attention for CPU, forward and backward, with the meaning of MindSpore's flash_attention_score:
//
//   out = softmax(scale * Q K^T masked) V          per (batch or segment, query head), GQA by head groups
//   lse = log(sum_j exp(scale * q.k_j))            per query row, over the keys it may see (float32)
//
// Layouts (D contiguous in every one): BNSD, BSND (= BSH viewed as [B, S, N, D]) and TND, where the batch is a list
// of variable-length segments given by cumulative end offsets (no leading 0) of the T axis of Q and of K/V.
// Masking, all per segment: sparse_mode 0 = no mask or an optional bool mask (true = masked out) of shape
// [B, N|1, Sq, Skv] or [Sq, Skv], plus a band kept where -pre_tokens <= j - i <= next_tokens (top-left aligned);
// 2 = causal aligned top-left (j <= i); 3 = causal aligned bottom-right (j <= i + Skv - Sq).
// A query row that sees no key gets out = 0 and lse = +inf, so that the backward's exp(s - lse) is exactly 0 there
// and its gradients are 0 (never NaN).
//
// Fast path (flash-attention-2 on CPU):
// * Forward: OpenMP over (segment, query block of kBlockQ rows, key/value head). A work item packs the query block
//   of every query head of its GQA group (float32, pre-scaled), then for each key block of kBlockK keys that the
//   mask does not rule out entirely packs K^T and V once and, per query head: S = Q K^T, running row max / sum
//   (online softmax), O = O * rescale + P V. S x S is never materialised; extra memory is per-thread tiles only.
// * Backward: from (Q, K, V, O, dO, lse) with Delta = rowsum(dO * O): P = exp(S - lse), dV += P^T dO,
//   dP = dO V^T, dS = P * (dP - Delta), dQ += dS K * scale, dK += dS^T Q * scale.
//   Parallel over (segment, key/value head), key blocks outer and query blocks inner within an item (FA2 order;
//   the item's Q and dO are packed once, and P^T dO, dS^T Q read the tiles transposed instead of copying them):
//   a work item owns the dK/dV rows of its key/value head and the dQ rows of the query heads of its GQA group, so
//   there are no write races, no atomics, no per-thread copies of dQ and no recomputation (five block GEMMs per
//   block pair, the minimum). The price is parallelism limited to
//   segments * kv_heads (4 for the 7B LLM at batch 1: enough for this 2-core target, not for a 64-core socket,
//   where splitting dQ into a second pass over query blocks would be the next step).
// * Skipping: key blocks (forward) and query blocks (backward) entirely outside the causal/band region or entirely
//   masked by the bool mask are never touched. On a tile the band cuts (the causal diagonal), each group of 8 rows
//   computes only the column strips and inner steps it can reach (TileBand): -7% forward, -6% backward at S=1k.
// * The block GEMMs are a register-blocked micro-kernel on GCC/Clang vector types (16 floats; the compiler lowers
//   them to AVX-512, AVX2 or SSE as the build flags allow). On 64x64x128 tiles it measured ~110 GFLOP/s per core on
//   the build VM (AMD EPYC, AVX-512), at the level of MKL (torch.mm 2048^3: ~90) and OpenBLAS (numpy: ~103) on the
//   same core, without their per-call overhead on small tiles; plain loops left to the vectoriser reached 7.
// * exp is a Cephes-style polynomial on the same vector type (~1 ulp), so the softmax vectorises too.
// * Blocks are 128 x 128: against 64 x 64 they halve the per-row softmax bookkeeping and the per-item packing, and
//   a 100-token audio chunk or 64-token window is one tile (measured ~2x faster on both at one thread).
//
// The scalar reference (one thread, double accumulation, whole rows) sits below the fast path; both share
// the parameter struct, the validation and the mask predicate.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace omni_fast {

enum class AttnLayout : int64_t { kBNSD = 0, kBSND = 1, kTND = 2 };  // BSH is BSND with H = N * D

struct AttentionParams {
  AttnLayout layout = AttnLayout::kBNSD;
  int64_t batch = 0;     // B; for TND the number of segments
  int64_t q_heads = 0;   // N1
  int64_t kv_heads = 0;  // N2, divides N1
  int64_t head_dim = 0;  // D
  int64_t q_seq = 0;     // Sq (T1 for TND)
  int64_t kv_seq = 0;    // Skv (T2 for TND)
  const int64_t* cu_q = nullptr;   // TND: [batch] cumulative ends of the query segments
  const int64_t* cu_kv = nullptr;  // TND: [batch] cumulative ends of the key/value segments
  float scale = 1.f;
  int64_t sparse_mode = 0;  // 0, 2, 3
  int64_t pre_tokens = 2147483647;
  int64_t next_tokens = 2147483647;
  const uint8_t* mask = nullptr;  // optional bool mask (sparse_mode 0, not TND), true = masked out
  int64_t mask_stride_b = 0;      // elements between batches of the mask (0: broadcast)
  int64_t mask_stride_h = 0;      // elements between heads of the mask (0: broadcast); rows are Skv apart
};

namespace attn {

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 128;
constexpr int64_t kVec = 16;  // floats per vector
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kFar = int64_t(1) << 40;  // beyond any sequence length: an open side of a band

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One batch entry (or TND segment): where its rows start on the S/T axis and how many there are.
struct Segment {
  int64_t q_start, q_len, kv_start, kv_len;
  int64_t lo, hi;  // allowed iff lo <= j - i <= hi (i query row, j key row, both within the segment)
};

inline Segment segment(const AttentionParams& p, int64_t b) {
  Segment s{};
  if (p.layout == AttnLayout::kTND) {
    s.q_start = b == 0 ? 0 : p.cu_q[b - 1];
    s.q_len = p.cu_q[b] - s.q_start;
    s.kv_start = b == 0 ? 0 : p.cu_kv[b - 1];
    s.kv_len = p.cu_kv[b] - s.kv_start;
  } else {
    s.q_start = s.kv_start = 0;
    s.q_len = p.q_seq;
    s.kv_len = p.kv_seq;
  }
  if (p.sparse_mode == 2) {
    s.lo = -kFar;
    s.hi = 0;
  } else if (p.sparse_mode == 3) {
    s.lo = -kFar;
    s.hi = s.kv_len - s.q_len;
  } else {
    s.lo = -p.pre_tokens;
    s.hi = p.next_tokens;
  }
  return s;
}

// Element offsets of row i of head h in batch b for a [*, heads, seq, dim]-described tensor in the layout.
struct RowIndex {
  int64_t heads, seq, dim;
  AttnLayout layout;
  int64_t row(int64_t b, int64_t h, int64_t i) const {  // i is on the S axis (TND: the T axis)
    switch (layout) {
      case AttnLayout::kBNSD:
        return ((b * heads + h) * seq + i) * dim;
      case AttnLayout::kBSND:
        return ((b * seq + i) * heads + h) * dim;
      default:
        return (i * heads + h) * dim;
    }
  }
  int64_t row_stride() const { return layout == AttnLayout::kBNSD ? dim : heads * dim; }
};

inline RowIndex q_index(const AttentionParams& p, int64_t dim) { return {p.q_heads, p.q_seq, dim, p.layout}; }
inline RowIndex kv_index(const AttentionParams& p, int64_t dim) { return {p.kv_heads, p.kv_seq, dim, p.layout}; }

inline bool band_allows(const Segment& s, int64_t i, int64_t j) { return j - i >= s.lo && j - i <= s.hi; }

inline const uint8_t* mask_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return p.mask + b * p.mask_stride_b + h * p.mask_stride_h + i * p.kv_seq;
}

}  // namespace attn

// Empty when the parameters describe something the kernels can run; otherwise what is wrong.
inline std::string attention_check(const AttentionParams& p) {
  if (p.batch < 0 || p.q_seq < 0 || p.kv_seq < 0) return "negative sizes";
  if (p.head_dim < 1) return "head_dim must be >= 1";
  if (p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0) {
    return "key/value heads (" + std::to_string(p.kv_heads) + ") must divide query heads (" +
           std::to_string(p.q_heads) + ")";
  }
  if (p.sparse_mode != 0 && p.sparse_mode != 2 && p.sparse_mode != 3) return "sparse_mode must be 0, 2 or 3";
  if (p.sparse_mode != 0 && p.mask != nullptr) return "a bool mask is only taken with sparse_mode 0";
  if (p.layout == AttnLayout::kTND) {
    if (p.mask != nullptr) return "TND takes no bool mask";
    if (p.batch > 0 && (p.cu_q == nullptr || p.cu_kv == nullptr)) return "TND needs cumulative sequence ends";
    int64_t prev_q = 0, prev_kv = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      if (p.cu_q[b] < prev_q || p.cu_kv[b] < prev_kv) return "cumulative sequence ends must be non-decreasing";
      prev_q = p.cu_q[b];
      prev_kv = p.cu_kv[b];
    }
    if (prev_q != p.q_seq || prev_kv != p.kv_seq) {
      return "the last cumulative ends (" + std::to_string(prev_q) + ", " + std::to_string(prev_kv) +
             ") must equal the query and key token counts (" + std::to_string(p.q_seq) + ", " +
             std::to_string(p.kv_seq) + ")";
    }
  }
  return {};
}

// The input layouts of flash_attention_score as they reach the entry points (BSH is BSND once D is known).
enum class AttnInputLayout : int64_t { kBNSD = 0, kBSND = 1, kTND = 2, kBSH = 3 };

// Fill the sizes, layout and mask strides of `p` from the shapes of q, k, v (and the mask, if any); empty when
// they agree, otherwise what is wrong. `head_num` is N1 (needed to split BSH's H). For TND, `batch` is the length
// of the cumulative-ends arrays, given as n_cu_q / n_cu_kv.
inline std::string attention_shapes(AttnInputLayout layout, int64_t head_num, int q_ndim, const int64_t* q_shape,
                                    int k_ndim, const int64_t* k_shape, int v_ndim, const int64_t* v_shape,
                                    int mask_ndim, const int64_t* mask_shape, int64_t n_cu_q, int64_t n_cu_kv,
                                    AttentionParams* p) {
  const int want = layout == AttnInputLayout::kTND ? 3 : layout == AttnInputLayout::kBSH ? 3 : 4;
  if (q_ndim != want || k_ndim != want || v_ndim != want) {
    return "query, key and value must have " + std::to_string(want) + " dimensions for this layout";
  }
  for (int i = 0; i < want; ++i) {
    if (k_shape[i] != v_shape[i]) return "key and value shapes differ";
  }
  if (head_num < 1) return "head_num must be >= 1";
  switch (layout) {
    case AttnInputLayout::kBNSD:
      p->layout = AttnLayout::kBNSD;
      p->batch = q_shape[0], p->q_heads = q_shape[1], p->q_seq = q_shape[2], p->head_dim = q_shape[3];
      p->kv_heads = k_shape[1], p->kv_seq = k_shape[2];
      if (k_shape[0] != p->batch || k_shape[3] != p->head_dim) return "key batch or head_dim differ from query's";
      break;
    case AttnInputLayout::kBSND:
      p->layout = AttnLayout::kBSND;
      p->batch = q_shape[0], p->q_seq = q_shape[1], p->q_heads = q_shape[2], p->head_dim = q_shape[3];
      p->kv_seq = k_shape[1], p->kv_heads = k_shape[2];
      if (k_shape[0] != p->batch || k_shape[3] != p->head_dim) return "key batch or head_dim differ from query's";
      break;
    case AttnInputLayout::kBSH:
      p->layout = AttnLayout::kBSND;
      if (q_shape[2] % head_num != 0) return "query hidden size is not a multiple of head_num";
      p->batch = q_shape[0], p->q_seq = q_shape[1], p->q_heads = head_num, p->head_dim = q_shape[2] / head_num;
      p->kv_seq = k_shape[1];
      if (k_shape[0] != p->batch || p->head_dim == 0 || k_shape[2] % p->head_dim != 0) {
        return "key batch differs from query's, or its hidden size is not a multiple of head_dim";
      }
      p->kv_heads = k_shape[2] / p->head_dim;
      break;
    case AttnInputLayout::kTND:
      p->layout = AttnLayout::kTND;
      p->q_seq = q_shape[0], p->q_heads = q_shape[1], p->head_dim = q_shape[2];
      p->kv_seq = k_shape[0], p->kv_heads = k_shape[1];
      if (k_shape[2] != p->head_dim) return "key head_dim differs from query's";
      if (n_cu_q != n_cu_kv) return "actual_seq_qlen and actual_seq_kvlen have different lengths";
      p->batch = n_cu_q;
      break;
    default:
      return "unknown layout";
  }
  if (p->q_heads != head_num) return "query has " + std::to_string(p->q_heads) + " heads, head_num says " +
                                     std::to_string(head_num);
  if (mask_ndim > 0) {
    const int64_t sq = p->q_seq, skv = p->kv_seq;
    if (mask_ndim == 2 && mask_shape[0] == sq && mask_shape[1] == skv) {
      p->mask_stride_b = p->mask_stride_h = 0;
    } else if (mask_ndim == 4 && (mask_shape[0] == p->batch || mask_shape[0] == 1) &&
               (mask_shape[1] == p->q_heads || mask_shape[1] == 1) && mask_shape[2] == sq && mask_shape[3] == skv) {
      p->mask_stride_h = mask_shape[1] == 1 ? 0 : sq * skv;
      p->mask_stride_b = mask_shape[0] == 1 ? 0 : mask_shape[1] * sq * skv;
    } else {
      return "attn_mask must be [B, N1 or 1, Sq, Skv] or [Sq, Skv]";
    }
  }
  return {};
}

// ---------------------------------------------------------------- reference (scalar, one thread)

template <typename T>
void attention_forward_reference(const AttentionParams& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  using namespace attn;
  const int64_t d = p.head_dim, group = p.q_heads / p.kv_heads;
  const RowIndex qi = q_index(p, d), ki = kv_index(p, d), li = q_index(p, 1);
  const int64_t mb = p.layout == AttnLayout::kTND ? 0 : 1;  // B layouts index batch b, TND rows carry the offset
  for (int64_t b = 0; b < p.batch; ++b) {
    const Segment s = segment(p, b);
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const T* qr = q + qi.row(b * mb, h, s.q_start + i);
        std::vector<double> scores(s.kv_len);
        std::vector<bool> seen(s.kv_len);
        double mx = -INFINITY;
        for (int64_t j = 0; j < s.kv_len; ++j) {
          seen[j] = band_allows(s, i, j) && !(p.mask && mask_row(p, b, h, i)[j]);
          if (!seen[j]) continue;
          const T* kr = k + ki.row(b * mb, hk, s.kv_start + j);
          double dot = 0.0;
          for (int64_t c = 0; c < d; ++c) dot += double(to_float(qr[c])) * to_float(kr[c]);
          scores[j] = dot * p.scale;
          mx = std::max(mx, scores[j]);
        }
        double sum = 0.0;
        std::vector<double> acc(d, 0.0);
        for (int64_t j = 0; j < s.kv_len; ++j) {
          if (!seen[j]) continue;
          const double e = std::exp(scores[j] - mx);
          sum += e;
          const T* vr = v + ki.row(b * mb, hk, s.kv_start + j);
          for (int64_t c = 0; c < d; ++c) acc[c] += e * to_float(vr[c]);
        }
        T* orow = out + qi.row(b * mb, h, s.q_start + i);
        for (int64_t c = 0; c < d; ++c) orow[c] = from_float<T>(sum > 0 ? float(acc[c] / sum) : 0.f);
        lse[li.row(b * mb, h, s.q_start + i)] = sum > 0 ? float(mx + std::log(sum)) : kInf;
      }
    }
  }
}

template <typename T>
void attention_backward_reference(const AttentionParams& p, const T* dout, const T* q, const T* k, const T* v,
                                  const T* out, const float* lse, T* dq, T* dk, T* dv) {
  using namespace attn;
  const int64_t d = p.head_dim, group = p.q_heads / p.kv_heads;
  const RowIndex qi = q_index(p, d), ki = kv_index(p, d), li = q_index(p, 1);
  const int64_t mb = p.layout == AttnLayout::kTND ? 0 : 1;
  const int64_t kv_rows = (p.layout == AttnLayout::kTND ? 1 : p.batch) * p.kv_seq * p.kv_heads;
  std::vector<double> dk_acc(kv_rows * d, 0.0), dv_acc(kv_rows * d, 0.0);
  const int64_t dq_size = (p.layout == AttnLayout::kTND ? 1 : p.batch) * p.q_seq * p.q_heads * d;
  for (int64_t e = 0; e < dq_size; ++e) dq[e] = from_float<T>(0.f);
  for (int64_t b = 0; b < p.batch; ++b) {
    const Segment s = segment(p, b);
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const int64_t qrow = qi.row(b * mb, h, s.q_start + i);
        const double row_lse = lse[li.row(b * mb, h, s.q_start + i)];
        double delta = 0.0;
        for (int64_t c = 0; c < d; ++c) delta += double(to_float(dout[qrow + c])) * to_float(out[qrow + c]);
        std::vector<double> dq_row(d, 0.0);
        for (int64_t j = 0; j < s.kv_len; ++j) {
          if (!band_allows(s, i, j) || (p.mask && mask_row(p, b, h, i)[j])) continue;
          const int64_t krow = ki.row(b * mb, hk, s.kv_start + j);
          double dot = 0.0, dp = 0.0;
          for (int64_t c = 0; c < d; ++c) {
            dot += double(to_float(q[qrow + c])) * to_float(k[krow + c]);
            dp += double(to_float(dout[qrow + c])) * to_float(v[krow + c]);
          }
          const double prob = std::exp(dot * p.scale - row_lse);  // 0 when lse = +inf (row sees no key)
          const double ds = prob * (dp - delta);
          for (int64_t c = 0; c < d; ++c) {
            dv_acc[krow + c] += prob * to_float(dout[qrow + c]);
            dk_acc[krow + c] += ds * p.scale * to_float(q[qrow + c]);
            dq_row[c] += ds * p.scale * to_float(k[krow + c]);
          }
        }
        for (int64_t c = 0; c < d; ++c) dq[qrow + c] = from_float<T>(float(dq_row[c]));
      }
    }
  }
  for (int64_t e = 0; e < kv_rows * d; ++e) {
    dk[e] = from_float<T>(float(dk_acc[e]));
    dv[e] = from_float<T>(float(dv_acc[e]));
  }
}

// ---------------------------------------------------------------- fast path

namespace attn {

// 16 floats; GCC/Clang lower it to one zmm, two ymm or four xmm registers depending on the target ISA.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vbroadcast(float x) { return vf{} + x; }

// exp(x) for a vector (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp). Exactly 0 below
// -87.3 (so exp(-inf) = 0), +inf above 88.7; NaN stays NaN.
inline vf vexp(vf x) {
  const vf hi = vbroadcast(88.72283f), lo = vbroadcast(-87.33654f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const vf magic = vbroadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf n = xc * 1.44269504088896341f + magic;
  vi ni;
  std::memcpy(&ni, &n, sizeof ni);
  vi magic_i;
  std::memcpy(&magic_i, &magic, sizeof magic_i);
  ni = ni - magic_i;
  n = n - magic;
  vf r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf poly = vbroadcast(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  vf y = poly * (r * r) + r + 1.f;
  vi scale_bits = (ni + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &scale_bits, sizeof pow2);
  y = y * pow2;
  y = x < lo ? vf{} : y;
  y = x > hi ? vbroadcast(kInf) : y;
  return x != x ? x : y;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kVec; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}

// C[MR x 16*NV] (=, or += when ACC) A[MR x k] * B[k x 16*NV]; accumulators stay in registers across the k loop.
// A is row-major [MR][k] (row stride lda), or with TA its transpose stored row-major [k][MR...] (row stride lda), so
// P^T dO and dS^T Q need no explicit transpose. B is row-major with row stride ldb.
template <int MR, int NV, bool ACC, bool TA>
inline void micro_kernel(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                         int64_t ldc) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? vload(c + i * ldc + j * kVec) : vf{};
  const float* rows[MR];
  for (int i = 0; i < MR; ++i) rows[i] = a + i * lda;
  for (int64_t p = 0; p < k; ++p, b += ldb) {
    vf bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(b + j * kVec);
    for (int i = 0; i < MR; ++i) {
      const float ai = TA ? a[p * lda + i] : rows[i][p];
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(c + i * ldc + j * kVec, acc[i][j]);
}

template <int NV, bool ACC, bool TA>
inline void row_group(int64_t mr, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                      int64_t ldc) {
  switch (mr) {
    case 8: return micro_kernel<8, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 7: return micro_kernel<7, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 6: return micro_kernel<6, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 5: return micro_kernel<5, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 4: return micro_kernel<4, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 3: return micro_kernel<3, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    case 2: return micro_kernel<2, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
    default: return micro_kernel<1, NV, ACC, TA>(k, a, lda, b, ldb, c, ldc);
  }
}

// Which (i, j) index pairs of a tile product can be non-zero: lo <= j - i + shift <= hi, in the tile's own indices
// (i a row of C; j a column of C or a step of the inner dimension). The default is the whole tile. On a causal
// diagonal tile this halves the work: a group of rows [i, i + mr) meets only j in [first(i), last(i, mr)).
struct TileBand {
  int64_t shift = 0, lo = -kFar, hi = kFar;
  int64_t first(int64_t i) const { return i + lo - shift; }
  int64_t last(int64_t i, int64_t mr) const { return i + mr + hi - shift; }
};

// The whole vectors [*c0, *c1) of an n-column score row i that the band can reach (n a multiple of kVec).
inline void band_vectors(const TileBand& band, int64_t i, int64_t n, int64_t* c0, int64_t* c1) {
  *c0 = std::clamp<int64_t>(band.first(i) / kVec * kVec, 0, n);
  *c1 = std::clamp<int64_t>(round_up(std::max<int64_t>(band.last(i, 1), 0), kVec), *c0, n);
}

// C[m x n] (=, or += when ACC) op(A)[m x k] * B[k x n], float32, n a multiple of 16, B row-major; op(A) = A
// ([m][k], row stride lda) or, with TA, A^T for A stored [k][m] (row stride lda). Small tiles only (the callers'
// blocks): columns in strips of 32 (then 16), rows in groups of 8. Only the column strips that `cols` lets a row
// group reach are computed (the others are set to 0, or left as they are when ACC), and only the inner steps that
// `depth` lets it reach are summed: the caller guarantees that the skipped products are zero or masked anyway.
template <bool ACC, bool TA = false>
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc, const TileBand& cols = {}, const TileBand& depth = {}) {
  for (int64_t j = 0; j < n; j += 2 * kVec) {
    const int64_t width = std::min<int64_t>(2 * kVec, n - j);
    for (int64_t i = 0; i < m; i += 8) {
      const int64_t mr = std::min<int64_t>(8, m - i);
      const int64_t p0 = std::max<int64_t>(0, depth.first(i)), p1 = std::min(k, depth.last(i, mr));
      float* ci = c + i * ldc + j;
      if (j + width <= cols.first(i) || j >= cols.last(i, mr) || p1 <= p0) {
        if (!ACC) {
          for (int64_t r = 0; r < mr; ++r) std::fill(ci + r * ldc, ci + r * ldc + width, 0.f);
        }
        continue;
      }
      const float* ai = TA ? a + p0 * lda + i : a + i * lda + p0;
      if (width == 2 * kVec) {
        row_group<2, ACC, TA>(mr, p1 - p0, ai, lda, b + p0 * ldb + j, ldb, ci, ldc);
      } else {
        row_group<1, ACC, TA>(mr, p1 - p0, ai, lda, b + p0 * ldb + j, ldb, ci, ldc);
      }
    }
  }
}

// rows x d of a strided input -> dense float [rows][ld] times `mul`, zero-padded to ld columns.
template <typename T>
inline void pack_rows(const T* src, int64_t stride, int64_t rows, int64_t d, int64_t ld, float mul, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    float* o = dst + r * ld;
    for (int64_t c = 0; c < d; ++c) o[c] = to_float(s[c]) * mul;
    for (int64_t c = d; c < ld; ++c) o[c] = 0.f;
  }
}

// rows x d of a strided input -> transposed dense float [d][ld], columns >= rows zeroed. In groups of kVec source
// rows, so that each destination write is one contiguous run of kVec floats (a cache line) while the group's source
// rows stay in L1; row by row, every source element went to a different destination line (measured: 16% of an
// audio-chunk forward at D64 was this copy).
template <typename T>
inline void pack_transposed(const T* src, int64_t stride, int64_t rows, int64_t d, int64_t ld, float* dst) {
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, 0.f);
  for (int64_t r0 = 0; r0 < rows; r0 += kVec) {
    const int64_t nr = std::min(kVec, rows - r0);
    const T* s = src + r0 * stride;
    for (int64_t c = 0; c < d; ++c) {
      float* o = dst + c * ld + r0;
      for (int64_t i = 0; i < nr; ++i) o[i] = to_float(s[i * stride + c]);
    }
  }
}

// Which entries of a (query block, key block) tile are allowed. Returns false when none is (skip the tile);
// `full` tells the caller no per-element masking is needed.
inline bool tile_live(const AttentionParams& p, const Segment& s, int64_t b, int64_t h, int64_t i0, int64_t rows,
                      int64_t j0, int64_t cols, bool* full) {
  const int64_t dmin = j0 - (i0 + rows - 1), dmax = j0 + cols - 1 - i0;
  if (dmax < s.lo || dmin > s.hi) return false;
  *full = dmin >= s.lo && dmax <= s.hi;
  if (p.mask == nullptr) return true;
  bool any = false, all = true;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* m = mask_row(p, b, h, i0 + r) + j0;
    for (int64_t c = 0; c < cols; ++c) {
      const bool ok = !m[c] && band_allows(s, i0 + r, j0 + c);
      any |= ok;
      all &= ok;
    }
  }
  *full = all;
  return any;
}

// Set disallowed entries of the score tile (and padding columns from `cols` up to `n`) to -inf. The band leaves
// one contiguous run of columns per row, so only the bool mask (if any) needs a per-element test.
inline void mask_tile(const AttentionParams& p, const Segment& s, int64_t b, int64_t h, int64_t i0, int64_t rows,
                      int64_t j0, int64_t cols, int64_t n, float* tile, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* t = tile + r * ld;
    const int64_t i = i0 + r;
    const int64_t c0 = std::clamp<int64_t>(i + s.lo - j0, 0, cols);
    const int64_t c1 = std::clamp<int64_t>(i + s.hi - j0 + 1, c0, cols);
    std::fill(t, t + c0, -kInf);
    std::fill(t + c1, t + n, -kInf);
    if (p.mask != nullptr) {
      const uint8_t* m = mask_row(p, b, h, i) + j0;
      for (int64_t c = c0; c < c1; ++c) t[c] = m[c] ? -kInf : t[c];
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key range [first, last) a block of query rows [i0, i0 + rows) may see through the band.
inline void key_range(const Segment& s, int64_t i0, int64_t rows, int64_t* first, int64_t* last) {
  *first = std::max<int64_t>(0, i0 + s.lo);
  *last = std::min<int64_t>(s.kv_len, i0 + rows - 1 + s.hi + 1);
}

// Query range [first, last) that may see a block of keys [j0, j0 + cols) through the band.
inline void query_range(const Segment& s, int64_t j0, int64_t cols, int64_t* first, int64_t* last) {
  *first = std::max<int64_t>(0, j0 - s.hi);
  *last = std::min<int64_t>(s.q_len, j0 + cols - 1 - s.lo + 1);
}

}  // namespace attn

namespace attn {

// One key block of the online softmax for `rows` query rows: the score tile `st` (row stride kBlockK, `n` columns,
// masked entries -inf) becomes P = exp(S - new max) in place; the running max / sum are updated and the output
// accumulator `acc` (row stride dp) rescaled, ready for acc += P V. Vectors out of the band are set to 0 unread.
inline void online_softmax(int64_t rows, int64_t n, const TileBand& band, float* st, float* mx, float* sum,
                           float* acc, int64_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* t = st + r * kBlockK;
    int64_t c0, c1;
    band_vectors(band, r, n, &c0, &c1);
    std::fill(t, t + c0, 0.f);
    std::fill(t + c1, t + n, 0.f);
    vf m = vbroadcast(-kInf);
    for (int64_t c = c0; c < c1; c += kVec) {
      const vf x = vload(t + c);
      m = x > m ? x : m;
    }
    const float m_new = std::max(mx[r], hmax(m));
    // A row that has seen no key yet keeps max -inf; subtract 0 instead so exp(-inf) stays 0, not NaN.
    const float m_use = m_new == -kInf ? 0.f : m_new;
    const float alpha = mx[r] == -kInf ? 0.f : std::exp(mx[r] - m_use);
    vf s_acc = vf{};
    const vf mu = vbroadcast(m_use);
    for (int64_t c = c0; c < c1; c += kVec) {
      const vf x = vexp(vload(t + c) - mu);
      s_acc += x;
      vstore(t + c, x);
    }
    sum[r] = sum[r] * alpha + hsum(s_acc);
    mx[r] = m_new;
    if (alpha != 1.f) {
      float* a = acc + r * dp;
      for (int64_t c = 0; c < dp; ++c) a[c] *= alpha;
    }
  }
}

}  // namespace attn

template <typename T>
void attention_forward(const AttentionParams& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  using namespace attn;
  const int64_t d = p.head_dim, dp = round_up(d, kVec), group = p.q_heads / p.kv_heads;
  const RowIndex qi = q_index(p, d), ki = kv_index(p, d), li = q_index(p, 1);
  const int64_t mb = p.layout == AttnLayout::kTND ? 0 : 1;  // B layouts index batch b, TND rows carry the offset
  // Work items: (segment, query block) pairs times key/value heads. An item runs the query block for every query
  // head of the GQA group, so each key block is packed (float32, K transposed) once and used by `group` heads
  // while it sits in L1/L2.
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t qb = 0; qb < ceil_div(segment(p, b).q_len, kBlockQ); ++qb) blocks.emplace_back(b, qb);
  }
  const int64_t items = int64_t(blocks.size()) * p.kv_heads, tile = kBlockQ * dp;
#pragma omp parallel
  {
    std::vector<float> qs(group * tile), acc(group * tile), mx(group * kBlockQ), sum(group * kBlockQ),
        kt(d * kBlockK), vb(kBlockK * dp), st(kBlockQ * kBlockK);
    std::vector<uint8_t> live(group), full(group);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const auto [b, qb] = blocks[item / p.kv_heads];
      const int64_t hk = item % p.kv_heads;
      const Segment s = segment(p, b);
      const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, s.q_len - i0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = qi.row(b * mb, hk * group + g, s.q_start + i0);
        pack_rows(q + row, qi.row_stride(), rows, d, dp, p.scale, qs.data() + g * tile);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -kInf);
      std::fill(sum.begin(), sum.end(), 0.f);
      int64_t first, last;
      key_range(s, i0, rows, &first, &last);
      for (int64_t j0 = first / kBlockK * kBlockK; j0 < last; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, s.kv_len - j0), n = round_up(cols, kVec);
        bool any = false;
        for (int64_t g = 0; g < group; ++g) {
          bool f = true;
          live[g] = tile_live(p, s, b, hk * group + g, i0, rows, j0, cols, &f);
          full[g] = f;
          any |= live[g] != 0;
        }
        if (!any) continue;
        const int64_t row = ki.row(b * mb, hk, s.kv_start + j0);
        pack_transposed(k + row, ki.row_stride(), cols, d, kBlockK, kt.data());
        pack_rows(v + row, ki.row_stride(), cols, d, dp, 1.f, vb.data());
        const TileBand band{j0 - i0, s.lo, s.hi};  // query row r may see key column c of this tile
        for (int64_t g = 0; g < group; ++g) {
          if (!live[g]) continue;
          float* a = acc.data() + g * tile;
          gemm<false>(rows, n, d, qs.data() + g * tile, dp, kt.data(), kBlockK, st.data(), kBlockK, band);
          if (!full[g] || cols != n) mask_tile(p, s, b, hk * group + g, i0, rows, j0, cols, n, st.data(), kBlockK);
          online_softmax(rows, n, band, st.data(), mx.data() + g * kBlockQ, sum.data() + g * kBlockQ, a, dp);
          gemm<true>(rows, dp, cols, st.data(), kBlockK, vb.data(), dp, a, dp, {}, band);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        T* o = out + qi.row(b * mb, h, s.q_start + i0);
        float* l = lse + li.row(b * mb, h, s.q_start + i0);
        for (int64_t r = 0; r < rows; ++r) {
          const float total = sum[g * kBlockQ + r];
          const float inv = total > 0.f ? 1.f / total : 0.f;
          const float* a = acc.data() + g * tile + r * dp;
          T* orow = o + r * qi.row_stride();
          for (int64_t c = 0; c < d; ++c) orow[c] = from_float<T>(a[c] * inv);
          l[r * li.row_stride()] = total > 0.f ? mx[g * kBlockQ + r] + std::log(total) : kInf;
        }
      }
    }
  }
}

template <typename T>
void attention_backward(const AttentionParams& p, const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const float* lse, T* dq, T* dk, T* dv) {
  using namespace attn;
  const int64_t d = p.head_dim, dp = round_up(d, kVec), group = p.q_heads / p.kv_heads;
  const RowIndex qi = q_index(p, d), ki = kv_index(p, d), li = q_index(p, 1);
  const int64_t mb = p.layout == AttnLayout::kTND ? 0 : 1;
  const int64_t items = p.batch * p.kv_heads;
#pragma omp parallel
  {
    std::vector<float> kr(kBlockK * dp), kt(d * kBlockK), vt(d * kBlockK), dk_acc(kBlockK * dp),
        dv_acc(kBlockK * dp), pt(kBlockQ * kBlockK), ds(kBlockQ * kBlockK);
    // Per work item, for the query heads of its group: Q (scaled) and dO packed once, lse, Delta = rowsum(dO * O)
    // and a float32 dQ accumulator (all linear in the segment length).
    std::vector<float> qs, dob, dq_acc, row_lse, delta;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / p.kv_heads, hk = item % p.kv_heads;
      const Segment s = segment(p, b);
      const int64_t qn = s.q_len;
      qs.resize(group * qn * dp);
      dob.resize(group * qn * dp);
      dq_acc.assign(group * qn * dp, 0.f);
      row_lse.resize(group * qn);
      delta.resize(group * qn);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g, row0 = qi.row(b * mb, h, s.q_start);
        pack_rows(q + row0, qi.row_stride(), qn, d, dp, p.scale, qs.data() + g * qn * dp);
        pack_rows(dout + row0, qi.row_stride(), qn, d, dp, 1.f, dob.data() + g * qn * dp);
        for (int64_t i = 0; i < qn; ++i) {
          const T* orow = out + row0 + i * qi.row_stride();
          const float* drow = dob.data() + (g * qn + i) * dp;
          float acc = 0.f;
          for (int64_t c = 0; c < d; ++c) acc += drow[c] * to_float(orow[c]);
          delta[g * qn + i] = acc;
          row_lse[g * qn + i] = lse[li.row(b * mb, h, s.q_start + i)];
        }
      }
      for (int64_t j0 = 0; j0 < s.kv_len; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, s.kv_len - j0), n = round_up(cols, kVec);
        int64_t first, last;
        query_range(s, j0, cols, &first, &last);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
        if (first < last) {  // otherwise no query sees these keys: their gradients are 0
          const int64_t row = ki.row(b * mb, hk, s.kv_start + j0);
          pack_rows(k + row, ki.row_stride(), cols, d, dp, 1.f, kr.data());
          pack_transposed(k + row, ki.row_stride(), cols, d, kBlockK, kt.data());
          pack_transposed(v + row, ki.row_stride(), cols, d, kBlockK, vt.data());
        }
        for (int64_t g = 0; g < group && first < last; ++g) {
          const int64_t h = hk * group + g;
          for (int64_t i0 = first / kBlockQ * kBlockQ; i0 < last; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, qn - i0);
            bool full = true;
            if (!tile_live(p, s, b, h, i0, rows, j0, cols, &full)) continue;
            const float* qg = qs.data() + (g * qn + i0) * dp;
            const float* dog = dob.data() + (g * qn + i0) * dp;
            // Query row r may see key column c of this tile; seen from the keys' side (dV, dK) the band flips.
            const TileBand band{j0 - i0, s.lo, s.hi}, band_t{i0 - j0, -s.hi, -s.lo};
            // P = exp(scale * Q K^T - lse), masked entries 0.
            gemm<false>(rows, n, d, qg, dp, kt.data(), kBlockK, pt.data(), kBlockK, band);
            if (!full || cols != n) mask_tile(p, s, b, h, i0, rows, j0, cols, n, pt.data(), kBlockK);
            for (int64_t r = 0; r < rows; ++r) {
              float* t = pt.data() + r * kBlockK;
              int64_t c0, c1;
              band_vectors(band, r, n, &c0, &c1);
              std::fill(t, t + c0, 0.f);
              std::fill(t + c1, t + n, 0.f);
              const vf l = vbroadcast(row_lse[g * qn + i0 + r]);
              for (int64_t c = c0; c < c1; c += kVec) vstore(t + c, vexp(vload(t + c) - l));
            }
            // dP = dO V^T, then dS = P * (dP - Delta).
            gemm<false>(rows, n, d, dog, dp, vt.data(), kBlockK, ds.data(), kBlockK, band);
            for (int64_t r = 0; r < rows; ++r) {
              const float* pr = pt.data() + r * kBlockK;
              float* dr = ds.data() + r * kBlockK;
              int64_t c0, c1;
              band_vectors(band, r, n, &c0, &c1);
              std::fill(dr, dr + c0, 0.f);
              std::fill(dr + c1, dr + n, 0.f);
              const vf dl = vbroadcast(delta[g * qn + i0 + r]);
              for (int64_t c = c0; c < c1; c += kVec) vstore(dr + c, vload(pr + c) * (vload(dr + c) - dl));
            }
            gemm<true, true>(cols, dp, rows, pt.data(), kBlockK, dog, dp, dv_acc.data(), dp, {}, band_t);  // dV += P^T dO
            gemm<true, true>(cols, dp, rows, ds.data(), kBlockK, qg, dp, dk_acc.data(), dp, {}, band_t);   // dK += dS^T Qs
            // dQ += dS K (times scale when written)
            gemm<true>(rows, dp, cols, ds.data(), kBlockK, kr.data(), dp, dq_acc.data() + (g * qn + i0) * dp, dp, {},
                       band);
          }
        }
        for (int64_t r = 0; r < cols; ++r) {
          T* dkr = dk + ki.row(b * mb, hk, s.kv_start + j0 + r);
          T* dvr = dv + ki.row(b * mb, hk, s.kv_start + j0 + r);
          for (int64_t c = 0; c < d; ++c) {
            dkr[c] = from_float<T>(dk_acc[r * dp + c]);
            dvr[c] = from_float<T>(dv_acc[r * dp + c]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        for (int64_t i = 0; i < qn; ++i) {
          T* dqr = dq + qi.row(b * mb, h, s.q_start + i);
          const float* a = dq_acc.data() + (g * qn + i) * dp;
          for (int64_t c = 0; c < d; ++c) dqr[c] = from_float<T>(a[c] * p.scale);
        }
      }
    }
  }
}

}  // namespace omni_fast
