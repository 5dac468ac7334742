// CPU emulation of cuda_fp16.h's storage type and the conversions csrc/ uses (IEEE binary16,
// round to nearest even: what the hardware's cvt.rn.f16.f32 does). See cuda_runtime.h.
#pragma once

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;  // x at the lower address, as in CUDA
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return lag_emu::from_bits<float>(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return lag_emu::from_bits<float>(sign);
    const float sub = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return sign ? -sub : sub;
  }
  return lag_emu::from_bits<float>(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = lag_emu::to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (au >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (au < 0x38800000u) {  // below the smallest normal half: a subnormal (or zero), in units of 2^-24
    const float scaled = lag_emu::from_bits<float>(au) * 16777216.0f;  // exact
    const uint16_t m = static_cast<uint16_t>(nearbyintf(scaled));      // default rounding: to nearest even
    return __half{static_cast<uint16_t>(sign | m)};
  }
  const uint32_t rounded = au + 0x0fffu + ((au >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return __half{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
