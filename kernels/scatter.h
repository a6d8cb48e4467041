// Multimodal scatter: write each modality's encoder features into the token embeddings at its placeholder ids.
//
// Forward:  out[t] = features[m][k]  if ids[t] == token_id[m] and t is the k-th such token (row-major over [B, S]),
//           out[t] = embeds[t]       otherwise.
// Backward: d_embeds[t] = 0 at placeholder tokens, d_out[t] elsewhere; d_features[m][k] = d_out[t] (the gather).
//
// This equals one masked_scatter per modality, in any order, because the placeholder sets of different token
// ids are disjoint. It is a pure copy (no arithmetic), so the element type only matters through its size and both
// paths are exact for float32 and bfloat16 storage.
//
// A modality with rows == 0 (an absent one; its features pointer may be null) must have no placeholders.
// When the placeholder count of a modality differs from its feature rows, nothing is read or written and the
// kernels return that modality's index (so a caller reports both counts from `counts`) instead of reading out of
// bounds; kScatterOk otherwise.
//
// The fast path first scans the ids once (a sequential prefix count per modality: a few microseconds for 8k
// tokens, against milliseconds of row copies) into a per-token source row, then copies whole rows with OpenMP
// over output rows, writing with non-temporal (streaming) stores: at model sizes the output is far larger than
// the caches, and a normal store first reads each destination line (read-for-ownership), a third of the memory
// traffic of a copy. The scalar reference below counts, then copies element by element on one thread with
// normal stores (the compiler vectorises that loop, so on one core it is not far behind).
#pragma once

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/common.h"

namespace omni_fast {

constexpr int kScatterMaxModalities = 3;
constexpr int kScatterOk = -1;

struct ScatterParams {
  int64_t tokens = 0;  // rows of embeds / out: B * S
  int64_t hidden = 0;  // H
  int modalities = 0;  // entries used in token_id / rows
  int64_t token_id[kScatterMaxModalities] = {};  // distinct (the callers check)
  int64_t rows[kScatterMaxModalities] = {};  // feature rows of each modality
};

// The placeholder count of each modality, and the index of the first modality whose count differs from its
// rows (kScatterOk when all agree).
template <typename Id>
int scatter_count_placeholders(const ScatterParams& p, const Id* ids, int64_t* counts) {
  for (int m = 0; m < p.modalities; ++m) counts[m] = 0;
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int m = 0; m < p.modalities; ++m) counts[m] += static_cast<int64_t>(ids[t]) == p.token_id[m];
  }
  for (int m = 0; m < p.modalities; ++m) {
    if (counts[m] != p.rows[m]) return m;
  }
  return kScatterOk;
}

// ---------------------------------------------------------------- reference (scalar, one thread)

template <typename T, typename Id>
int multimodal_scatter_forward_reference(const ScatterParams& p, const T* embeds, const Id* ids,
                                         const T* const* features, T* out, int64_t* counts) {
  if (int bad = scatter_count_placeholders(p, ids, counts); bad != kScatterOk) return bad;
  int64_t next[kScatterMaxModalities] = {};
  for (int64_t t = 0; t < p.tokens; ++t) {
    const T* src = embeds + t * p.hidden;
    for (int m = 0; m < p.modalities; ++m) {
      if (static_cast<int64_t>(ids[t]) == p.token_id[m]) src = features[m] + next[m]++ * p.hidden;
    }
    for (int64_t c = 0; c < p.hidden; ++c) out[t * p.hidden + c] = src[c];
  }
  return kScatterOk;
}

template <typename T, typename Id>
int multimodal_scatter_backward_reference(const ScatterParams& p, const T* d_out, const Id* ids, T* d_embeds,
                                          T* const* d_features, int64_t* counts) {
  if (int bad = scatter_count_placeholders(p, ids, counts); bad != kScatterOk) return bad;
  int64_t next[kScatterMaxModalities] = {};
  for (int64_t t = 0; t < p.tokens; ++t) {
    const T* src = d_out + t * p.hidden;
    T* embeds_row = d_embeds + t * p.hidden;
    T* feature_row = nullptr;
    for (int m = 0; m < p.modalities; ++m) {
      if (static_cast<int64_t>(ids[t]) == p.token_id[m]) feature_row = d_features[m] + next[m]++ * p.hidden;
    }
    for (int64_t c = 0; c < p.hidden; ++c) {
      embeds_row[c] = feature_row ? from_float<T>(0.f) : src[c];
      if (feature_row) feature_row[c] = src[c];
    }
  }
  return kScatterOk;
}

// ---------------------------------------------------------------- fast path

namespace detail {

// Streaming stores of the widest vector the build targets; memcpy/memset cover the unaligned head and the tail.
#if defined(__AVX512F__)
constexpr size_t kStreamBytes = 64;
inline void stream_store(char* dst, const char* src) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
inline void stream_zero(char* dst) { _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_setzero_si512()); }
#elif defined(__AVX__)
constexpr size_t kStreamBytes = 32;
inline void stream_store(char* dst, const char* src) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
inline void stream_zero(char* dst) { _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_setzero_si256()); }
#elif defined(__SSE2__)
constexpr size_t kStreamBytes = 16;
inline void stream_store(char* dst, const char* src) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
inline void stream_zero(char* dst) { _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128()); }
#endif

// Bytes before dst reaches a kStreamBytes boundary (at most n).
inline size_t head_bytes(const char* dst, size_t n) {
#if defined(__SSE2__)
  const size_t head = (kStreamBytes - reinterpret_cast<uintptr_t>(dst) % kStreamBytes) % kStreamBytes;
  return head < n ? head : n;
#else
  (void)dst;
  return n;  // no streaming stores: plain memcpy/memset for the whole row
#endif
}

// Copies n bytes; the caller ends its run of copies with stream_fence().
inline void stream_copy(void* dst_, const void* src_, size_t n) {
  char* dst = static_cast<char*>(dst_);
  const char* src = static_cast<const char*>(src_);
  const size_t head = head_bytes(dst, n);
  std::memcpy(dst, src, head);
  size_t i = head;
#if defined(__SSE2__)
  for (; i + kStreamBytes <= n; i += kStreamBytes) stream_store(dst + i, src + i);
#endif
  std::memcpy(dst + i, src + i, n - i);
}

inline void stream_memset_zero(void* dst_, size_t n) {
  char* dst = static_cast<char*>(dst_);
  const size_t head = head_bytes(dst, n);
  std::memset(dst, 0, head);
  size_t i = head;
#if defined(__SSE2__)
  for (; i + kStreamBytes <= n; i += kStreamBytes) stream_zero(dst + i);
#endif
  std::memset(dst + i, 0, n - i);
}

// Streaming stores are weakly ordered: each thread fences its own before the results are handed over.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Where token t's row comes from (forward) or goes to (backward): modality -1 is the embeddings row t itself.
struct ScatterRow {
  int32_t modality;
  int64_t row;
};

// One pass over the ids: a running count per modality numbers the placeholders in order of appearance.
template <typename Id>
int scatter_plan(const ScatterParams& p, const Id* ids, std::vector<ScatterRow>* plan, int64_t* counts) {
  plan->resize(static_cast<size_t>(p.tokens));
  for (int m = 0; m < p.modalities; ++m) counts[m] = 0;
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    ScatterRow r{-1, t};
    for (int m = 0; m < p.modalities; ++m) {
      if (id == p.token_id[m]) r = ScatterRow{m, counts[m]++};
    }
    (*plan)[static_cast<size_t>(t)] = r;
  }
  // Checked before any copy, so a plan whose rows exceed a features tensor is never executed.
  for (int m = 0; m < p.modalities; ++m) {
    if (counts[m] != p.rows[m]) return m;
  }
  return kScatterOk;
}

}  // namespace detail

template <typename T, typename Id>
int multimodal_scatter_forward(const ScatterParams& p, const T* embeds, const Id* ids, const T* const* features,
                               T* out, int64_t* counts) {
  std::vector<detail::ScatterRow> plan;
  if (int bad = detail::scatter_plan(p, ids, &plan, counts); bad != kScatterOk) return bad;
  const int64_t h = p.hidden;
  const size_t row_bytes = static_cast<size_t>(h) * sizeof(T);
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < p.tokens; ++t) {
      const detail::ScatterRow r = plan[static_cast<size_t>(t)];
      const T* src = r.modality < 0 ? embeds + t * h : features[r.modality] + r.row * h;
      detail::stream_copy(out + t * h, src, row_bytes);
    }
    detail::stream_fence();
  }
  return kScatterOk;
}

template <typename T, typename Id>
int multimodal_scatter_backward(const ScatterParams& p, const T* d_out, const Id* ids, T* d_embeds,
                                T* const* d_features, int64_t* counts) {
  std::vector<detail::ScatterRow> plan;
  if (int bad = detail::scatter_plan(p, ids, &plan, counts); bad != kScatterOk) return bad;
  const int64_t h = p.hidden;
  const size_t row_bytes = static_cast<size_t>(h) * sizeof(T);
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < p.tokens; ++t) {
      const detail::ScatterRow r = plan[static_cast<size_t>(t)];
      if (r.modality < 0) {
        detail::stream_copy(d_embeds + t * h, d_out + t * h, row_bytes);
      } else {
        // All-zero bits are +0.0 in both float32 and bfloat16.
        detail::stream_memset_zero(d_embeds + t * h, row_bytes);
        detail::stream_copy(d_features[r.modality] + r.row * h, d_out + t * h, row_bytes);
      }
    }
    detail::stream_fence();
  }
  return kScatterOk;
}

}  // namespace omni_fast
