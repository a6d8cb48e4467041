// Multi-tensor AdamW step and multi-tensor sum of squares (for the global gradient norm), in place.
//
// One call updates every parameter tensor of the model: the ~100 tensors of a small model are cut into chunks of
// kMultiTensorChunk elements and the chunks, not the tensors, are spread over the threads, so many small tensors
// still keep every core busy.
//
// The element arithmetic is the MindSpore composition of omni_fast.train.optim.AdamW (torch.optim.AdamW's order),
// one float32 rounding per operation:
//   g = grad * grad_scale
//   w = w * (1 - lr_wd)                     (decay tensors only)
//   m = m + (1 - beta1) * (g - m)
//   v = v * beta2 + (1 - beta2) * g * g
//   w = w - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
// and, when a bfloat16 parameter sits beside the float32 weights (its master copy), low = bf16(w) rounded to
// nearest even. Both paths below are bit-equal to that composition, which needs two compiler flags on every file
// that includes this header (CMakeLists.txt sets them): -ffp-contract=off, since a fused multiply-add rounds once
// where the composition rounds twice, and -fno-math-errno, without which the errno branch of sqrt keeps the loops
// from vectorising. (GCC's optimize pragma cannot scope them to this header: it stops the inlining of to_float
// and sqrt into the loops.) The second flag is visible to the preprocessor, so its absence stops the build.
//
// The sum of squares accumulates in double: per chunk in the fast path, and the chunk partials are added in chunk
// order, so the result does not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/common.h"

#if defined(__GNUC__) && !defined(__NO_MATH_ERRNO__)
#error "kernels/adamw.h needs -ffp-contract=off -fno-math-errno (see the comment at the top)"
#endif

namespace omni_fast {

constexpr int64_t kMultiTensorChunk = 32768;

// (1 - beta1) and (1 - beta2) are rounded to float32 from double by the caller, as the MindSpore composition
// (Python floats) and torch do; deriving them from float32 betas here would give other constants (1 - 0.999f is
// not float(1 - 0.999)).
struct AdamWParams {
  float lr_wd = 0.f;      // lr * weight_decay
  float step_size = 0.f;  // lr / (1 - beta1^t)
  float bc2_sqrt = 1.f;   // sqrt(1 - beta2^t)
  float grad_scale = 1.f;
  float one_minus_beta1 = 0.1f;
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float eps = 1e-8f;
};

// One gradient (or any tensor to square and sum): float32 or bfloat16.
struct GradTensor {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
};

// One parameter's buffers, all of grad.numel elements.
struct AdamWTensor {
  GradTensor grad;
  float* weight = nullptr;  // the float32 parameter itself, or the float32 master of a bfloat16 one
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  bf16* low = nullptr;  // the bfloat16 parameter to refresh from the new weights; nullptr when there is none
  bool decay = false;
};

// ---------------------------------------------------------------- reference (scalar, one thread)

inline float grad_at(const GradTensor& g, int64_t i) {
  return g.dtype == DType::kFloat32 ? static_cast<const float*>(g.data)[i]
                                    : to_float(static_cast<const bf16*>(g.data)[i]);
}

inline void adamw_update_reference(const AdamWParams& p, const AdamWTensor* tensors, int64_t count) {
  for (int64_t t = 0; t < count; ++t) {
    const AdamWTensor& x = tensors[t];
    for (int64_t i = 0; i < x.grad.numel; ++i) {
      const float g = grad_at(x.grad, i) * p.grad_scale;
      float w = x.weight[i];
      if (x.decay) w = w * (1.0f - p.lr_wd);
      const float m = x.exp_avg[i] + p.one_minus_beta1 * (g - x.exp_avg[i]);
      const float v = x.exp_avg_sq[i] * p.beta2 + p.one_minus_beta2 * g * g;
      const float denom = std::sqrt(v) / p.bc2_sqrt + p.eps;
      w = w - p.step_size * (m / denom);
      x.weight[i] = w;
      x.exp_avg[i] = m;
      x.exp_avg_sq[i] = v;
      if (x.low != nullptr) x.low[i] = from_float<bf16>(w);
    }
  }
}

inline double squared_sum_reference(const GradTensor* tensors, int64_t count) {
  double acc = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t i = 0; i < tensors[t].numel; ++i) {
      const double g = grad_at(tensors[t], i);
      acc += g * g;
    }
  }
  return acc;
}

// ---------------------------------------------------------------- fast path

namespace detail {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Every tensor cut into pieces of at most kMultiTensorChunk elements, in tensor order.
template <typename Numel>
std::vector<Chunk> chunks_of(int64_t count, Numel numel) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t b = 0; b < numel(t); b += kMultiTensorChunk) {
      chunks.push_back({t, b, std::min(numel(t), b + kMultiTensorChunk)});
    }
  }
  return chunks;
}

// Branch-free over [begin, end) for one grad dtype and low-precision choice, so the compiler vectorises it.
template <typename G, bool kLow>
void adamw_range(const AdamWParams& p, const AdamWTensor& x, int64_t begin, int64_t end) {
  const G* __restrict grad = static_cast<const G*>(x.grad.data);
  float* __restrict weight = x.weight;
  float* __restrict exp_avg = x.exp_avg;
  float* __restrict exp_avg_sq = x.exp_avg_sq;
  bf16* __restrict low = x.low;
  // w * 1 is exact, so no-decay tensors take the same loop.
  const float keep = x.decay ? 1.0f - p.lr_wd : 1.0f;
  const float scale = p.grad_scale, c1 = p.one_minus_beta1, beta2 = p.beta2, c2 = p.one_minus_beta2;
  const float bc2_sqrt = p.bc2_sqrt, eps = p.eps, step_size = p.step_size;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = to_float(grad[i]) * scale;
    const float m = exp_avg[i] + c1 * (g - exp_avg[i]);
    const float v = exp_avg_sq[i] * beta2 + c2 * g * g;
    const float denom = std::sqrt(v) / bc2_sqrt + eps;
    const float w = weight[i] * keep - step_size * (m / denom);
    weight[i] = w;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (kLow) low[i] = from_float<bf16>(w);
  }
}

template <typename G>
double squared_sum_range(const GradTensor& x, int64_t begin, int64_t end) {
  const G* __restrict data = static_cast<const G*>(x.data);
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const double g = to_float(data[i]);
    acc += g * g;
  }
  return acc;
}

}  // namespace detail

inline void adamw_update(const AdamWParams& p, const AdamWTensor* tensors, int64_t count) {
  const auto chunks = detail::chunks_of(count, [&](int64_t t) { return tensors[t].grad.numel; });
  const int64_t n = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < n; ++c) {
    const detail::Chunk& k = chunks[c];
    const AdamWTensor& x = tensors[k.tensor];
    const bool bf16_grad = x.grad.dtype == DType::kBFloat16;
    if (x.low != nullptr) {
      bf16_grad ? detail::adamw_range<bf16, true>(p, x, k.begin, k.end)
                : detail::adamw_range<float, true>(p, x, k.begin, k.end);
    } else {
      bf16_grad ? detail::adamw_range<bf16, false>(p, x, k.begin, k.end)
                : detail::adamw_range<float, false>(p, x, k.begin, k.end);
    }
  }
}

inline double squared_sum(const GradTensor* tensors, int64_t count) {
  const auto chunks = detail::chunks_of(count, [&](int64_t t) { return tensors[t].numel; });
  const int64_t n = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size());
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < n; ++c) {
    const detail::Chunk& k = chunks[c];
    const GradTensor& x = tensors[k.tensor];
    partial[c] = x.dtype == DType::kBFloat16 ? detail::squared_sum_range<bf16>(x, k.begin, k.end)
                                             : detail::squared_sum_range<float>(x, k.begin, k.end);
  }
  double acc = 0.0;
  for (const double s : partial) acc += s;
  return acc;
}

}  // namespace omni_fast
