// Device helpers shared by the three LAG kernels: dtype conversion, 16-byte vector loads,
// the order-preserving packed (score, index) key, warp reductions, a block bitonic sort and
// small host utilities (dtype dispatch, device guard, SM count). CUDA headers only.
//
// Builds with torch's -D__CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__ flags: every conversion below is an explicit intrinsic.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

#include "lag_cuda.h"

namespace lag {

constexpr int kThreads = 256;  // every kernel runs 8-warp blocks
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
typedef unsigned long long u64;

// ---------------------------------------------------------------- dtype conversion
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Eight consecutive elements starting at p (p must be 16-byte aligned), as fp32.
__device__ __forceinline__ void load8(const float* p, float (&o)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&o)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 f = __half22float2(h);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&o)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 f = __bfloat1622float2(h);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

// ---------------------------------------------------------------- ranking keys
// Order-preserving map of the reference's rank key to uint32: larger float -> larger key.
// NaN ranks like -inf (reference: nan_to_num(nan=-inf)), -0.0 ties with +0.0 (as in torch.sort).
__device__ __forceinline__ uint32_t ordered_key(float f) {
  if (isnan(f)) f = -INFINITY;
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float ordered_key_to_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return __uint_as_float(u);
}
constexpr uint32_t kOrderedNegInf = 0x007fffffu;  // ordered_key(-inf) == ordered_key(NaN)

// Packed key: high word = ordered score, low word = ~index. Larger packed key = better
// (higher score; on equal scores the LOWER index). Never 0 for index >= 0, so 0 pads.
__device__ __forceinline__ u64 pack_key(float score, int32_t index) {
  return (static_cast<u64>(ordered_key(score)) << 32) | static_cast<u64>(~static_cast<uint32_t>(index));
}
__device__ __forceinline__ int32_t key_index(u64 key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key & 0xffffffffull));
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Sorts `count` independent arrays of length L (a power of two) descending, in shared memory;
// array a starts at buf + a * stride. All threads of the block must call it; it ends synced.
__device__ __forceinline__ void block_bitonic_desc(u64* buf, int count, int L, int stride) {
  const int half = L >> 1;
  const int total = count * half;
  for (int size = 2; size <= L; size <<= 1) {
    for (int st = size >> 1; st > 0; st >>= 1) {
      for (int q = threadIdx.x; q < total; q += blockDim.x) {
        const int a = q / half;
        const int p = q - a * half;
        const int i = 2 * st * (p / st) + (p % st);
        const int j = i + st;
        u64* b = buf + a * stride;
        const u64 u = b[i], v = b[j];
        const bool desc = (i & size) == 0;
        if (desc ? (u < v) : (u > v)) {
          b[i] = v;
          b[j] = u;
        }
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------- host helpers
template <typename T> struct Tag { typedef T type; };

// Calls f(Tag<scalar>()) for a LAG_DTYPE_* code; returns cudaErrorInvalidValue for others.
template <typename F> inline int dispatch_dtype(int code, F&& f) {
  switch (code) {
    case LAG_DTYPE_F32: return f(Tag<float>());
    case LAG_DTYPE_F16: return f(Tag<__half>());
    case LAG_DTYPE_BF16: return f(Tag<__nv_bfloat16>());
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    int cur = -1;
    if (device >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != device) {
      if (cudaSetDevice(device) == cudaSuccess) prev = cur;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

// A device attribute, cached per device (read once: launchers stay cheap); `fallback` if unreadable.
template <cudaDeviceAttr Attr> inline int device_attr(int device, int fallback) {
  static int cache[64] = {0};
  if (device < 0) cudaGetDevice(&device);
  const int slot = (device >= 0 && device < 64) ? device : -1;
  if (slot >= 0 && cache[slot] > 0) return cache[slot];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, Attr, device) != cudaSuccess || v <= 0) {
    cudaGetLastError();  // clear it
    return fallback;
  }
  if (slot >= 0) cache[slot] = v;
  return v;
}

inline int sm_count(int device) { return device_attr<cudaDevAttrMultiProcessorCount>(device, 108); }

inline int pow2_ceil(long long v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int finish_launch() { return static_cast<int>(cudaGetLastError()); }

}  // namespace lag
