// CPU emulation of the part of the CUDA runtime and device language that csrc/*.cu uses, so that
// the CUDA backend's kernels run (as plain C++ compiled by g++) against the PyTorch reference in CI
// without a GPU. Not a general CUDA emulator: only what the kernels need, each piece with CUDA's
// semantics (docs: CUDA C++ Programming Guide, "Warp Shuffle Functions", "Warp Vote Functions").
//
// Execution model (tests/cuda_emu/runtime.cpp): blocks run one after another, in a seeded random
// order; a block's threads are fibers on one OS thread, switched only at __syncthreads and warp
// collectives (shuffles, ballot, __syncwarp), in a seeded random order. A collective completes when
// all 32 lanes of the warp reach it, a barrier when every thread that has not exited does. What
// real hardware would hang on or fault on is reported as a launch failure with a message:
// a barrier or collective some threads never reach (deadlock), lanes of one warp at different
// collectives, a partial-mask collective, a misaligned vector load, an invalid launch configuration.
// `__shared__` variables live in one linker section that is filled with 0xff bytes before every
// block (NaN floats, -1 ints, the largest u64 key), as uninitialised shared memory may hold anything.
// Atomics are plain read-modify-writes: fibers never switch inside one.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- language keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ __attribute__((section("lag_emu_shared"))) static

// ---------------------------------------------------------------- vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

extern uint3 threadIdx;  // set by the scheduler before a fiber runs
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ---------------------------------------------------------------- runtime API subset
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

namespace lag_emu {

enum WarpOp { kShflIdx, kShflUp, kShflXor, kBallot, kSyncWarp };

// Suspends the calling thread until every live thread of the block has called it.
void block_barrier();
// Suspends the calling lane until all 32 lanes of its warp reach a collective; returns the lane's
// result (the source lane's value for shuffles, the vote mask for a ballot).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param);
// Reports a fault (a misaligned address, ...): the launch fails with `what` as its message.
[[noreturn]] void fault(cudaError_t err, const char* what);
// Runs body(ctx) as every thread of every block of the grid.
void run_grid(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* ctx);

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "collectives carry at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
inline void check_width(int width) {
  if (width != 32) fault(cudaErrorLaunchFailure, "emulated shuffles support width 32 only");
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to
// launcher(grid, block, smem, stream)("kernel", kernel, args) by tests/emulated_cuda.py.
struct Launch {
  dim3 grid, block;
  template <typename... P, typename... A>
  void operator()(const char* name, void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
    std::tuple<P...> params(std::forward<A>(args)...);  // converted as a call would convert them
    auto call = [&] { std::apply(kernel, params); };
    run_grid(grid, block, name, [](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call);
  }
};
// The kernels use static shared memory only (the byte count is 0); the stream is the one in-order queue.
inline Launch launcher(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) { return Launch{grid, block}; }

}  // namespace lag_emu

// ---------------------------------------------------------------- device functions
inline void __syncthreads() { lag_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { lag_emu::warp_collective(lag_emu::kSyncWarp, mask, 0, 0); }

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  lag_emu::check_width(width);
  return lag_emu::from_bits<T>(lag_emu::warp_collective(lag_emu::kShflIdx, mask, lag_emu::to_bits(v), src_lane));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  lag_emu::check_width(width);
  return lag_emu::from_bits<T>(
      lag_emu::warp_collective(lag_emu::kShflUp, mask, lag_emu::to_bits(v), static_cast<int>(delta)));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  lag_emu::check_width(width);
  return lag_emu::from_bits<T>(lag_emu::warp_collective(lag_emu::kShflXor, mask, lag_emu::to_bits(v), lane_mask));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(lag_emu::warp_collective(lag_emu::kBallot, mask, predicate != 0, 0));
}

// Loads through the read-only path: any type, at its natural alignment (a float4 / uint4 needs 16
// bytes, as the hardware's vector loads do).
template <typename T> inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    lag_emu::fault(cudaErrorMisalignedAddress, "misaligned address in __ldg");
  return *p;
}

inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __float_as_uint(float f) { return lag_emu::to_bits(f); }
inline float __uint_as_float(unsigned u) { return lag_emu::from_bits<float>(u); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
