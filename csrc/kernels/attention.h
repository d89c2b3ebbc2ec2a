// vitkernels — fused multi-head attention forward (plain CUDA, no torch headers).
//
// Math, per sequence (b, g, h) — batch, group, head; G = 1 for plain attention:
//   S   = q · kᵀ · scale + bias         (Nq × Nk, never written to memory; bias or a boolean mask)
//   out = softmax_rows(S) · v           (Nq × D; online softmax, FlashAttention-2 style)
//   lse = log Σ_j exp(S_ij)             (natural log, float32; a row of all -inf: out 0, lse +inf)
// Optional prefix rows per sequence: a key/value every query attends to first, and a query row
// numbered Nq with its own output and lse (TimeSformer's class token, space_time_attention).
//
// Layout: q, k, v, out are strided (B, G, H, N, D) views (element strides, last dim contiguous,
// 16-byte aligned bases and strides); bias / mask (B, G, H, Nq, Nk) at any strides (0 =
// broadcast); lse contiguous (B, G, H, Nq). fp16 / bf16 run on tensor cores (mma.sync, fp32
// accumulation), float32 on CUDA cores; D % 8 == 0, 8 ≤ D ≤ 128; sm_80+. One CTA per (64-row or,
// fp32, 32-row query block, sequence) on a 1-D grid; deterministic, no allocation, graph-capturable.
// Design, cost model and version history: docs/attention.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"  // DType

namespace vitkernels {

constexpr int kAttentionMaxHeadDim = 128;

// Sequences are indexed (b, g, h): batch, group, head. Plain multi-head attention has G = 1;
// divided space-time attention (space_time_attention.cpp) runs every frame (space axis) or every
// spatial position (time axis) as a group, reading q, k, v, out with strides straight from the
// token-layout buffers.
//
// Optional prefix rows, one per (b, g, h) sequence, each D contiguous elements at its own
// (B, G, H) strides (TimeSformer's class token, shared by the frames with a group stride of 0):
//   * k_prefix / v_prefix (both or neither): one more key/value that every query of the sequence
//     attends to, before key 0. It gets no bias.
//   * q_prefix / out_prefix / lse_prefix (all three or none): one more query row, numbered Nq,
//     that attends to the same keys (prefix key included); its output goes to out_prefix and its
//     lse to lse_prefix (float32, contiguous (B, G, H)). It gets no bias.
struct AttentionFwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* bias;  // nullable; same dtype as q; logical shape (B, G, H, Nq, Nk)
  // nullable; a boolean keep-mask (one byte per element, nonzero = the key takes part, zero =
  // score -inf) of logical shape (B, G, H, Nq, Nk) at the bias strides. At most one of bias / mask.
  const unsigned char* mask = nullptr;
  void* out;
  float* lse;  // float32, contiguous (B, G, H, Nq)
  const void* k_prefix = nullptr;
  const void* v_prefix = nullptr;
  const void* q_prefix = nullptr;
  void* out_prefix = nullptr;
  float* lse_prefix = nullptr;
  // Element strides for (B, G, H, N, D) (bias or mask: (B, G, H, Nq, Nk)). Last dim of q, k, v,
  // out must have stride 1. Bias / mask strides may be 0 (broadcast) or anything else.
  int64_t q_stride[5];
  int64_t k_stride[5];
  int64_t v_stride[5];
  int64_t bias_stride[5];
  int64_t out_stride[5];
  // (B, G, H) element strides of the prefix rows (their last dim is contiguous).
  int64_t kp_stride[3] = {0, 0, 0};
  int64_t vp_stride[3] = {0, 0, 0};
  int64_t qp_stride[3] = {0, 0, 0};
  int64_t op_stride[3] = {0, 0, 0};
  int B, G = 1, H, Nq, Nk, D;
  float scale;
  DType dtype;
  // fp16 / bf16: 0 = the newest kernel (v2, 32 query rows per warp, where the padded head dim is
  // ≤ 64; v1 elsewhere), 1 = v1 (16 rows per warp).
  int kernel_version = 0;
};

// (B, H, N, D) strides as the kernel's (B, G, H, N, D) strides of a single group (G stride 0).
inline void attention_one_group_strides(const int64_t (&bhnd)[4], int64_t (&bghnd)[5]) {
  bghnd[0] = bhnd[0];
  bghnd[1] = 0;
  bghnd[2] = bhnd[1];
  bghnd[3] = bhnd[2];
  bghnd[4] = bhnd[3];
}

// Launches the forward kernel on `stream`. Returns cudaErrorInvalidValue (and launches nothing)
// on unsupported head dim, misaligned pointers/strides or bad sizes; otherwise the launch status.
cudaError_t attention_forward(const AttentionFwdParams& p, cudaStream_t stream);

// Whether the kernel runs this head dim and dtype: D % 8 == 0 and 8 <= D <= 128, any DType.
bool attention_forward_supports(int head_dim, DType dtype);

// True when `ptr` with these `ndim` element strides (the last one the head dim's) meets the
// kernel's vector-load requirements: 16-byte aligned base, stride[ndim - 1] == 1, the others
// multiples of 16 bytes.
bool attention_forward_tensor_aligned(const void* ptr, const int64_t* stride, int ndim, DType dtype);
inline bool attention_forward_tensor_aligned(const void* ptr, const int64_t (&stride)[4], DType dtype) {
  return attention_forward_tensor_aligned(ptr, stride, 4, dtype);
}

// Archs this translation unit was compiled for, e.g. "sm_80;sm_90a" (from __CUDA_ARCH_LIST__ when
// nvcc provides it; otherwise "unknown").
const char* attention_built_archs();

}  // namespace vitkernels
