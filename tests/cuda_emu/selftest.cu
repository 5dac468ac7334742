// Kernels that exercise the emulator itself (tests/test_cuda_emulator.py checks them against CUDA's
// documented semantics). emu_selftest(which, out) launches case `which` and returns
// cudaGetLastError(): 0, or the error the emulator reports.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[tid][0..4]: shfl_xor(tid, 5), shfl_up(tid, 3), shfl(tid, 7), ballot(lane % 3 == 0 || tid == 40),
// a 64-bit shfl_xor(2^40 + tid, 1).
__global__ void collectives_kernel(long long* out) {
  const int tid = threadIdx.x, lane = tid & 31;
  long long* o = out + tid * 5;
  o[0] = __shfl_xor_sync(kFull, tid, 5);
  o[1] = __shfl_up_sync(kFull, tid, 3);
  o[2] = __shfl_sync(kFull, tid, 7);
  o[3] = __ballot_sync(kFull, lane % 3 == 0 || tid == 40);
  o[4] = __shfl_xor_sync(kFull, (1ll << 40) + tid, 1);
}

// Every thread reads its neighbour's value written before the barrier; the upper half then exits
// and the lower half meets at a second barrier (exited threads do not count).
__global__ void barrier_kernel(long long* out) {
  __shared__ int s[256];
  const int tid = threadIdx.x;
  s[tid] = 1000 + tid;
  __syncthreads();
  out[tid] = s[(tid + 1) % 256];
  if (tid >= 128) return;
  __syncthreads();
  out[tid] += 1;
}

// Reads shared memory no thread wrote: the emulator's poison (0xff bytes).
__global__ void shared_poison_kernel(long long* out) {
  __shared__ int s_int[4];
  __shared__ float s_float[4];
  out[threadIdx.x] = s_int[threadIdx.x & 3];
  out[256 + threadIdx.x] = isnan(s_float[threadIdx.x & 3]) ? 1 : 0;
}

// Threads take slots with a shared atomic: the order follows the (seeded) schedule.
__global__ void order_kernel(long long* out) {
  __shared__ int s_next;
  if (threadIdx.x == 0) s_next = 0;
  __syncthreads();
  for (int i = 0; i < 3; ++i) {
    out[atomicAdd(&s_next, 1)] = threadIdx.x;
    __syncthreads();
  }
}

// Half of warp 0 waits at the block barrier, the other half at a shuffle: neither completes.
__global__ void deadlock_kernel(long long* out) {
  if ((threadIdx.x & 31) < 16 || threadIdx.x >= 32) __syncthreads();
  else out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
}

// Lanes of one warp at two different collectives.
__global__ void mixed_collectives_kernel(long long* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __ballot_sync(kFull, 1);
  else out[threadIdx.x] = __shfl_sync(kFull, 1, 0);
}

// A 16-byte load from an address that is only 4-byte aligned.
__global__ void misaligned_kernel(long long* out) {
  __shared__ float s[16];
  const float4 v = __ldg(reinterpret_cast<const float4*>(s + 1));
  out[threadIdx.x] = static_cast<long long>(v.x);
}

__global__ void empty_kernel(long long*) {}

// Reads one element past the end of `out` (the test allocates 5 x 256): under AddressSanitizer
// (LAG_EMU_ASAN=1) a heap-buffer-overflow report.
__global__ void out_of_bounds_kernel(long long* out) {
  if (threadIdx.x == 0) out[0] = out[5 * 256];
}

}  // namespace

extern "C" int emu_selftest(int which, long long* out) {
  switch (which) {
    case 0: collectives_kernel<<<1, 256>>>(out); break;
    case 1: barrier_kernel<<<1, 256>>>(out); break;
    case 2: shared_poison_kernel<<<1, 256>>>(out); break;
    case 3: order_kernel<<<1, 256>>>(out); break;
    case 4: deadlock_kernel<<<1, 256>>>(out); break;
    case 5: mixed_collectives_kernel<<<1, 256>>>(out); break;
    case 6: misaligned_kernel<<<1, 32>>>(out); break;
    case 7: empty_kernel<<<1, 2048>>>(out); break;  // more threads than a block may have
    case 8: empty_kernel<<<dim3(1, 70000), 32>>>(out); break;  // grid.y beyond 65535
    case 9: out_of_bounds_kernel<<<1, 32>>>(out); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

// The conversions the kernels use, for comparison with torch's: fp32 -> fp16 / bf16 (round to
// nearest even) and back.
extern "C" void emu_narrow(const float* in, long long n, uint16_t* to_half, uint16_t* to_bf16) {
  for (long long i = 0; i < n; ++i) {
    to_half[i] = __float2half_rn(in[i]).bits;
    to_bf16[i] = __float2bfloat16_rn(in[i]).bits;
  }
}
extern "C" void emu_widen(const uint16_t* in, long long n, float* from_half, float* from_bf16) {
  for (long long i = 0; i < n; ++i) {
    from_half[i] = __half2float(__half{in[i]});
    from_bf16[i] = __bfloat162float(__nv_bfloat16{in[i]});
  }
}
