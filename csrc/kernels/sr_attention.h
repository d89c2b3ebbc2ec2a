// vitkernels — spatial-reduction attention forward for N ≫ M (PVT / SegFormer), plain CUDA,
// no torch headers.
//
// Math (per batch b, head h; q (N, D) from the full-resolution map, k, v (M, D) from the reduced map):
//   out = softmax(q · kᵀ · scale) · v        (N × D)
//   lse = log Σ_j exp(q_i · k_j · scale)      (natural log, float32, contiguous (B, H, N))
//
// Layout: q, k, v, out strided (B, H, rows, D) views (last dim contiguous, 16-byte aligned bases and
// strides). fp16 / bf16: one CTA per (b·h, chunk of query rows) keeps all M keys and values in
// shared memory and walks its chunk in 64-row tiles with the warp steps of attention_mma.cuh;
// float32 runs the general attention_forward. Limits: 1 ≤ M ≤ 256, D % 8 == 0, 8 ≤ D ≤ 128, and
// the keys and values must fit the device's shared memory (sr_attention_forward_smem_bytes).
// Design, cost model and version history: docs/sr_attention.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"  // DType, attention_forward (float32)

namespace vitkernels {

struct SrAttentionFwdParams {
  const void* q;  // (B, H, N, D) view
  const void* k;  // (B, H, M, D) view
  const void* v;  // (B, H, M, D) view
  void* out;      // (B, H, N, D) view
  float* lse;     // float32, contiguous (B, H, N)
  // Element strides of the q, k, v and out views.
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4];
  int B, H, N, M, D;
  int rows_per_cta;  // query rows per CTA (multiple of 64); 0 = chosen from the SM count
  float scale;
  DType dtype;
};

// Dynamic shared memory of the fp16/bf16 kernel for (M, D); 0 when (M, D) is outside its limits.
int sr_attention_forward_smem_bytes(int M, int D);

// True when the forward runs (M, D, dtype) on a device whose opt-in shared memory per block is
// max_smem_bytes (fp32 goes to attention_forward and only needs a supported head dim).
bool sr_attention_forward_supports(int M, int D, DType dtype, int max_smem_bytes);

// Launches on `stream` (current device). cudaErrorInvalidValue (nothing launched) on unsupported
// sizes, misaligned pointers/strides or M == 0; otherwise the launch status.
cudaError_t sr_attention_forward(const SrAttentionFwdParams& p, cudaStream_t stream);

}  // namespace vitkernels
