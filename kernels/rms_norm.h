// RMSNorm over the last axis: y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in float32.
//
// Forward and backward, each as a scalar reference and a fast path (OpenMP over rows, the inner loops left
// to the compiler's vectoriser). The backward recomputes the per-row rstd instead of storing it: one extra
// read of x is cheaper than another tensor through the MindSpore custom-op boundary.
//
// Backward, with g = w * dy and r = rstd of the row (n = cols):
//   dx = r * g - x * r^3 * sum(g * x) / n
//   dw = sum over rows of dy * x * r
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace omni_fast {

struct RmsNormParams {
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
};

// ---------------------------------------------------------------- reference (scalar, one thread)

template <typename T>
void rms_norm_forward_reference(const RmsNormParams& p, const T* x, const T* w, T* y) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* xr = x + r * p.cols;
    double ss = 0.0;
    for (int64_t c = 0; c < p.cols; ++c) ss += double(to_float(xr[c])) * to_float(xr[c]);
    const float rstd = 1.0f / std::sqrt(float(ss / p.cols) + p.eps);
    for (int64_t c = 0; c < p.cols; ++c) {
      const float normed = to_float(from_float<T>(to_float(xr[c]) * rstd));
      y[r * p.cols + c] = from_float<T>(to_float(w[c]) * normed);
    }
  }
}

template <typename T>
void rms_norm_backward_reference(const RmsNormParams& p, const T* dy, const T* x, const T* w, T* dx, T* dw) {
  std::vector<double> dw_acc(p.cols, 0.0);
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* xr = x + r * p.cols;
    const T* dyr = dy + r * p.cols;
    double ss = 0.0, dot = 0.0;
    for (int64_t c = 0; c < p.cols; ++c) ss += double(to_float(xr[c])) * to_float(xr[c]);
    const double rstd = 1.0 / std::sqrt(ss / p.cols + p.eps);
    for (int64_t c = 0; c < p.cols; ++c) dot += double(to_float(w[c])) * to_float(dyr[c]) * to_float(xr[c]);
    const double coef = rstd * rstd * rstd * dot / p.cols;
    for (int64_t c = 0; c < p.cols; ++c) {
      const double g = double(to_float(w[c])) * to_float(dyr[c]);
      dx[r * p.cols + c] = from_float<T>(float(rstd * g - coef * to_float(xr[c])));
      dw_acc[c] += double(to_float(dyr[c])) * to_float(xr[c]) * rstd;
    }
  }
  for (int64_t c = 0; c < p.cols; ++c) dw[c] = from_float<T>(float(dw_acc[c]));
}

// ---------------------------------------------------------------- fast path

namespace detail {
inline float sum_squares(const float* v, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += v[i] * v[i];
  return acc;
}
}  // namespace detail

template <typename T>
void rms_norm_forward(const RmsNormParams& p, const T* x, const T* w, T* y) {
  const int64_t n = p.cols;
#pragma omp parallel
  {
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : n), ws(n);
    for (int64_t c = 0; c < n; ++c) ws[c] = to_float(w[c]);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* xr = as_float_row(x + r * n, n, xs.data());
      const float rstd = 1.0f / std::sqrt(detail::sum_squares(xr, n) / float(n) + p.eps);
      T* yr = y + r * n;
      if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) yr[c] = ws[c] * (xr[c] * rstd);
      } else {
        for (int64_t c = 0; c < n; ++c) yr[c] = from_float<T>(ws[c] * to_float(from_float<T>(xr[c] * rstd)));
      }
    }
  }
}

template <typename T>
void rms_norm_backward(const RmsNormParams& p, const T* dy, const T* x, const T* w, T* dx, T* dw) {
  const int64_t n = p.cols;
  const int nthreads = omp_get_max_threads();
  // Per-thread dw partials summed in a fixed order afterwards: deterministic for a given thread count.
  std::vector<float> dw_partial(static_cast<size_t>(nthreads) * n, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    float* dwp = dw_partial.data() + static_cast<size_t>(tid) * n;
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : n), dys(std::is_same_v<T, float> ? 0 : n), ws(n);
    for (int64_t c = 0; c < n; ++c) ws[c] = to_float(w[c]);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* xr = as_float_row(x + r * n, n, xs.data());
      const float* dyr = as_float_row(dy + r * n, n, dys.data());
      const float rstd = 1.0f / std::sqrt(detail::sum_squares(xr, n) / float(n) + p.eps);
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < n; ++c) dot += ws[c] * dyr[c] * xr[c];
      const float coef = rstd * rstd * rstd * dot / float(n);
      T* dxr = dx + r * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        dxr[c] = from_float<T>(rstd * ws[c] * dyr[c] - coef * xr[c]);
        dwp[c] += dyr[c] * xr[c] * rstd;
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    float acc = 0.f;
    for (int t = 0; t < nthreads; ++t) acc += dw_partial[static_cast<size_t>(t) * n + c];
    dw[c] = from_float<T>(acc);
  }
}

}  // namespace omni_fast
