// Shared scalar types and helpers for the omni_fast kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace omni_fast {

enum class DType { kFloat32, kBFloat16 };

// bfloat16 is stored as the high 16 bits of a float32 (MindSpore and torch agree on this layout).
struct bf16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
// Round to nearest even, as torch and MindSpore do when casting float32 -> bfloat16; NaN stays NaN.
template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// A row as float32: float rows as they are, bf16 rows converted once into `scratch` (n floats), so that the
// kernels' hot loops see plain floats either way.
template <typename T>
inline const float* as_float_row(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)scratch;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = to_float(src[i]);
    return scratch;
  }
}

}  // namespace omni_fast
