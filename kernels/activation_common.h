// Shared by the activation kernels (swiglu.h, gelu.h): the OpenMP loop over blocks of elements, and float32 exp,
// sigmoid and the normal CDF written as branch-free scalar code so that GCC vectorises the `#pragma omp simd` loops
// calling them. std::exp/std::erf would stay one libm call per element there: glibc declares its vector variants
// (libmvec) only under -ffast-math. Both branches of every select are computed; without AVX-512 masking GCC
// if-converts such loops only under -fno-trapping-math, which CMakeLists.txt sets for the files including this header.
//
// Results that would be subnormal are flushed to 0 (exp(x) for x < ln(FLT_MIN)): nothing downstream can tell, and
// subnormal arithmetic costs ~100 cycles per operation on x86.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace omni_fast::act {

// Elements per OpenMP work item: 64 KiB of float32 per stream, large enough that scheduling is noise and small
// enough that a [1024, 1536] MLP activation still splits into ~100 items.
constexpr int64_t kBlock = 16384;

// Runs body(begin, end) over [0, n) in blocks, in parallel when there is more than one block.
template <typename Body>
void for_blocks(int64_t n, Body body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) body(b * kBlock, std::min(n, (b + 1) * kBlock));
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// exp(x) = 2^n * exp(r) with n = round(x / ln2) and r = x - n ln2, |r| <= ln2 / 2. ln2 is split in two (Cody-Waite)
// so that n * kLn2Hi is exact (kLn2Hi has 9 significant bits, |n| <= 127). exp(r) is its Taylor polynomial of degree
// 7 (truncation error < 4e-9 relative); measured <= 1 ulp from double exp. NaN stays NaN; 0 below ln(FLT_MIN), and
// +inf from 127.5 ln2 = 88.38 on rather than from ln(FLT_MAX) = 88.72: 2^n then fits one exponent field, and no
// caller needs results above 2^127.5 (sigmoid(x < -88.38) becomes 0 instead of a subnormal below 2^-127.5).
inline float exp(float x) {
  constexpr float kLo = -87.33654f;  // ln(FLT_MIN)
  constexpr float kHi = 88.37626f;   // just below 127.5 ln2: n <= 127
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2Hi = 0.693359375f;     // 355 / 512
  constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  constexpr uint32_t kRoundMagicBits = 0x4b400000u;
  float xc = x < kLo ? kLo : x;  // comparisons with NaN are false: NaN passes through both clamps
  xc = xc > kHi ? kHi : xc;
  const float shifted = xc * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float y = p * bits_to_float((shifted_bits - kRoundMagicBits + 127u) << 23);  // times 2^n
  return x < kLo ? 0.f : x > kHi ? std::numeric_limits<float>::infinity() : y;
}

inline float sigmoid(float x) { return 1.f / (1.f + act::exp(-x)); }

// Phi(x) = erfc(-x / sqrt 2) / 2, the standard normal CDF, given e = exp(-x^2 / 2). With a = |x| / sqrt 2,
// erfc(a) = e * Q(u), u = 1 / (1 + a / 2), where Q ~ erfc(a) * exp(a^2) is a weighted least-squares fit (float64,
// 4000 Chebyshev nodes on a in [0, 9.35], relative weights) of degree 9 in u; measured in float32 <= 3.3e-7
// relative. Phi = e Q / 2 for x < 0 and 1 - e Q / 2 for x >= 0: one branch-free formula for all x that never forms
// 1 + erf, so the left tail keeps a relative accuracy where torch's 1 + erf carries erf's absolute error (~6e-8).
// Beyond a = 9.35, e underflows to 0. Measured against double erfc: Phi within 4e-7 * (1 + x^2 / 4) relative, the
// x^2 term being the rounding of x^2 / 2 passed through exp.
inline float normal_cdf(float x, float e) {
  constexpr float kInvSqrt2 = 0.70710678f;
  const float a = (x < 0.f ? -x : x) * kInvSqrt2;
  const float u = 1.f / (1.f + 0.5f * a);
  float q = -5.706379636e-02f;
  q = q * u + 2.737958239e-01f;
  q = q * u - 4.622636221e-01f;
  q = q * u + 2.455942228e-01f;
  q = q * u - 4.884650699e-04f;
  q = q * u + 1.892541224e-01f;
  q = q * u + 2.474947829e-01f;
  q = q * u + 2.814980504e-01f;
  q = q * u + 2.821833431e-01f;
  q = q * u - 4.505216155e-06f;
  const float half_erfc = 0.5f * e * q;
  return x < 0.f ? half_erfc : 1.f - half_erfc;
}

}  // namespace omni_fast::act
