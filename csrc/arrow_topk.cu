// Arrow retrieval's top-k: the scores a[t, n] = |P[n] . x[t]| come from one cuBLAS GEMM with fp32 output
// (the Python wrapper: common.prototype_scores, as the Triton backend scores); these kernels select.
//
// Kernel 1 (arrow_select_kernel), FAISS-WarpSelect style: block (token, split of N); every score
//   becomes a packed key (ordered score << 32 | ~index: larger = better, ties -> lower index, NaN
//   ranks like -inf) and is compared with the running kp-th best; the few that beat it are appended
//   to a shared-memory buffer (warp-aggregated atomics); only when a round of loads might overflow
//   the buffer are it and the running top-kp sorted together (block bitonic), which tightens the
//   threshold. An optional scope mask drops disallowed adapters in the same pass. Small T splits N
//   over blocks so that the whole GPU streams the scores.
// Kernel 2 (arrow_merge_kernel), only when N is split over S > 1 blocks: one block per token merges
//   the S partial top-kp lists.
// The select replaced, at every T, kernels that scored and ranked in one pass and never wrote the
// scores: a CUDA-core one (decode) and a WMMA tensor-core one (prefill), whose bitonic merge per
// sub-tile of 64 / 128 adapters made them 5x slower than Triton's GEMM at T = 2048, and the
// CUDA-core one 1.5-2.3x slower than plain torch.mm + torch.topk at T = 1 (N = 1k-100k), on the
// H200 (bench/results/nvidia-h200-2026-11-30.md). At decode the scores are T*N*4 bytes, beside
// the N*d_in*2 of P that any scoring reads.
#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kMergeL = 512;  // merge buffer

// Writes one output slot from a packed key (0: an empty slot).
__device__ __forceinline__ void write_result(u64 key, int N, int32_t* idx, float* score) {
  if (key == 0ull) {  // an empty slot: fewer than k candidates (a scope), -1 / NaN
    *idx = -1;
    *score = __uint_as_float(0x7fc00000u);
    return;
  }
  int32_t i = key_index(key);
  if (i < 0 || i >= N) i = 0;  // only padding could decode out of range; never happens for k <= N
  const uint32_t hi = static_cast<uint32_t>(key >> 32);
  // Arrow scores are |.| >= 0 or NaN, so the -inf rank key can only come from a NaN score.
  *idx = i;
  *score = hi <= kOrderedNegInf ? __uint_as_float(0x7fc00000u) : ordered_key_to_float(hi);
}

// ---------------------------------------------------------------- kernel 1: select over scores
constexpr int kSelRound = 4 * kThreads;  // scores loaded per round (4 per thread, coalesced)
constexpr int kSelCap = 2048;            // buffered survivors
constexpr int kSelL = 4096;              // pow2_ceil(LAG_ARROW_MAX_K + kSelCap): [top-kp | new keys | 0]
static_assert(LAG_ARROW_MAX_K + kSelCap <= kSelL, "select buffer too small");
static_assert(kSelCap >= kSelRound, "a round's survivors must fit in the buffer");

struct SelectPlan {
  int kp;      // pow2_ceil(k)
  int splits;  // S: blocks per token over N
  int chunk;   // columns per split (a multiple of kSelRound)
};

SelectPlan plan_select(int64_t T, int64_t N, int64_t k, int device) {
  SelectPlan p;
  p.kp = pow2_ceil(static_cast<int>(k));
  const int64_t rounds = (N + kSelRound - 1) / kSelRound;
  int64_t want = (2LL * sm_count(device) + T - 1) / T;  // ~2 blocks per SM in all
  const int64_t most = rounds / 4 > 1 ? rounds / 4 : 1;  // >= 4 rounds per split
  if (want > most) want = most;
  if (want < 1) want = 1;
  const int64_t per = (rounds + want - 1) / want;
  p.chunk = static_cast<int>(per * kSelRound);
  p.splits = static_cast<int>((N + p.chunk - 1) / p.chunk);
  return p;
}

// Sorts [top-kp | count new keys | 0 ...] and keeps the top-kp; returns the new threshold key.
__device__ __forceinline__ u64 select_flush(u64* s_buf, int kp, int count) {
  __syncthreads();
  int L = 2;
  while (L < kp + count) L <<= 1;
  block_bitonic_desc(s_buf, 1, L, L);
  for (int i = kp + threadIdx.x; i < L; i += kThreads) s_buf[i] = 0ull;
  __syncthreads();
  return s_buf[kp - 1];
}

__global__ void __launch_bounds__(kThreads)
arrow_select_kernel(const float* __restrict__ scores, int64_t stride, int N, int k, int kp, int chunk,
                    const uint8_t* __restrict__ allowed, const int32_t* __restrict__ scope, int S,
                    int64_t allowed_stride, u64* __restrict__ ws, int32_t* __restrict__ out_idx,
                    float* __restrict__ out_scores) {
  __shared__ u64 s_buf[kSelL];
  __shared__ int s_count;
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  int n_lo = blockIdx.y * chunk;
  int n_hi = n_lo + chunk < N ? n_lo + chunk : N;
  const uint8_t* mask = nullptr;
  if (scope != nullptr) {  // scoped (allowed may be null when S = 0); a row out of [0, S) allows nothing
    const int row = scope[t];
    if (row < 0 || row >= S) n_hi = n_lo;
    else mask = allowed + row * allowed_stride;
  }
  for (int i = threadIdx.x; i < kSelL; i += kThreads) s_buf[i] = 0ull;
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  const float* row_scores = scores + t * stride;
  u64 threshold = 0ull;  // below every real key: everything passes until the first flush
  int count = 0;         // keys buffered, as every thread read it between two barriers (block-uniform)
  for (int r0 = n_lo; r0 < n_hi; r0 += kSelRound) {
    if (count > kSelCap - kSelRound) {
      threshold = select_flush(s_buf, kp, count);
      if (threadIdx.x == 0) s_count = 0;
      __syncthreads();
      count = 0;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = r0 + j * kThreads + threadIdx.x;
      u64 key = 0ull;
      if (n < n_hi && (mask == nullptr || mask[n] != 0)) key = pack_key(fabsf(__ldg(row_scores + n)), n);
      const bool keep = key > threshold;
      const unsigned votes = __ballot_sync(kFull, keep);
      int base = 0;
      if (lane == 0 && votes != 0u) base = atomicAdd(&s_count, __popc(votes));
      base = __shfl_sync(kFull, base, 0);
      if (keep) s_buf[kp + base + __popc(votes & below)] = key;
    }
    // The count must be read between two barriers: after the round's appends, and before any warp
    // appends again (a warp that ran ahead into the next round would change it under a slower one,
    // and the block would disagree on whether to flush: mismatched barriers).
    __syncthreads();
    count = s_count;
    __syncthreads();
  }
  if (count > 0) select_flush(s_buf, kp, count);
  if (gridDim.y == 1) {
    for (int j = threadIdx.x; j < k; j += kThreads) write_result(s_buf[j], N, out_idx + t * k + j, out_scores + t * k + j);
  } else {
    for (int j = threadIdx.x; j < kp; j += kThreads) ws[(t * gridDim.y + blockIdx.y) * kp + j] = s_buf[j];
  }
}

// ---------------------------------------------------------------- kernel 2: merge of N splits
__global__ void __launch_bounds__(kThreads)
arrow_merge_kernel(const u64* __restrict__ ws, int total, int k, int kp, int L, int N,
                   int32_t* __restrict__ out_idx, float* __restrict__ out_scores) {
  __shared__ u64 s_buf[kMergeL];
  const int64_t t = blockIdx.x;
  const u64* src = ws + t * total;
  const int batch = L - kp;
  for (int i = threadIdx.x; i < kp; i += kThreads) s_buf[i] = 0ull;
  for (int b0 = 0; b0 < total; b0 += batch) {
    for (int i = kp + threadIdx.x; i < L; i += kThreads) {
      const int j = b0 + i - kp;
      s_buf[i] = j < total ? src[j] : 0ull;
    }
    __syncthreads();
    block_bitonic_desc(s_buf, 1, L, L);
  }
  for (int j = threadIdx.x; j < k; j += kThreads) write_result(s_buf[j], N, out_idx + t * k + j, out_scores + t * k + j);
}

}  // namespace
}  // namespace lag

extern "C" size_t lag_arrow_select_workspace_bytes(int64_t T, int64_t N, int64_t k, int device) {
  if (T <= 0 || N <= 0 || k <= 0 || k > LAG_ARROW_MAX_K) return 0;
  const lag::SelectPlan p = lag::plan_select(T, N, k, device);
  return p.splits <= 1 ? 0 : static_cast<size_t>(T) * p.splits * p.kp * sizeof(lag::u64);
}

extern "C" int lag_arrow_select_launch(const float* scores, int64_t T, int64_t N, int64_t stride, int64_t k,
                                       const uint8_t* allowed, const int32_t* scope, int64_t S,
                                       int64_t allowed_stride, void* workspace, size_t workspace_bytes,
                                       int32_t* idx, float* out_scores, int device, void* stream_ptr) {
  using namespace lag;
  if (T == 0) return 0;
  if (N <= 0 || k <= 0 || k > N || k > LAG_ARROW_MAX_K || N > 0x7fffffffLL || T > 0x7fffffffLL ||
      stride < N || (allowed != nullptr && scope == nullptr) ||
      (scope != nullptr && (S < 0 || (S > 0 && (allowed == nullptr || allowed_stride < N)))))
    return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const SelectPlan p = plan_select(T, N, k, device);
  u64* ws = static_cast<u64*>(workspace);
  if (p.splits > 1 && (ws == nullptr || workspace_bytes < static_cast<size_t>(T) * p.splits * p.kp * sizeof(u64)))
    return static_cast<int>(cudaErrorInvalidValue);
  const int Ni = static_cast<int>(N), Ki = static_cast<int>(k);
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(p.splits));
  arrow_select_kernel<<<grid, kThreads, 0, stream>>>(scores, stride, Ni, Ki, p.kp, p.chunk, allowed, scope,
                                                     static_cast<int>(S), allowed_stride, ws, idx, out_scores);
  if (p.splits > 1) {
    const int total = p.splits * p.kp;
    const int L = pow2_ceil(p.kp + total) < kMergeL ? pow2_ceil(p.kp + total) : kMergeL;
    arrow_merge_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(ws, total, Ki, p.kp, L, Ni, idx,
                                                                          out_scores);
  }
  return finish_launch();
}

extern "C" const char* lag_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
