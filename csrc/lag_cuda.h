// Plain C declarations of the launchers implemented in the .cu files.
//
// Included by the .cu files (so a signature mismatch is a compile error) and by binding.cpp,
// which must not see any CUDA header: streams travel as void* (a cudaStream_t), dtypes as the
// small integer codes below, tensors as raw pointers. Every launcher returns a cudaError_t as
// int (0 = success); lag_cuda_error_string() turns it into text. None of them synchronises.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes shared with binding.cpp
#define LAG_DTYPE_F32 0
#define LAG_DTYPE_F16 1
#define LAG_DTYPE_BF16 2

// arrow_select supports k <= LAG_ARROW_MAX_K (the Python side falls back to the reference beyond).
#define LAG_ARROW_MAX_K 128

const char* lag_cuda_error_string(int err);

// Bytes of scratch arrow_select needs (0 when the N split is not used).
size_t lag_arrow_select_workspace_bytes(int64_t T, int64_t N, int64_t k, int device);

// scores [T, N] fp32 (row stride `stride`, e.g. a GEMM's x @ P^T) -> idx [T, k] int32, |scores| [T, k]
// fp32 of the k largest |scores| per row, best first. With `allowed` ([S, N] uint8, row stride
// allowed_stride) and `scope` ([T] int32), row t ranks only adapters n with allowed[scope[t]][n];
// slots past them are -1 / NaN. A non-null `scope` means scoped: a row out of [0, S) allows nothing,
// and S = 0 (an empty table, `allowed` possibly null) allows nothing to any row.
int lag_arrow_select_launch(const float* scores, int64_t T, int64_t N, int64_t stride, int64_t k,
                            const uint8_t* allowed, const int32_t* scope, int64_t S, int64_t allowed_stride,
                            void* workspace, size_t workspace_bytes, int32_t* idx, float* out_scores,
                            int device, void* stream);

// Bytes of int32 scratch spectr_rerank needs (0 unless it groups the pairs by adapter: T >= 64, T*k >= N).
size_t lag_spectr_rerank_workspace_bytes(int64_t T, int64_t N, int64_t k);

// x [T, d_in], a_star [N, r, d_in] of one dtype (x_dtype == a_dtype: the Python side promotes mixed
// dtypes exactly, to fp32), candidates [T, k] int32, candidate_scores [T, k] fp32 or NULL.
// Scratch: z_all [T, k, r] fp32, key_all [T, k] fp32, workspace (lag_spectr_rerank_workspace_bytes).
// Outputs: sel [T, m] int32, w [T, m] fp32, z [T, m, r] fp32. combine_uniform: 1 for "uniform", 0 for
// "softmax". A candidate -1 is no candidate: never picked; picks past the valid candidates get sel -1,
// w 0, z 0 and the weights spread over the rest.
int lag_spectr_rerank_launch(const void* x, int x_dtype, const void* a_star, int a_dtype,
                             const int32_t* candidates, const float* candidate_scores, int64_t T,
                             int64_t N, int64_t r, int64_t d_in, int64_t k, int64_t m,
                             int combine_uniform, float temperature, float* z_all, float* key_all,
                             void* workspace, size_t workspace_bytes, int32_t* sel, float* w, float* z,
                             int device, void* stream);

// y [T, d_out] (y_dtype, updated in place), b_star [N, d_out, r] (b_dtype), sel [T, m] int32,
// w [T, m] fp32, z [T, m, r] fp32.
int lag_lora_apply_launch(void* y, int y_dtype, const void* b_star, int b_dtype, const int32_t* sel,
                          const float* w, const float* z, int64_t T, int64_t N, int64_t d_out,
                          int64_t r, int64_t m, int device, void* stream);

#ifdef __cplusplus
}
#endif
