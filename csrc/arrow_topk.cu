// Arrow retrieval: a[t, n] = |P[n] . x[t]| (fp32 accumulate), fused with a streaming top-k.
//
// Kernel 1 (arrow_score_topk_kernel): block (token tile of TT tokens, split s of the adapters).
//   Each warp computes whole dot products for one adapter row at a time against the TT tokens
//   of the tile (lanes stride d_in with 16-byte loads, then a shuffle reduction), so P is read
//   once per token tile with fully coalesced loads. Scores become packed 64-bit keys
//   (ordered score << 32 | ~index: larger = better, ties -> lower index, NaN ranks like -inf)
//   in shared memory; every sub-tile of `sub` adapters is merged into the running top-kp of
//   each token by a block bitonic sort of [running top-kp | new keys | zero padding].
//   The T x N score matrix never reaches global memory.
// Kernel 1' (arrow_score_topk_wmma_kernel), fp16/bf16 with T >= 16 on sm_80+ (prefill): the same
//   block structure on tensor cores. A block scores 16 tokens against sub-tiles of 128 adapters
//   (one 16 x 16 WMMA accumulator per warp, fp32), staging [16 | 128] x 32 slices of x and P in
//   shared memory (zero-filled beyond T, N and d_in: any shape; several blocks per SM hide the
//   load latency). The fp32 score tile then feeds the same key packing and bitonic merge as
//   kernel 1. The CUDA-core kernel 1 reads P once per 8 tokens with FMAs;
//   at T = 2048 it was 7-26x slower than the Triton tl.dot kernel on the H100.
// Kernel 2 (arrow_merge_kernel), only when N is split over S > 1 blocks (small T, large N, to
//   fill the GPU): one block per token merges the S partial top-k lists the same way.
#include <mma.h>

#include <type_traits>

#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kSub = 64;     // adapters per sub-tile
constexpr int kLMax = 256;   // pow2_ceil(LAG_ARROW_MAX_K + kSub), also of LAG_ARROW_MAX_K + kWmmaSub
constexpr int kMergeL = 512; // merge buffer

// Tensor-core path (kernel 1')
constexpr int kWmmaTokens = 16;                  // tokens per block: the WMMA M dimension
constexpr int kWmmaSub = 16 * kWarps;            // adapters per sub-tile: 16 per warp
constexpr int kWmmaK = 32;                       // d_in per staged slice (two 16-deep MMA steps)
constexpr int kWmmaLd = kWmmaK + 8;              // staged row pitch in elements (16-byte multiple)
constexpr int kScoreLd = kWmmaSub + 4;           // fp32 score tile row pitch
constexpr int kStageBytes = (kWmmaTokens + kWmmaSub) * kWmmaLd * 2 > kWmmaTokens * kScoreLd * 4
                                ? (kWmmaTokens + kWmmaSub) * kWmmaLd * 2
                                : kWmmaTokens * kScoreLd * 4;
static_assert(LAG_ARROW_MAX_K + kWmmaSub <= kLMax, "sort buffer too small for the WMMA sub-tile");

// fp16/bf16, enough tokens for a 16-row tile, and a GPU with bf16 tensor cores (sm_80+).
inline bool use_wmma(int64_t T, int dtype, int device) {
  return T >= kWmmaTokens && (dtype == LAG_DTYPE_F16 || dtype == LAG_DTYPE_BF16) && cc_major(device) >= 8;
}

struct ArrowPlan {
  bool wmma;   // kernel 1' (tensor cores) instead of kernel 1
  int tt;      // tokens per block (1, 2, 4, 8; kWmmaTokens with wmma)
  int tiles;   // token tiles
  int splits;  // S: adapter splits
  int chunk;   // adapters per split
  int kb;      // keys per (token, split) written to the workspace
  int kp;      // pow2_ceil(k)
  int sub;     // adapters per sub-tile
  int L;       // sort length in kernel 1
};

ArrowPlan plan_arrow(int64_t T, int64_t N, int64_t k, int dtype, int device) {
  ArrowPlan p;
  p.wmma = use_wmma(T, dtype, device);
  p.tt = p.wmma ? kWmmaTokens : T >= 8 ? 8 : T >= 4 ? 4 : T >= 2 ? 2 : 1;
  const int64_t tiles = (T + p.tt - 1) / p.tt;
  p.tiles = static_cast<int>(tiles);
  const int64_t target = 2LL * sm_count(device);  // blocks wanted to fill the GPU
  const int64_t unit = p.wmma ? kWmmaSub : kWarps;  // a split holds at least one sub-tile / one adapter per warp
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
  p.sub = p.wmma ? kWmmaSub : chunk < kSub ? pow2_ceil(chunk) : kSub;
  p.L = pow2_ceil(p.kp + p.sub);
  return p;
}

__device__ __forceinline__ void write_result(u64 key, int N, int32_t* idx, float* score) {
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

// Copies rows [row0, row0 + rows) x columns [d0, d0 + kWmmaK) of src ([*, d_in], rows < row_limit valid)
// into dst [rows][kWmmaLd], zero outside. vec: d_in % 8 == 0 and 16-byte aligned src (uint4 loads).
template <typename TX>
__device__ __forceinline__ void stage_slice(TX* dst, const TX* __restrict__ src, int rows, int64_t row0,
                                            int64_t row_limit, int d0, int d_in, int vec) {
  if (vec) {
    for (int i = threadIdx.x; i < rows * (kWmmaK / 8); i += kThreads) {
      const int r = i / (kWmmaK / 8), c = (i % (kWmmaK / 8)) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < row_limit && d0 + c < d_in) v = __ldg(reinterpret_cast<const uint4*>(src + (row0 + r) * d_in + d0 + c));
      *reinterpret_cast<uint4*>(dst + r * kWmmaLd + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < rows * kWmmaK; i += kThreads) {
      const int r = i / kWmmaK, c = i % kWmmaK;
      dst[r * kWmmaLd + c] = (row0 + r < row_limit && d0 + c < d_in) ? src[(row0 + r) * d_in + d0 + c] : from_f<TX>(0.f);
    }
  }
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
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int n_begin = blockIdx.y * chunk;
  const int n_end = min(N, n_begin + chunk);

  for (int i = threadIdx.x; i < TT * kLMax; i += kThreads) s_buf[i] = 0ull;
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
        for (int tt = 0; tt < TT; ++tt)
          if (t0 + tt < T) s_buf[tt * kLMax + kp + loc] = pack_key(fabsf(acc[tt]), n);
      }
    }
    merge_sub_tile(s_buf, TT, kp, L);
  }

  store_block_topk(s_buf, TT, t0, T, N, k, kb, ws, out_idx, out_scores);
}

template <typename TX>
__global__ void __launch_bounds__(kThreads)
arrow_score_topk_wmma_kernel(const TX* __restrict__ x, const TX* __restrict__ P, int T, int N, int d_in,
                             int k, int kp, int chunk, int L, int kb, int vec, u64* __restrict__ ws,
                             int32_t* __restrict__ out_idx, float* __restrict__ out_scores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ u64 s_buf[kWmmaTokens * kLMax];
  __shared__ __align__(128) unsigned char s_stage[kStageBytes];
  TX* xs = reinterpret_cast<TX*>(s_stage);    // [kWmmaTokens][kWmmaLd] slice of x
  TX* ps = xs + kWmmaTokens * kWmmaLd;         // [kWmmaSub][kWmmaLd] slice of P (= P^T, column-major)
  float* ss = reinterpret_cast<float*>(s_stage);  // [kWmmaTokens][kScoreLd] scores, after the d loop
  const int warp = threadIdx.x >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kWmmaTokens;
  const int n_begin = blockIdx.y * chunk;
  const int n_end = min(N, n_begin + chunk);

  for (int i = threadIdx.x; i < kWmmaTokens * kLMax; i += kThreads) s_buf[i] = 0ull;

  for (int base = n_begin; base < n_end; base += kWmmaSub) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int d0 = 0; d0 < d_in; d0 += kWmmaK) {
      __syncthreads();  // the previous slice (or score tile) is no longer read
      stage_slice(xs, x, kWmmaTokens, t0, T, d0, d_in, vec);
      stage_slice(ps, P, kWmmaSub, base, n_end, d0, d_in, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kWmmaK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TX, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TX, wmma::col_major> b;
        wmma::load_matrix_sync(a, xs + kk, kWmmaLd);
        wmma::load_matrix_sync(b, ps + warp * 16 * kWmmaLd + kk, kWmmaLd);
        wmma::mma_sync(acc, a, b, acc);
      }
    }
    __syncthreads();  // the last slice is read: the score tile reuses its memory
    wmma::store_matrix_sync(ss + warp * 16, acc, kScoreLd, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kWmmaTokens * kWmmaSub; i += kThreads) {
      const int tt = i / kWmmaSub, loc = i - tt * kWmmaSub;
      const int n = base + loc;
      s_buf[tt * kLMax + kp + loc] =
          (n < n_end && t0 + tt < T) ? pack_key(fabsf(ss[tt * kScoreLd + loc]), n) : 0ull;
    }
    merge_sub_tile(s_buf, kWmmaTokens, kp, L);
  }
  store_block_topk(s_buf, kWmmaTokens, t0, T, N, k, kb, ws, out_idx, out_scores);
#endif
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

template <typename TX, int TT>
void launch_score(const ArrowPlan& p, const void* x, const void* P, int T, int N, int d_in, int k,
                  int vec, u64* ws, int32_t* idx, float* scores, cudaStream_t stream) {
  dim3 grid(p.tiles, p.splits);
  arrow_score_topk_kernel<TX, TT><<<grid, kThreads, 0, stream>>>(
      static_cast<const TX*>(x), static_cast<const TX*>(P), T, N, d_in, k, p.kp, p.chunk, p.sub, p.L,
      p.kb, vec, ws, idx, scores);
}

template <typename TX>
void launch_score_wmma(const ArrowPlan& p, const void* x, const void* P, int T, int N, int d_in, int k, int vec,
                       u64* ws, int32_t* idx, float* scores, cudaStream_t stream) {
  dim3 grid(p.tiles, p.splits);
  arrow_score_topk_wmma_kernel<TX><<<grid, kThreads, 0, stream>>>(
      static_cast<const TX*>(x), static_cast<const TX*>(P), T, N, d_in, k, p.kp, p.chunk, p.L, p.kb, vec, ws, idx,
      scores);
}

}  // namespace
}  // namespace lag

extern "C" size_t lag_arrow_topk_workspace_bytes(int64_t T, int64_t N, int64_t k, int dtype, int device) {
  if (T <= 0 || N <= 0 || k <= 0 || k > LAG_ARROW_MAX_K) return 0;
  const lag::ArrowPlan p = lag::plan_arrow(T, N, k, dtype, device);
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
  const ArrowPlan p = plan_arrow(T, N, k, x_dtype, device);
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
    if constexpr (!std::is_same<TX, float>::value) {
      if (p.wmma) {
        launch_score_wmma<TX>(p, x, prototypes, Ti, Ni, Di, Ki, vec, ws, idx, scores, stream);
        return 0;
      }
    }
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

extern "C" const char* lag_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
