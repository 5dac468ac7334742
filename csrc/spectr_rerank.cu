// SpectR rerank: for each token t and candidate slot j, z[t, j] = A*[cand[t, j]] x[t] (r values,
// fp32 accumulate) and its norm; then the top_m slots by key (the norm, or candidate_scores when
// given), ties -> lower ADAPTER index (then lower slot), NaN ranks like -inf; then the weights.
//
// Kernel 1 (rerank_z_kernel): one (token, slot) task per `wpt` warps (wpt in {1,2,4,8}, chosen so
//   small decode batches still put enough warps in flight); the task's warps split d_in, lanes
//   use 16-byte loads; rows are done 8 at a time so each x chunk is reused across 8 rows of A*.
//   Writes z_all [T, k, r] and key_all [T, k] (norms) - a few KB of scratch per token.
// Kernel 2 (rerank_select_kernel): one warp per token; m rounds of a warp arg-max over the k
//   slots (each round takes the best slot strictly worse than the previous pick), gathers z of
//   the picks, then the weights (1/m, or softmax(key / temperature) with NaN propagation as in
//   torch.softmax). Any k, any m <= k, any r. A candidate -1 (a scope left fewer than k) is never
//   picked; picks past the valid candidates get sel -1, w 0, z 0, weights over the valid picks.
#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kRows = 8;  // rows of A* per pass

template <typename TX, typename TW>
__global__ void __launch_bounds__(kThreads)
rerank_z_kernel(const TX* __restrict__ x, const TW* __restrict__ A, const int32_t* __restrict__ cand,
                int64_t tasks, int k, int N, int r, int d_in, int wpt, int vec,
                float* __restrict__ z_all, float* __restrict__ key_all) {
  __shared__ float s_part[kWarps][kRows];
  __shared__ float s_z[kWarps][kRows];
  __shared__ float s_sq[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tpb = kWarps / wpt;  // tasks per block
  const int tl = warp / wpt, slice = warp - (warp / wpt) * wpt;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * tpb + tl;
  const bool valid = task < tasks;
  const int64_t tk = valid ? task : 0;
  const int64_t t = tk / k;
  int c = cand[tk];
  c = c < 0 ? 0 : (c >= N ? N - 1 : c);  // memory safety only: candidates are in range by contract
  const TX* xr = x + t * d_in;
  const TW* Ab = A + static_cast<int64_t>(c) * r * d_in;
  if (threadIdx.x < kWarps) s_sq[threadIdx.x] = 0.f;

  for (int g = 0; g < r; g += kRows) {
    float acc[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[j] = 0.f;
    const int rows = min(kRows, r - g);
    if (valid) {
      const TW* Ag = Ab + static_cast<int64_t>(g) * d_in;
      if (vec) {
        const int nv = d_in >> 3;
#pragma unroll 2
        for (int v = slice * 32 + lane; v < nv; v += wpt * 32) {
          float xv[8];
          load8(xr + 8 * v, xv);
#pragma unroll
          for (int j = 0; j < kRows; ++j) {
            if (j < rows) {
              float av[8];
              load8(Ag + static_cast<int64_t>(j) * d_in + 8 * v, av);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[j] = fmaf(av[e], xv[e], acc[j]);
            }
          }
        }
      } else {
        for (int i = slice * 32 + lane; i < d_in; i += wpt * 32) {
          const float xv = to_f(xr[i]);
#pragma unroll
          for (int j = 0; j < kRows; ++j)
            if (j < rows) acc[j] = fmaf(to_f(Ag[static_cast<int64_t>(j) * d_in + i]), xv, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[j] = warp_sum(acc[j]);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kRows; ++j) s_part[warp][j] = acc[j];
    }
    __syncthreads();
    if (threadIdx.x < tpb * kRows) {
      const int tl2 = threadIdx.x / kRows, j = threadIdx.x % kRows;
      const int64_t task2 = static_cast<int64_t>(blockIdx.x) * tpb + tl2;
      float zv = 0.f;
      for (int s = 0; s < wpt; ++s) zv += s_part[tl2 * wpt + s][j];
      s_z[tl2][j] = zv;
      if (task2 < tasks && j < rows) z_all[task2 * r + g + j] = zv;
    }
    __syncthreads();
    if (threadIdx.x < tpb) {
      float sq = s_sq[threadIdx.x];
      for (int j = 0; j < rows; ++j) sq = fmaf(s_z[threadIdx.x][j], s_z[threadIdx.x][j], sq);
      s_sq[threadIdx.x] = sq;
    }
    // s_z / s_part are rewritten only after the next pass's first __syncthreads
  }
  __syncthreads();
  if (threadIdx.x < tpb) {
    const int64_t task2 = static_cast<int64_t>(blockIdx.x) * tpb + threadIdx.x;
    if (task2 < tasks) key_all[task2] = sqrtf(s_sq[threadIdx.x]);
  }
}

// (key, slot) a is better than b: larger packed key (score, then lower adapter), then lower slot.
__device__ __forceinline__ bool better(u64 ka, int pa, u64 kb, int pb) {
  return ka > kb || (ka == kb && pa < pb);
}

__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || isnan(b)) ? __uint_as_float(0x7fc00000u) : fmaxf(a, b);
}

__global__ void __launch_bounds__(kThreads)
rerank_select_kernel(const int32_t* __restrict__ cand, const float* __restrict__ cand_scores,
                     const float* __restrict__ key_all, const float* __restrict__ z_all, int64_t T,
                     int k, int r, int m, int uniform, float temperature,
                     int32_t* __restrict__ sel, float* __restrict__ w, float* __restrict__ z) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= T) return;  // warp-uniform; no block-level sync below
  const float* keys = cand_scores != nullptr ? cand_scores + t * k : key_all + t * k;
  const int32_t* ct = cand + t * k;
  float* wt = w + t * m;

  u64 prev_k = 0ull;
  int prev_p = -1;
  for (int i = 0; i < m; ++i) {
    u64 best_k = 0ull;   // below every real key
    int best_p = 0x7fffffff;
    for (int p = lane; p < k; p += 32) {
      if (ct[p] < 0) continue;  // -1: no candidate (a scope left fewer than k)
      const u64 kk = pack_key(keys[p], ct[p]);
      const bool eligible = i == 0 || better(prev_k, prev_p, kk, p);
      if (eligible && better(kk, p, best_k, best_p)) {
        best_k = kk;
        best_p = p;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const u64 ok = __shfl_xor_sync(kFull, best_k, o);
      const int op = __shfl_xor_sync(kFull, best_p, o);
      if (better(ok, op, best_k, best_p)) {
        best_k = ok;
        best_p = op;
      }
    }
    prev_k = best_k;
    prev_p = best_p;
    const bool found = best_k != 0ull && best_p < k;  // real keys are never 0; none left: pick i is empty
    const int bp = found ? best_p : 0;
    if (lane == 0) {
      sel[t * m + i] = found ? ct[bp] : -1;
      wt[i] = found ? keys[bp] : 0.f;  // raw key, turned into a weight below
    }
    const float* zs = z_all + (t * k + bp) * r;
    float* zd = z + (t * m + i) * r;
    for (int c = lane; c < r; c += 32) zd[c] = found ? zs[c] : 0.f;
  }
  __syncwarp();

  // Weights over the picks that found a candidate (all of them unless a scope left fewer); others 0.
  const int32_t* st = sel + t * m;
  float valid = 0.f;
  for (int i = lane; i < m; i += 32) valid += st[i] >= 0 ? 1.f : 0.f;
  valid = warp_sum(valid);
  if (m == 1 || uniform) {
    for (int i = lane; i < m; i += 32) wt[i] = st[i] >= 0 ? 1.f / valid : 0.f;
    return;
  }
  // softmax(key / temperature) as torch computes it: exp(v - max(v)) / sum; NaN propagates.
  float mx = -INFINITY;
  for (int i = lane; i < m; i += 32)
    if (st[i] >= 0) mx = nan_max(mx, wt[i] / temperature);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = nan_max(mx, __shfl_xor_sync(kFull, mx, o));
  float sum = 0.f;
  for (int i = lane; i < m; i += 32)
    if (st[i] >= 0) sum += expf(wt[i] / temperature - mx);
  sum = warp_sum(sum);
  __syncwarp();
  for (int i = lane; i < m; i += 32) wt[i] = st[i] >= 0 ? expf(wt[i] / temperature - mx) / sum : 0.f;
}

template <typename TX, typename TW>
void launch_z(const void* x, const void* A, const int32_t* cand, int64_t tasks, int k, int N, int r,
              int d_in, int wpt, int vec, float* z_all, float* key_all, cudaStream_t stream) {
  const int tpb = kWarps / wpt;
  const int64_t blocks = (tasks + tpb - 1) / tpb;
  rerank_z_kernel<TX, TW><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const TX*>(x), static_cast<const TW*>(A), cand, tasks, k, N, r, d_in, wpt, vec, z_all,
      key_all);
}

}  // namespace
}  // namespace lag

extern "C" int lag_spectr_rerank_launch(const void* x, int x_dtype, const void* a_star, int a_dtype,
                                        const int32_t* candidates, const float* candidate_scores,
                                        int64_t T, int64_t N, int64_t r, int64_t d_in, int64_t k,
                                        int64_t m, int combine_uniform, float temperature,
                                        float* z_all, float* key_all,
                                        int32_t* sel, float* w, float* z, int device, void* stream_ptr) {
  using namespace lag;
  if (T == 0) return 0;
  if (N <= 0 || k <= 0 || m <= 0 || m > k || r < 0 || d_in < 0 || N > 0x7fffffffLL ||
      k > 0x7fffffffLL || r > 0x7fffffffLL || d_in > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t tasks = T * k;
  if ((tasks + kWarps - 1) / kWarps > 0x7fffffffLL || (T + kWarps - 1) / kWarps > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int vec = (d_in % 8 == 0 && aligned16(x) && aligned16(a_star)) ? 1 : 0;
  // warps per task: enough warps in flight for small batches, at least one 8-wide chunk per lane
  const int64_t target_warps = 16LL * sm_count(device);
  const int64_t lane_chunks = (d_in + 7) / 8;
  int wpt = 1;
  while (wpt < kWarps && tasks * wpt * 2 <= target_warps && static_cast<int64_t>(wpt) * 2 * 32 <= lane_chunks) wpt *= 2;
  const int Ki = static_cast<int>(k), Ni = static_cast<int>(N), Ri = static_cast<int>(r), Di = static_cast<int>(d_in);
  int rc = dispatch_dtype(x_dtype, [&](auto tx) {
    typedef typename decltype(tx)::type TX;
    return dispatch_dtype(a_dtype, [&](auto tw) {
      typedef typename decltype(tw)::type TW;
      launch_z<TX, TW>(x, a_star, candidates, tasks, Ki, Ni, Ri, Di, wpt, vec, z_all, key_all, stream);
      return 0;
    });
  });
  if (rc != 0) return rc;
  const int64_t blocks = (T + kWarps - 1) / kWarps;
  rerank_select_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      candidates, candidate_scores, key_all, z_all, T, Ki, Ri, static_cast<int>(m), combine_uniform,
      temperature, sel, w, z);
  return finish_launch();
}
