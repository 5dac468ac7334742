// Arrow retrieval: a[t, n] = |P[n] . x[t]| (fp32 accumulate), fused with a streaming top-k.
//
// Kernel 1 (arrow_score_topk_kernel): block (token tile of TT tokens, split s of the adapters).
//   Each warp computes whole dot products for one adapter row at a time against the TT tokens
//   of the tile (lanes stride d_in with 16-byte loads, then a shuffle reduction), so P is read
//   once per token tile with fully coalesced loads. Scores become packed 64-bit keys
//   (ordered score << 32 | ~index: larger = better, ties -> lower index, NaN ranks like -inf)
//   in shared memory; a sub-tile of `sub` adapters with a key that beats its token's running
//   kp-th best is merged into the running top-kp of each token by a block bitonic sort of
//   [running top-kp | new keys | zero padding]; a sub-tile with none is dropped unsorted.
//   The T x N score matrix never reaches global memory.
//   The Python wrapper uses it for decode (T < 16); prefill takes kernel 3 over a cuBLAS GEMM.
// Kernel 2 (arrow_merge_kernel), only when N is split over S > 1 blocks (small T, large N, to
//   fill the GPU): one block per token merges the S partial top-k lists the same way.
// Kernel 3 (arrow_select_kernel): the top-k of precomputed fp32 scores [T, N] (a cuBLAS GEMM, as the
//   Triton backend scores), FAISS-WarpSelect style: block (token, split of N); every score becomes a
//   packed key and is compared with the running kp-th best; the few that beat it are appended to a
//   shared-memory buffer (warp-aggregated atomics); only when a round of loads might overflow the
//   buffer are it and the running top-kp sorted together (block bitonic), which tightens the
//   threshold. An optional scope mask drops disallowed adapters in the same pass. Splits go through
//   kernel 2. For prefill it replaced kernel 1 and a WMMA tensor-core variant of it, whose bitonic
//   merge per sub-tile of 64 / 128 adapters made them 5x slower than Triton's GEMM at T = 2048
//   on the H200 (bench/results/nvidia-h200-2026-11-30.md).
#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kSub = 64;     // adapters per sub-tile
constexpr int kLMax = 256;   // pow2_ceil(LAG_ARROW_MAX_K + kSub)
constexpr int kMergeL = 512; // merge buffer

struct ArrowPlan {
  int tt;      // tokens per block (1, 2, 4, 8)
  int tiles;   // token tiles
  int splits;  // S: adapter splits
  int chunk;   // adapters per split
  int kb;      // keys per (token, split) written to the workspace
  int kp;      // pow2_ceil(k)
  int sub;     // adapters per sub-tile
  int L;       // sort length in kernel 1
};

ArrowPlan plan_arrow(int64_t T, int64_t N, int64_t k, int device) {
  ArrowPlan p;
  p.tt = T >= 8 ? 8 : T >= 4 ? 4 : T >= 2 ? 2 : 1;
  const int64_t tiles = (T + p.tt - 1) / p.tt;
  p.tiles = static_cast<int>(tiles);
  const int64_t target = 2LL * sm_count(device);  // blocks wanted to fill the GPU
  const int64_t unit = kWarps;  // a split holds at least one adapter per warp
  const int64_t max_splits = (N + unit - 1) / unit;
  int64_t s = (target + tiles - 1) / tiles;
  if (s < 1) s = 1;
  if (s > max_splits) s = max_splits;
  if (s > 65535) s = 65535;
  int64_t chunk = (N + s - 1) / s;
  chunk = (chunk + unit - 1) / unit * unit;
  s = (N + chunk - 1) / chunk;
  p.splits = static_cast<int>(s);
  p.chunk = static_cast<int>(chunk);
  p.kb = static_cast<int>(k < chunk ? k : chunk);
  p.kp = pow2_ceil(k);
  p.sub = chunk < kSub ? pow2_ceil(chunk) : kSub;
  p.L = pow2_ceil(p.kp + p.sub);
  return p;
}

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

// Sorts the fresh keys of a sub-tile into each token's running top-kp (s_buf rows of kLMax: [top-kp |
// new keys | 0 padding], L = pow2_ceil(kp + sub) sorted) and clears everything after the top-kp.
__device__ __forceinline__ void merge_sub_tile(u64* s_buf, int rows, int kp, int L) {
  __syncthreads();
  block_bitonic_desc(s_buf, rows, L, kLMax);
  const int tail = L - kp;
  for (int i = threadIdx.x; i < rows * tail; i += kThreads) s_buf[(i / tail) * kLMax + kp + (i % tail)] = 0ull;
  __syncthreads();
}

// Writes the block's final lists: idx/scores when N is not split, else the split's top-kb keys to ws.
__device__ __forceinline__ void store_block_topk(const u64* s_buf, int rows, int64_t t0, int T, int N, int k, int kb,
                                                 u64* __restrict__ ws, int32_t* __restrict__ out_idx,
                                                 float* __restrict__ out_scores) {
  if (gridDim.y == 1) {
    for (int i = threadIdx.x; i < rows * k; i += kThreads) {
      const int tt = i / k, j = i - (i / k) * k;
      const int64_t t = t0 + tt;
      if (t < T) write_result(s_buf[tt * kLMax + j], N, out_idx + t * k + j, out_scores + t * k + j);
    }
  } else {
    const int S = gridDim.y;
    for (int i = threadIdx.x; i < rows * kb; i += kThreads) {
      const int tt = i / kb, j = i - (i / kb) * kb;
      const int64_t t = t0 + tt;
      if (t < T) ws[(t * S + blockIdx.y) * kb + j] = s_buf[tt * kLMax + j];
    }
  }
}

template <typename TX, int TT>
__global__ void __launch_bounds__(kThreads)
arrow_score_topk_kernel(const TX* __restrict__ x, const TX* __restrict__ P, int T, int N, int d_in,
                        int k, int kp, int chunk, int sub, int L, int kb, int vec,
                        u64* __restrict__ ws, int32_t* __restrict__ out_idx,
                        float* __restrict__ out_scores) {
  __shared__ u64 s_buf[TT * kLMax];
  __shared__ int s_improves;  // a key of this sub-tile beats its token's running kp-th best
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int n_begin = blockIdx.y * chunk;
  const int n_end = min(N, n_begin + chunk);

  for (int i = threadIdx.x; i < TT * kLMax; i += kThreads) s_buf[i] = 0ull;
  if (threadIdx.x == 0) s_improves = 0;
  __syncthreads();

  const TX* xr[TT];
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    const int64_t t = t0 + tt < T ? t0 + tt : T - 1;  // clamp: loads stay in range
    xr[tt] = x + t * d_in;
  }

  for (int base = n_begin; base < n_end; base += sub) {
    for (int loc = warp; loc < sub; loc += kWarps) {
      const int n = base + loc;
      if (n >= n_end) break;  // warp-uniform
      float acc[TT];
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) acc[tt] = 0.f;
      const TX* p = P + static_cast<int64_t>(n) * d_in;
      if (vec) {
        const int nv = d_in >> 3;
#pragma unroll(TT >= 4 ? 2 : 4)
        for (int v = lane; v < nv; v += 32) {
          float pv[8];
          load8(p + 8 * v, pv);
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) {
            float xv[8];
            load8(xr[tt] + 8 * v, xv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[tt] = fmaf(pv[e], xv[e], acc[tt]);
          }
        }
      } else {
#pragma unroll 4
        for (int i = lane; i < d_in; i += 32) {
          const float pv = to_f(p[i]);
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) acc[tt] = fmaf(pv, to_f(xr[tt][i]), acc[tt]);
        }
      }
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) acc[tt] = warp_sum(acc[tt]);
      if (lane == 0) {
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
          if (t0 + tt >= T) continue;
          const u64 key = pack_key(fabsf(acc[tt]), n);
          s_buf[tt * kLMax + kp + loc] = key;
          // the running top-kp (s_buf[tt][0, kp)) only changes in the merge below
          if (key > s_buf[tt * kLMax + kp - 1]) s_improves = 1;
        }
      }
    }
    // Sort only when some key can enter a running top-kp: once the lists settle (after a sub-tile
    // or two on i.i.d. scores), most sub-tiles are dropped after one compare per key.
    __syncthreads();
    const bool improves = s_improves != 0;  // block-uniform
    __syncthreads();                        // every thread has read the flag
    if (threadIdx.x == 0) s_improves = 0;   // before the barrier that ends this sub-tile
    if (improves) {
      merge_sub_tile(s_buf, TT, kp, L);
    } else {  // drop the sub-tile's keys (a partial next sub-tile must not see them)
      for (int i = threadIdx.x; i < TT * sub; i += kThreads) s_buf[(i / sub) * kLMax + kp + (i % sub)] = 0ull;
      __syncthreads();
    }
  }

  store_block_topk(s_buf, TT, t0, T, N, k, kb, ws, out_idx, out_scores);
}

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

// ---------------------------------------------------------------- kernel 3: select over scores
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
  if (allowed != nullptr) {  // a scope row out of [0, S) allows nothing
    const int row = scope[t];
    if (row < 0 || row >= S) n_hi = n_lo;
    else mask = allowed + row * allowed_stride;
  }
  for (int i = threadIdx.x; i < kSelL; i += kThreads) s_buf[i] = 0ull;
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  const float* row_scores = scores + t * stride;
  u64 threshold = 0ull;  // below every real key: everything passes until the first flush
  for (int r0 = n_lo; r0 < n_hi; r0 += kSelRound) {
    if (s_count > kSelCap - kSelRound) {  // block-uniform (read after the round's barrier)
      threshold = select_flush(s_buf, kp, s_count);
      if (threadIdx.x == 0) s_count = 0;
      __syncthreads();
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
    __syncthreads();
  }
  if (s_count > 0) select_flush(s_buf, kp, s_count);
  if (gridDim.y == 1) {
    for (int j = threadIdx.x; j < k; j += kThreads) write_result(s_buf[j], N, out_idx + t * k + j, out_scores + t * k + j);
  } else {
    for (int j = threadIdx.x; j < kp; j += kThreads) ws[(t * gridDim.y + blockIdx.y) * kp + j] = s_buf[j];
  }
}

template <typename TX, int TT>
void launch_score(const ArrowPlan& p, const void* x, const void* P, int T, int N, int d_in, int k,
                  int vec, u64* ws, int32_t* idx, float* scores, cudaStream_t stream) {
  dim3 grid(p.tiles, p.splits);
  arrow_score_topk_kernel<TX, TT><<<grid, kThreads, 0, stream>>>(
      static_cast<const TX*>(x), static_cast<const TX*>(P), T, N, d_in, k, p.kp, p.chunk, p.sub, p.L,
      p.kb, vec, ws, idx, scores);
}

}  // namespace
}  // namespace lag

extern "C" size_t lag_arrow_topk_workspace_bytes(int64_t T, int64_t N, int64_t k, int dtype, int device) {
  if (T <= 0 || N <= 0 || k <= 0 || k > LAG_ARROW_MAX_K) return 0;
  (void)dtype;  // every dtype takes the same plan (the argument is part of the C API)
  const lag::ArrowPlan p = lag::plan_arrow(T, N, k, device);
  if (p.splits <= 1) return 0;
  return static_cast<size_t>(T) * p.splits * p.kb * sizeof(lag::u64);
}

extern "C" int lag_arrow_topk_launch(const void* x, int x_dtype, const void* prototypes, int p_dtype,
                                     int64_t T, int64_t N, int64_t d_in, int64_t k, void* workspace,
                                     size_t workspace_bytes, int32_t* idx, float* scores, int device,
                                     void* stream_ptr) {
  using namespace lag;
  if (T == 0) return 0;
  if (N <= 0 || k <= 0 || k > N || k > LAG_ARROW_MAX_K || d_in < 0 || N > 0x7fffffffLL ||
      d_in > 0x7fffffffLL || T > 0x7fffffffLL * 1LL)
    return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const ArrowPlan p = plan_arrow(T, N, k, device);
  u64* ws = static_cast<u64*>(workspace);
  if (p.splits > 1) {
    const size_t need = static_cast<size_t>(T) * p.splits * p.kb * sizeof(u64);
    if (ws == nullptr || workspace_bytes < need) return static_cast<int>(cudaErrorInvalidValue);
  }
  const int vec = (d_in % 8 == 0 && aligned16(x) && aligned16(prototypes)) ? 1 : 0;
  const int Ti = static_cast<int>(T), Ni = static_cast<int>(N), Di = static_cast<int>(d_in), Ki = static_cast<int>(k);
  if (x_dtype != p_dtype) return static_cast<int>(cudaErrorInvalidValue);  // caller promotes
  int rc = dispatch_dtype(x_dtype, [&](auto tx) {
    typedef typename decltype(tx)::type TX;
    switch (p.tt) {
      case 1: launch_score<TX, 1>(p, x, prototypes, Ti, Ni, Di, Ki, vec, ws, idx, scores, stream); break;
      case 2: launch_score<TX, 2>(p, x, prototypes, Ti, Ni, Di, Ki, vec, ws, idx, scores, stream); break;
      case 4: launch_score<TX, 4>(p, x, prototypes, Ti, Ni, Di, Ki, vec, ws, idx, scores, stream); break;
      default: launch_score<TX, 8>(p, x, prototypes, Ti, Ni, Di, Ki, vec, ws, idx, scores, stream); break;
    }
    return 0;
  });
  if (rc != 0) return rc;
  if (p.splits > 1) {
    const int total = p.splits * p.kb;
    const int L = pow2_ceil(p.kp + total) < kMergeL ? pow2_ceil(p.kp + total) : kMergeL;
    arrow_merge_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(ws, total, Ki, p.kp, L, Ni, idx, scores);
  }
  return finish_launch();
}

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
      stride < N || (allowed != nullptr && (scope == nullptr || S <= 0 || allowed_stride < N)))
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
