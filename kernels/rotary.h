// Rotary position embedding, half-split convention: y = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
// over the last axis. Float32 arithmetic, one rounding to the storage type per output.
//
// Layout: x is [rows, heads, dim] (rows = every axis before the heads, e.g. B*S of [B, S, N, D] or T of [T, N, D]);
// cos and sin are [rows, dim], one row shared by all heads of that row (the [B, S, 1, D] / [T, 1, D] broadcast).
// Per head, with h = dim / 2 and c < h:
//   y[c]     = x[c] * cos[c]         - x[c + h] * sin[c]
//   y[c + h] = x[c + h] * cos[c + h] + x[c] * sin[c + h]
// Backward (the transpose of that 2x2 map per pair): dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(v) =
// cat(v2, -v1):
//   dx[c]     = dy[c] * cos[c]         + dy[c + h] * sin[c + h]
//   dx[c + h] = dy[c + h] * cos[c + h] - dy[c] * sin[c]
// cos and sin get no gradient (they are functions of the positions only).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace omni_fast {

struct RotaryParams {
  int64_t rows = 0;
  int64_t heads = 0;
  int64_t dim = 0;  // even
};

// ---------------------------------------------------------------- reference (scalar, one thread)

// transpose = false applies the rotation (forward), true its transpose (backward): the two differ only in which
// half's sin term is subtracted and which half's sin is used.
template <typename T>
void rotary_reference(const RotaryParams& p, const T* x, const T* cos, const T* sin, T* y, bool transpose) {
  const int64_t h = p.dim / 2;
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* cr = cos + r * p.dim;
    const T* sr = sin + r * p.dim;
    for (int64_t n = 0; n < p.heads; ++n) {
      const T* xr = x + (r * p.heads + n) * p.dim;
      T* yr = y + (r * p.heads + n) * p.dim;
      for (int64_t c = 0; c < h; ++c) {
        const double x1 = to_float(xr[c]), x2 = to_float(xr[c + h]);
        const double c1 = to_float(cr[c]), c2 = to_float(cr[c + h]);
        const double s1 = to_float(sr[c]), s2 = to_float(sr[c + h]);
        yr[c] = from_float<T>(float(transpose ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1));
        yr[c + h] = from_float<T>(float(transpose ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2));
      }
    }
  }
}

template <typename T>
void rotary_forward_reference(const RotaryParams& p, const T* x, const T* cos, const T* sin, T* y) {
  rotary_reference(p, x, cos, sin, y, /*transpose=*/false);
}

template <typename T>
void rotary_backward_reference(const RotaryParams& p, const T* dy, const T* cos, const T* sin, T* dx) {
  rotary_reference(p, dy, cos, sin, dx, /*transpose=*/true);
}

// ---------------------------------------------------------------- fast path

namespace detail {
// One head. The sign is a template parameter so that each direction's loop is a plain multiply-add the compiler
// vectorises without a select.
template <typename T, bool kTranspose>
inline void rotary_head(const float* xr, const float* cr, const float* sr, int64_t h, T* yr) {
#pragma omp simd
  for (int64_t c = 0; c < h; ++c) {
    const float x1 = xr[c], x2 = xr[c + h];
    if constexpr (kTranspose) {
      yr[c] = from_float<T>(x1 * cr[c] + x2 * sr[c + h]);
      yr[c + h] = from_float<T>(x2 * cr[c + h] - x1 * sr[c]);
    } else {
      yr[c] = from_float<T>(x1 * cr[c] - x2 * sr[c]);
      yr[c + h] = from_float<T>(x2 * cr[c + h] + x1 * sr[c + h]);
    }
  }
}

template <typename T, bool kTranspose>
void rotary_fast(const RotaryParams& p, const T* x, const T* cos, const T* sin, T* y) {
  const int64_t d = p.dim, h = p.dim / 2;
  constexpr bool kConvert = !std::is_same_v<T, float>;
#pragma omp parallel
  {
    std::vector<float> cs(kConvert ? d : 0), ss(kConvert ? d : 0), xs(kConvert ? d : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      // cos/sin are converted once per row and reused by all its heads.
      const float* cr = as_float_row(cos + r * d, d, cs.data());
      const float* sr = as_float_row(sin + r * d, d, ss.data());
      for (int64_t n = 0; n < p.heads; ++n) {
        const int64_t off = (r * p.heads + n) * d;
        rotary_head<T, kTranspose>(as_float_row(x + off, d, xs.data()), cr, sr, h, y + off);
      }
    }
  }
}
}  // namespace detail

template <typename T>
void rotary_forward(const RotaryParams& p, const T* x, const T* cos, const T* sin, T* y) {
  detail::rotary_fast<T, false>(p, x, cos, sin, y);
}

template <typename T>
void rotary_backward(const RotaryParams& p, const T* dy, const T* cos, const T* sin, T* dx) {
  detail::rotary_fast<T, true>(p, dy, cos, sin, dx);
}

}  // namespace omni_fast
