// SwiGLU, the gated MLP activation: out = silu(gate) * up, silu(g) = g * sigmoid(g), elementwise, float32 math.
//
// Forward and backward, each as a scalar reference (double math with std::exp, one thread) and a fast path (OpenMP
// over blocks of elements, one branch-free loop per block that the compiler vectorises with act::exp). One pass
// replaces the four to six elementwise kernels MindSpore launches for the composition and its gradient; the
// backward recomputes sigmoid(gate) instead of storing it, since an extra tensor costs more than the exp.
//
// bfloat16 storage rounds silu(gate) to bfloat16 before the product, as torch's bf16 `F.silu(gate) * up` does (two
// ops, two roundings); the backward rounds each gradient once.
//
// Backward, with s = sigmoid(g):
//   d_gate = dout * up * s * (1 + g * (1 - s))
//   d_up   = dout * g * s
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/activation_common.h"
#include "kernels/common.h"

namespace omni_fast {

struct SwiGluParams {
  int64_t n = 0;  // elements of gate (= of up, out and every gradient)
};

// ---------------------------------------------------------------- reference (scalar, one thread)

template <typename T>
void swiglu_forward_reference(const SwiGluParams& p, const T* gate, const T* up, T* out) {
  for (int64_t i = 0; i < p.n; ++i) {
    const double g = to_float(gate[i]);
    const float silu = to_float(from_float<T>(float(g / (1.0 + std::exp(-g)))));
    out[i] = from_float<T>(float(double(silu) * to_float(up[i])));
  }
}

template <typename T>
void swiglu_backward_reference(const SwiGluParams& p, const T* dout, const T* gate, const T* up, T* d_gate,
                               T* d_up) {
  for (int64_t i = 0; i < p.n; ++i) {
    const double g = to_float(gate[i]), u = to_float(up[i]), dy = to_float(dout[i]);
    const double s = 1.0 / (1.0 + std::exp(-g));
    d_gate[i] = from_float<T>(float(dy * u * s * (1.0 + g * (1.0 - s))));
    d_up[i] = from_float<T>(float(dy * g * s));
  }
}

// ---------------------------------------------------------------- fast path

template <typename T>
void swiglu_forward(const SwiGluParams& p, const T* gate, const T* up, T* out) {
  act::for_blocks(p.n, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = to_float(gate[i]);
      const float silu = to_float(from_float<T>(g * act::sigmoid(g)));
      out[i] = from_float<T>(silu * to_float(up[i]));
    }
  });
}

template <typename T>
void swiglu_backward(const SwiGluParams& p, const T* dout, const T* gate, const T* up, T* d_gate, T* d_up) {
  act::for_blocks(p.n, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = to_float(gate[i]), dy = to_float(dout[i]);
      const float s = act::sigmoid(g);
      d_gate[i] = from_float<T>(dy * to_float(up[i]) * s * (1.f + g * (1.f - s)));
      d_up[i] = from_float<T>(dy * g * s);
    }
  });
}

}  // namespace omni_fast
