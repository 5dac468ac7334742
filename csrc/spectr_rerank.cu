// SpectR rerank: for each token t and candidate slot j, z[t, j] = A*[cand[t, j]] x[t] (r values,
// fp32 accumulate) and its norm; then the top_m slots by key (the norm, or candidate_scores when
// given), ties -> lower ADAPTER index (then lower slot), NaN ranks like -inf; then the weights.
//
// Kernel 1 (rerank_z_kernel): one (token, slot) task per `wpt` warps (wpt in {1,2,4,8}, chosen so
//   small decode batches still put enough warps in flight); the task's warps split d_in, lanes
//   use 16-byte loads; rows are done 8 at a time so each x chunk is reused across 8 rows of A*.
//   Writes z_all [T, k, r] and key_all [T, k] (norms) - a few KB of scratch per token.
// Grouped path, for many tokens sharing adapters (T >= 64 and T*k >= N, as the Triton backend's):
//   kernel 1 reads each pair's A* rows, T*k*r*d_in elements, which at T = 2048 far exceeds L2
//   (0.717 ms at N = 1000, 8192 -> 3072 on the H200, 2.4x Triton's adapter-grouped rerank). Instead
//   the (token, slot) pairs are grouped by adapter on the device, a counting sort with no host
//   sync: group_count_kernel (histogram, atomics), group_scan_kernel (one block, exclusive scan in
//   place), group_scatter_kernel (each pair to its adapter's segment); then rerank_grouped_z_kernel
//   takes kTileP grouped pairs per block and, for each run of one adapter in its tile, stages
//   kRows x kChunk of that adapter's A* in shared memory once for all the run's pairs (each warp
//   computes up to kTileP / kWarps pairs; x rows come from L2). It writes the same z_all / key_all.
// Kernel 2 (rerank_select_kernel): one warp per token; m rounds of a warp arg-max over the k
//   slots (each round takes the best slot strictly worse than the previous pick), gathers z of
//   the picks, then the weights (1/m, or softmax(key / temperature) with NaN propagation as in
//   torch.softmax). Any k, any m <= k, any r. A candidate -1 (a scope left fewer than k) is never
//   picked; picks past the valid candidates get sel -1, w 0, z 0, weights over the valid picks.
#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kRows = 8;  // rows of A* per pass

template <typename TE>
__global__ void __launch_bounds__(kThreads)
rerank_z_kernel(const TE* __restrict__ x, const TE* __restrict__ A, const int32_t* __restrict__ cand,
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
  const TE* xr = x + t * d_in;
  const TE* Ab = A + static_cast<int64_t>(c) * r * d_in;
  if (threadIdx.x < kWarps) s_sq[threadIdx.x] = 0.f;

  for (int g = 0; g < r; g += kRows) {
    float acc[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[j] = 0.f;
    const int rows = min(kRows, r - g);
    if (valid) {
      const TE* Ag = Ab + static_cast<int64_t>(g) * d_in;
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

// ---------------------------------------------------------------- grouped path (prefill)
constexpr int kTileP = 32;                      // grouped pairs per block
constexpr int kPairsPerWarp = kTileP / kWarps;  // pairs each warp computes per run
constexpr int kChunk = 256;                     // d_in per staged A* chunk: 8 columns per lane
constexpr int kScanThreads = 1024;
constexpr int kScanItems = 16;  // counts per thread per round of the one-block scan

bool use_grouped(int64_t T, int64_t N, int64_t k) {
  const int64_t P = T * k;
  return T >= 64 && P >= N && P < (1LL << 30) && N < (1LL << 30);  // int32 pair ids and loop counters
}

// A pair's bucket of the counting sort: its adapter, or N for none (-1, or out of range).
__device__ __forceinline__ int adapter_bucket(int c, int N) { return (c >= 0 && c < N) ? c : N; }

// counts[bucket] += 1 for each pair.
__global__ void __launch_bounds__(kThreads)
group_count_kernel(const int32_t* __restrict__ cand, int P, int N, int32_t* __restrict__ counts) {
  for (int p = blockIdx.x * kThreads + threadIdx.x; p < P; p += gridDim.x * kThreads)
    atomicAdd(counts + adapter_bucket(cand[p], N), 1);
}

// counts[0, n) -> their exclusive prefix sums, in place (each thread reads, then writes, its own
// kScanItems entries of a round). One block: ~n / 16K rounds, a few microseconds at n = 100k.
__global__ void __launch_bounds__(kScanThreads) group_scan_kernel(int32_t* __restrict__ counts, int n) {
  __shared__ int s_warp[kScanThreads / 32];
  __shared__ int s_carry;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) s_carry = 0;
  for (int base = 0; base < n; base += kScanThreads * kScanItems) {
    const int first = base + threadIdx.x * kScanItems;
    int v[kScanItems];
    int total = 0;
#pragma unroll
    for (int e = 0; e < kScanItems; ++e) {
      v[e] = first + e < n ? counts[first + e] : 0;
      total += v[e];
    }
    int incl = total;  // inclusive scan of the thread totals within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += u;
    }
    __syncthreads();  // s_carry of the previous round is written; s_warp is free
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the 32 warp totals
      const int wt = s_warp[lane];
      int wi = wt;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(kFull, wi, o);
        if (lane >= o) wi += u;
      }
      s_warp[lane] = wi - wt;
    }
    __syncthreads();
    int run = s_carry + s_warp[warp] + incl - total;  // the prefix before this thread's first entry
#pragma unroll
    for (int e = 0; e < kScanItems; ++e) {
      if (first + e < n) counts[first + e] = run;
      run += v[e];
    }
    __syncthreads();  // every thread has read s_carry and s_warp
    if (threadIdx.x == kScanThreads - 1) s_carry = run;  // the total through this round
  }
}

// grouped[cursor[a]++] = p for each pair p of adapter a: every adapter's pairs contiguous, adapters
// ascending, pairs without one last. The order inside a segment follows the atomics.
__global__ void __launch_bounds__(kThreads)
group_scatter_kernel(const int32_t* __restrict__ cand, int P, int N, int32_t* __restrict__ cursor,
                     int32_t* __restrict__ grouped) {
  for (int p = blockIdx.x * kThreads + threadIdx.x; p < P; p += gridDim.x * kThreads)
    grouped[atomicAdd(cursor + adapter_bucket(cand[p], N), 1)] = p;
}

// z_all[p] = A*[cand[p]] x[p / k] and key_all[p] = ||z_all[p]|| for the kTileP grouped pairs of this
// block: per run of one adapter, per group of kRows rank rows, per chunk of kChunk columns, the
// block stages the chunk of A* (as fp32) once and every warp multiplies it with its pairs' x.
// Lane l holds columns l + 32 e (e < 8) of a chunk: conflict-free shared-memory reads, and the
// warp's x loads cover contiguous 64-byte runs.
template <typename TE>
__global__ void __launch_bounds__(kThreads)
rerank_grouped_z_kernel(const TE* __restrict__ x, const TE* __restrict__ A, const int32_t* __restrict__ cand,
                        const int32_t* __restrict__ grouped, int P, int k, int N, int r, int d_in,
                        float* __restrict__ z_all, float* __restrict__ key_all) {
  __shared__ float s_a[kRows][kChunk];
  __shared__ int s_pair[kTileP];
  __shared__ int s_ad[kTileP];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x < kTileP) {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * kTileP + threadIdx.x;
    const int p = slot < P ? grouped[slot] : -1;
    const int c = p >= 0 ? cand[p] : -1;
    s_pair[threadIdx.x] = p;
    s_ad[threadIdx.x] = (c >= 0 && c < N) ? c : -1;  // -1: no adapter (grouped last), nothing to compute
  }
  __syncthreads();
  for (int s = 0; s < kTileP;) {  // runs of one adapter (block-uniform: every thread reads the same list)
    const int a = s_ad[s];
    int e = s + 1;
    while (e < kTileP && s_ad[e] == a) ++e;
    if (a >= 0) {
      const TE* Aa = A + static_cast<int64_t>(a) * r * d_in;
      const TE* xr[kPairsPerWarp];
      bool mine[kPairsPerWarp];
#pragma unroll
      for (int q = 0; q < kPairsPerWarp; ++q) {
        const int ls = s + warp + q * kWarps;
        mine[q] = ls < e;
        xr[q] = x + static_cast<int64_t>(mine[q] ? s_pair[ls] / k : 0) * d_in;
      }
      float sq[kPairsPerWarp];
#pragma unroll
      for (int q = 0; q < kPairsPerWarp; ++q) sq[q] = 0.f;
      for (int g = 0; g < r; g += kRows) {
        const int rows = min(kRows, r - g);
        float acc[kPairsPerWarp][kRows];
#pragma unroll
        for (int q = 0; q < kPairsPerWarp; ++q)
#pragma unroll
          for (int j = 0; j < kRows; ++j) acc[q][j] = 0.f;
        for (int d0 = 0; d0 < d_in; d0 += kChunk) {
          __syncthreads();  // the previous chunk's readers are done
          for (int i = threadIdx.x; i < kRows * kChunk; i += kThreads) {
            const int j = i / kChunk, col = d0 + i % kChunk;
            s_a[j][i % kChunk] = (j < rows && col < d_in) ? to_f(Aa[static_cast<int64_t>(g + j) * d_in + col]) : 0.f;
          }
          __syncthreads();
          float xv[kPairsPerWarp][8];
#pragma unroll
          for (int q = 0; q < kPairsPerWarp; ++q)
#pragma unroll
            for (int e2 = 0; e2 < 8; ++e2) {
              const int col = d0 + lane + 32 * e2;
              xv[q][e2] = (mine[q] && col < d_in) ? to_f(xr[q][col]) : 0.f;
            }
#pragma unroll
          for (int j = 0; j < kRows; ++j)
#pragma unroll
            for (int e2 = 0; e2 < 8; ++e2) {
              const float av = s_a[j][lane + 32 * e2];
#pragma unroll
              for (int q = 0; q < kPairsPerWarp; ++q) acc[q][j] = fmaf(av, xv[q][e2], acc[q][j]);
            }
        }
#pragma unroll
        for (int q = 0; q < kPairsPerWarp; ++q) {
#pragma unroll
          for (int j = 0; j < kRows; ++j) {
            const float zv = warp_sum(acc[q][j]);
            if (mine[q] && j < rows) {
              if (lane == 0) z_all[static_cast<int64_t>(s_pair[s + warp + q * kWarps]) * r + g + j] = zv;
              sq[q] = fmaf(zv, zv, sq[q]);
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kPairsPerWarp; ++q)
        if (mine[q] && lane == 0) key_all[s_pair[s + warp + q * kWarps]] = sqrtf(sq[q]);
    }
    s = e;
  }
}

template <typename TE>
int launch_grouped_z(const void* x, const void* A, const int32_t* cand, int P, int k, int N, int r, int d_in,
                     int32_t* counts, int32_t* grouped, float* z_all, float* key_all, cudaStream_t stream) {
  const int blocks = (P + kThreads - 1) / kThreads < 65535 ? (P + kThreads - 1) / kThreads : 65535;
  const cudaError_t rc = cudaMemsetAsync(counts, 0, sizeof(int32_t) * (static_cast<size_t>(N) + 1), stream);
  if (rc != cudaSuccess) return static_cast<int>(rc);
  group_count_kernel<<<blocks, kThreads, 0, stream>>>(cand, P, N, counts);
  group_scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, N + 1);
  group_scatter_kernel<<<blocks, kThreads, 0, stream>>>(cand, P, N, counts, grouped);
  const int64_t tiles = (static_cast<int64_t>(P) + kTileP - 1) / kTileP;
  rerank_grouped_z_kernel<TE><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      static_cast<const TE*>(x), static_cast<const TE*>(A), cand, grouped, P, k, N, r, d_in, z_all, key_all);
  return 0;
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
                     int k, int N, int r, int m, int uniform, float temperature,
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
      // -1: no candidate (a scope left fewer than k); >= N: none either, as the Triton backend reads
      // it (the grouped z path never writes such a slot's key)
      if (ct[p] < 0 || ct[p] >= N) continue;
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
  // softmax(key / temperature) as the reference computes it: exp((key - max key) / temperature) / sum
  // (no inf / inf at a tiny temperature); NaN propagates.
  float mx = -INFINITY;
  for (int i = lane; i < m; i += 32)
    if (st[i] >= 0) mx = nan_max(mx, wt[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = nan_max(mx, __shfl_xor_sync(kFull, mx, o));
  float sum = 0.f;
  for (int i = lane; i < m; i += 32)
    if (st[i] >= 0) sum += expf((wt[i] - mx) / temperature);
  sum = warp_sum(sum);
  __syncwarp();
  for (int i = lane; i < m; i += 32) wt[i] = st[i] >= 0 ? expf((wt[i] - mx) / temperature) / sum : 0.f;
}

template <typename TE>
void launch_z(const void* x, const void* A, const int32_t* cand, int64_t tasks, int k, int N, int r,
              int d_in, int wpt, int vec, float* z_all, float* key_all, cudaStream_t stream) {
  const int tpb = kWarps / wpt;
  const int64_t blocks = (tasks + tpb - 1) / tpb;
  rerank_z_kernel<TE><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const TE*>(x), static_cast<const TE*>(A), cand, tasks, k, N, r, d_in, wpt, vec, z_all,
      key_all);
}

}  // namespace
}  // namespace lag

extern "C" size_t lag_spectr_rerank_workspace_bytes(int64_t T, int64_t N, int64_t k) {
  if (T <= 0 || N <= 0 || k <= 0 || !lag::use_grouped(T, N, k)) return 0;
  return sizeof(int32_t) * static_cast<size_t>(N + 1 + T * k);  // counts / cursor [N + 1], grouped pairs [T k]
}

extern "C" int lag_spectr_rerank_launch(const void* x, int x_dtype, const void* a_star, int a_dtype,
                                        const int32_t* candidates, const float* candidate_scores,
                                        int64_t T, int64_t N, int64_t r, int64_t d_in, int64_t k,
                                        int64_t m, int combine_uniform, float temperature,
                                        float* z_all, float* key_all, void* workspace, size_t workspace_bytes,
                                        int32_t* sel, float* w, float* z, int device, void* stream_ptr) {
  using namespace lag;
  if (T == 0) return 0;
  if (N <= 0 || k <= 0 || m <= 0 || m > k || r < 0 || d_in < 0 || N > 0x7fffffffLL ||
      k > 0x7fffffffLL || r > 0x7fffffffLL || d_in > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t tasks = T * k;
  if ((tasks + kWarps - 1) / kWarps > 0x7fffffffLL || (T + kWarps - 1) / kWarps > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  if (x_dtype != a_dtype) return static_cast<int>(cudaErrorInvalidValue);  // the caller promotes
  const bool grouped = use_grouped(T, N, k);
  if (grouped && (workspace == nullptr || workspace_bytes < lag_spectr_rerank_workspace_bytes(T, N, k)))
    return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int Ki = static_cast<int>(k), Ni = static_cast<int>(N), Ri = static_cast<int>(r), Di = static_cast<int>(d_in);
  int rc;
  if (grouped) {
    int32_t* counts = static_cast<int32_t*>(workspace);
    int32_t* pairs = counts + N + 1;
    rc = dispatch_dtype(x_dtype, [&](auto te) {
      typedef typename decltype(te)::type TE;
      return launch_grouped_z<TE>(x, a_star, candidates, static_cast<int>(tasks), Ki, Ni, Ri, Di, counts, pairs, z_all,
                                  key_all, stream);
    });
  } else {
    const int vec = (d_in % 8 == 0 && aligned16(x) && aligned16(a_star)) ? 1 : 0;
    // warps per task: enough warps in flight for small batches, at least one 8-wide chunk per lane
    const int64_t target_warps = 16LL * sm_count(device);
    const int64_t lane_chunks = (d_in + 7) / 8;
    int wpt = 1;
    while (wpt < kWarps && tasks * wpt * 2 <= target_warps && static_cast<int64_t>(wpt) * 2 * 32 <= lane_chunks)
      wpt *= 2;
    rc = dispatch_dtype(x_dtype, [&](auto te) {
      typedef typename decltype(te)::type TE;
      launch_z<TE>(x, a_star, candidates, tasks, Ki, Ni, Ri, Di, wpt, vec, z_all, key_all, stream);
      return 0;
    });
  }
  if (rc != 0) return rc;
  const int64_t blocks = (T + kWarps - 1) / kWarps;
  rerank_select_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      candidates, candidate_scores, key_all, z_all, T, Ki, Ni, Ri, static_cast<int>(m), combine_uniform,
      temperature, sel, w, z);
  return finish_launch();
}
