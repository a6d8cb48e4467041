// LayerNorm over the last axis, torch's semantics: y = (x - mean) * rstd * w + b with the biased variance,
// statistics and arithmetic in float32, one rounding to the storage type at the end.
//
// Forward and backward, each as a scalar reference and a fast path (OpenMP over rows, the inner loops left to the
// compiler's vectoriser). The variance is taken around the mean in a second pass over the row (the row is in L1 by
// then) rather than as E[x^2] - mean^2, which cancels badly for rows far from zero; see layer_norm_row_stats. The
// backward recomputes mean and rstd instead of storing them: one extra read of x is cheaper than two more tensors
// through the MindSpore custom-op boundary.
//
// Backward, with xhat = (x - mean) * rstd, g = w * dy, n = cols:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dw = sum over rows of dy * xhat
//   db = sum over rows of dy
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace omni_fast {

struct LayerNormParams {
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-5f;
};

// ---------------------------------------------------------------- reference (scalar, one thread)

namespace detail {
// Mean and 1/sqrt(biased variance + eps) of one row, accumulated in double.
template <typename T>
inline void layer_norm_row_stats_reference(const T* xr, int64_t n, float eps, double* mean, double* rstd) {
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) sum += to_float(xr[c]);
  *mean = sum / n;
  double ss = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double d = to_float(xr[c]) - *mean;
    ss += d * d;
  }
  *rstd = 1.0 / std::sqrt(ss / n + eps);
}
}  // namespace detail

template <typename T>
void layer_norm_forward_reference(const LayerNormParams& p, const T* x, const T* w, const T* b, T* y) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* xr = x + r * p.cols;
    double mean, rstd;
    detail::layer_norm_row_stats_reference(xr, p.cols, p.eps, &mean, &rstd);
    for (int64_t c = 0; c < p.cols; ++c) {
      const double xhat = (to_float(xr[c]) - mean) * rstd;
      y[r * p.cols + c] = from_float<T>(float(xhat * to_float(w[c]) + to_float(b[c])));
    }
  }
}

template <typename T>
void layer_norm_backward_reference(const LayerNormParams& p, const T* dy, const T* x, const T* w, T* dx, T* dw,
                                   T* db) {
  std::vector<double> dw_acc(p.cols, 0.0), db_acc(p.cols, 0.0);
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* xr = x + r * p.cols;
    const T* dyr = dy + r * p.cols;
    double mean, rstd;
    detail::layer_norm_row_stats_reference(xr, p.cols, p.eps, &mean, &rstd);
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t c = 0; c < p.cols; ++c) {
      const double g = double(to_float(w[c])) * to_float(dyr[c]);
      sum_g += g;
      sum_gx += g * (to_float(xr[c]) - mean) * rstd;
    }
    for (int64_t c = 0; c < p.cols; ++c) {
      const double xhat = (to_float(xr[c]) - mean) * rstd;
      const double g = double(to_float(w[c])) * to_float(dyr[c]);
      dx[r * p.cols + c] = from_float<T>(float(rstd * (g - sum_g / p.cols - xhat * sum_gx / p.cols)));
      dw_acc[c] += to_float(dyr[c]) * xhat;
      db_acc[c] += to_float(dyr[c]);
    }
  }
  for (int64_t c = 0; c < p.cols; ++c) {
    dw[c] = from_float<T>(float(dw_acc[c]));
    db[c] = from_float<T>(float(db_acc[c]));
  }
}

// ---------------------------------------------------------------- fast path

namespace detail {
// Corrected two-pass (Chan, Golub, LeVeque): the second pass also sums the deviations from the first-pass mean, which
// are exactly the first pass's rounding error; adding them back makes the mean accurate to the rounding of the
// result rather than of a float32 sum of n values, which matters when |mean| >> std.
inline void layer_norm_row_stats(const float* xr, int64_t n, float eps, float* mean, float* rstd) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += xr[c];
  const float m = sum / float(n);
  float sd = 0.f, ss = 0.f;
#pragma omp simd reduction(+ : sd, ss)
  for (int64_t c = 0; c < n; ++c) {
    const float d = xr[c] - m;
    sd += d;
    ss += d * d;
  }
  *mean = m + sd / float(n);
  *rstd = 1.0f / std::sqrt(std::max(ss - sd * sd / float(n), 0.f) / float(n) + eps);
}
}  // namespace detail

template <typename T>
void layer_norm_forward(const LayerNormParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t n = p.cols;
#pragma omp parallel
  {
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : n), ws(n), bs(n);
    for (int64_t c = 0; c < n; ++c) {
      ws[c] = to_float(w[c]);
      bs[c] = to_float(b[c]);
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* xr = as_float_row(x + r * n, n, xs.data());
      float mean, rstd;
      detail::layer_norm_row_stats(xr, n, p.eps, &mean, &rstd);
      T* yr = y + r * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) yr[c] = from_float<T>((xr[c] - mean) * rstd * ws[c] + bs[c]);
    }
  }
}

template <typename T>
void layer_norm_backward(const LayerNormParams& p, const T* dy, const T* x, const T* w, T* dx, T* dw, T* db) {
  const int64_t n = p.cols;
  const int nthreads = omp_get_max_threads();
  // Per-thread dw/db partials summed in a fixed order afterwards: deterministic for a given thread count.
  std::vector<float> dw_partial(static_cast<size_t>(nthreads) * n, 0.f), db_partial(dw_partial.size(), 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    float* dwp = dw_partial.data() + static_cast<size_t>(tid) * n;
    float* dbp = db_partial.data() + static_cast<size_t>(tid) * n;
    std::vector<float> xs(std::is_same_v<T, float> ? 0 : n), dys(std::is_same_v<T, float> ? 0 : n), ws(n);
    for (int64_t c = 0; c < n; ++c) ws[c] = to_float(w[c]);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* xr = as_float_row(x + r * n, n, xs.data());
      const float* dyr = as_float_row(dy + r * n, n, dys.data());
      float mean, rstd;
      detail::layer_norm_row_stats(xr, n, p.eps, &mean, &rstd);
      float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < n; ++c) {
        const float g = ws[c] * dyr[c];
        sum_g += g;
        sum_gx += g * (xr[c] - mean);
      }
      // sum_gx was taken over (x - mean); one multiply by rstd turns it into sum(g * xhat).
      const float mean_g = sum_g / float(n), mean_gx = sum_gx * rstd / float(n);
      T* dxr = dx + r * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const float xhat = (xr[c] - mean) * rstd;
        dxr[c] = from_float<T>(rstd * (ws[c] * dyr[c] - mean_g - xhat * mean_gx));
        dwp[c] += dyr[c] * xhat;
        dbp[c] += dyr[c];
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    float acc_w = 0.f, acc_b = 0.f;
    for (int t = 0; t < nthreads; ++t) {
      acc_w += dw_partial[static_cast<size_t>(t) * n + c];
      acc_b += db_partial[static_cast<size_t>(t) * n + c];
    }
    dw[c] = from_float<T>(acc_w);
    db[c] = from_float<T>(acc_b);
  }
}

}  // namespace omni_fast
