// Exact (erf) GELU, torch's default: y = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, elementwise, float32 math.
//
// Forward and backward, each as a scalar reference (double math with std::erfc/std::exp, one thread) and a fast path
// (OpenMP over blocks of elements, one branch-free loop per block that the compiler vectorises with act::exp and
// act::normal_cdf). Both form Phi(x) as erfc(-x / sqrt 2) / 2 rather than 1 + erf as torch and the MindSpore
// composition do: for x << 0 the result is accurate relative to its size, theirs only to ~1e-7 * |x|.
// bfloat16 storage rounds once, as torch's bf16 F.gelu.
//
// Backward, with phi(x) = exp(-x^2 / 2) / sqrt(2 pi) the Gaussian density:
//   dx = dout * (Phi(x) + x * phi(x))
// exp(-x^2 / 2) is also the exponential that Phi's tail needs, so each direction computes one.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/activation_common.h"
#include "kernels/common.h"

namespace omni_fast {

struct GeluParams {
  int64_t n = 0;  // elements of x (= of y, dout and dx)
};

namespace gelu_constants {
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
}  // namespace gelu_constants

// ---------------------------------------------------------------- reference (scalar, one thread)

template <typename T>
void gelu_forward_reference(const GeluParams& p, const T* x, T* y) {
  using namespace gelu_constants;
  for (int64_t i = 0; i < p.n; ++i) {
    const double v = to_float(x[i]);
    y[i] = from_float<T>(float(0.5 * v * std::erfc(-v * kInvSqrt2)));
  }
}

template <typename T>
void gelu_backward_reference(const GeluParams& p, const T* dout, const T* x, T* dx) {
  using namespace gelu_constants;
  for (int64_t i = 0; i < p.n; ++i) {
    const double v = to_float(x[i]);
    const double cdf = 0.5 * std::erfc(-v * kInvSqrt2);
    const double pdf = std::exp(-0.5 * v * v) * kInvSqrt2Pi;
    dx[i] = from_float<T>(float(to_float(dout[i]) * (cdf + v * pdf)));
  }
}

// ---------------------------------------------------------------- fast path

template <typename T>
void gelu_forward(const GeluParams& p, const T* x, T* y) {
  act::for_blocks(p.n, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = to_float(x[i]);
      y[i] = from_float<T>(v * act::normal_cdf(v, act::exp(-0.5f * v * v)));
    }
  });
}

template <typename T>
void gelu_backward(const GeluParams& p, const T* dout, const T* x, T* dx) {
  constexpr float kInvSqrt2Pi = float(gelu_constants::kInvSqrt2Pi);
  act::for_blocks(p.n, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = to_float(x[i]);
      const float e = act::exp(-0.5f * v * v);
      dx[i] = from_float<T>(to_float(dout[i]) * (act::normal_cdf(v, e) + v * (e * kInvSqrt2Pi)));
    }
  });
}

}  // namespace omni_fast
