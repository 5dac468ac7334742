// Gather-BGMV apply: y[t] += sum_j w[t, j] * (B*[sel[t, j]] @ z[t, j]), in fp32, written back in
// y's dtype, in place.
//
// Block = (tile of outputs, tile of `tok` consecutive tokens). Each thread owns OPT outputs
// strided by the block size (so a warp reads one contiguous run of B*[n] rows of r elements:
// fully used sectors whatever r is) and reuses every z value it loads across them. For r <= 8
// and r <= 16 the rank loop is unrolled so all of a thread's loads are in flight at once. The block
// walks its tokens one after another: consecutive tokens routed to the same adapter (the common
// case in prefill, where a prompt mostly picks the same few adapters) find that adapter's
// kOut x r tile of B* in L1 instead of re-reading it from L2/HBM - a cheap stand-in for SGMV
// segment grouping that needs no sort and no scratch. y is read and written exactly once.
// Token tiles shrink from kMaxTok to 1 until the grid has ~2 blocks per SM: with 8 tokens a block,
// a decode batch of 32 at d_out = 8192 made 32 blocks for 132 SMs, each walking its tokens one
// after another (the H200 run of commit 35079c7: 0.0315 ms where Triton's apply took 0.0113).
#include "lag_common.cuh"

namespace lag {
namespace {

constexpr int kMaxTok = 8;  // tokens per block at most (prefill: consecutive tokens share B* tiles in L1)

// RB > 0: r <= RB, the r loop is fully unrolled (every load of a thread is issued up front);
// RB == 0: any r, runtime loop. OPT outputs per thread, strided by the block size.
template <typename TY, typename TB, int RB, int OPT>
__global__ void __launch_bounds__(kThreads)
lora_apply_kernel(TY* __restrict__ y, const TB* __restrict__ B, const int32_t* __restrict__ sel,
                  const float* __restrict__ w, const float* __restrict__ z, int64_t T, int N,
                  int d_out, int r, int m, int tok) {
  const int o0 = blockIdx.x * (kThreads * OPT) + threadIdx.x;
  const int64_t slab = static_cast<int64_t>(d_out) * r;
  for (int64_t tile = blockIdx.y; tile * tok < T; tile += gridDim.y) {
    const int64_t t_end = (tile + 1) * tok < T ? (tile + 1) * tok : T;
    for (int64_t t = tile * tok; t < t_end; ++t) {
      float acc[OPT];
#pragma unroll
      for (int i = 0; i < OPT; ++i) acc[i] = 0.f;
      for (int j = 0; j < m; ++j) {
        const int n = __ldg(sel + t * m + j);
        if (n < 0 || n >= N) continue;  // -1: no adapter for this pick (a scope); never read out of range
        const float wj = __ldg(w + t * m + j);
        const float* zj = z + (t * m + j) * r;
        const TB* b = B + n * slab;
        float s[OPT];
#pragma unroll
        for (int i = 0; i < OPT; ++i) s[i] = 0.f;
        if (RB > 0) {
          float zc[RB > 0 ? RB : 1];
#pragma unroll
          for (int c = 0; c < RB; ++c) zc[c] = c < r ? __ldg(zj + c) : 0.f;
#pragma unroll
          for (int i = 0; i < OPT; ++i) {
            const int o = o0 + i * kThreads;
            if (o < d_out) {
              const TB* row = b + static_cast<int64_t>(o) * r;
#pragma unroll
              for (int c = 0; c < RB; ++c)
                if (c < r) s[i] = fmaf(to_f(row[c]), zc[c], s[i]);
            }
          }
        } else {
#pragma unroll 4
          for (int c = 0; c < r; ++c) {
            const float zv = __ldg(zj + c);
#pragma unroll
            for (int i = 0; i < OPT; ++i) {
              const int o = o0 + i * kThreads;
              if (o < d_out) s[i] = fmaf(to_f(b[static_cast<int64_t>(o) * r + c]), zv, s[i]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < OPT; ++i) acc[i] += wj * s[i];
      }
#pragma unroll
      for (int i = 0; i < OPT; ++i) {
        const int o = o0 + i * kThreads;
        if (o < d_out) {
          TY* p = y + t * d_out + o;
          *p = from_f<TY>(to_f(*p) + acc[i]);
        }
      }
    }
  }
}

template <typename TY, typename TB, int RB, int OPT>
void launch_apply_rb(void* y, const void* B, const int32_t* sel, const float* w, const float* z, int64_t T,
                     int N, int d_out, int r, int m, int device, cudaStream_t stream) {
  const int64_t out_blocks = (d_out + kThreads * OPT - 1) / (kThreads * OPT);
  const int64_t want = 2LL * sm_count(device);
  int tok = kMaxTok;
  while (tok > 1 && out_blocks * ((T + tok - 1) / tok) < want) tok >>= 1;
  const int64_t tiles = (T + tok - 1) / tok;
  dim3 grid(static_cast<unsigned>(out_blocks), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  lora_apply_kernel<TY, TB, RB, OPT><<<grid, kThreads, 0, stream>>>(
      static_cast<TY*>(y), static_cast<const TB*>(B), sel, w, z, T, N, d_out, r, m, tok);
}

template <typename TY, typename TB>
void launch_apply(void* y, const void* B, const int32_t* sel, const float* w, const float* z, int64_t T,
                  int N, int d_out, int r, int m, int device, cudaStream_t stream) {
  if (r <= 8) launch_apply_rb<TY, TB, 8, 4>(y, B, sel, w, z, T, N, d_out, r, m, device, stream);
  else if (r <= 16) launch_apply_rb<TY, TB, 16, 2>(y, B, sel, w, z, T, N, d_out, r, m, device, stream);
  else launch_apply_rb<TY, TB, 0, 4>(y, B, sel, w, z, T, N, d_out, r, m, device, stream);
}

}  // namespace
}  // namespace lag

extern "C" int lag_lora_apply_launch(void* y, int y_dtype, const void* b_star, int b_dtype, const int32_t* sel,
                                     const float* w, const float* z, int64_t T, int64_t N, int64_t d_out,
                                     int64_t r, int64_t m, int device, void* stream_ptr) {
  using namespace lag;
  if (T == 0 || d_out == 0) return 0;
  if (N <= 0 || r < 0 || m < 0 || d_out < 0 || N > 0x7fffffffLL || d_out > 0x7fffffffLL ||
      r > 0x7fffffffLL || m > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int Ni = static_cast<int>(N), Do = static_cast<int>(d_out), Ri = static_cast<int>(r), Mi = static_cast<int>(m);
  int rc = dispatch_dtype(y_dtype, [&](auto ty) {
    typedef typename decltype(ty)::type TY;
    return dispatch_dtype(b_dtype, [&](auto tb) {
      typedef typename decltype(tb)::type TB;
      launch_apply<TY, TB>(y, b_star, sel, w, z, T, Ni, Do, Ri, Mi, device, stream);
      return 0;
    });
  });
  if (rc != 0) return rc;
  return finish_launch();
}
