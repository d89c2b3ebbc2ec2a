// vitkernels — XCiT cross-covariance attention forward (plain CUDA, no torch headers).
//
// Math (per batch b, head h; q, k, v the head's (N, D) slices of the packed qkv, τ = temperature[h]):
//   G   = qᵀ · k                                   (D × D, reduced over the N tokens, fp32)
//   r_q = max(‖q_:,i‖₂, 1e-12), r_k = max(‖k_:,j‖₂, 1e-12)    (norms over the tokens, per channel)
//   A   = softmax_j(τ · G_ij / (r_q,i · r_k,j))      (= softmax(τ q̂ᵀ k̂), no D^-1/2 scale)
//   out = v · Aᵀ                                   (N × D: out[n, i] = Σ_j A[i, j] v[n, j])
//
// Layout: q, k, v, out strided (B, H, N, D) views (last dim contiguous, 16-byte aligned bases and
// strides); temperature float32 (H). Two passes over the tokens per (b, h) — stats (G and the
// norms) and apply — in one CTA per head, or split over chunks of tokens joined by an fp32
// workspace the caller allocates (xca_forward_workspace_floats). D % 8 == 0, 8 ≤ D ≤ 64; sm_80+.
// Design, cost model and version history: docs/xca.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"  // DType

namespace vitkernels {

struct XcaFwdParams {
  const void* q;             // (B, H, N, D) view
  const void* k;             // (B, H, N, D) view
  const void* v;             // (B, H, N, D) view
  void* out;                 // (B, H, N, D) view
  const float* temperature;  // float32, contiguous (H)
  float* workspace;          // xca_forward_workspace_floats(p) floats, or null when that is 0
  // Element strides of the q, k, v and out views.
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4];
  int B, H, N, D;
  DType dtype;
};

// Whether the kernel runs this head dim and dtype: D % 8 == 0 and 8 <= D <= 64, any DType.
bool xca_forward_supports(int head_dim, DType dtype);

// Floats of fp32 workspace the launch needs on the current device (0: one CTA per head, no
// workspace). Negative on a CUDA error.
int64_t xca_forward_workspace_floats(const XcaFwdParams& p);

// Launches the forward on `stream`. cudaErrorInvalidValue (nothing launched) on an unsupported head
// dim, misaligned pointers/strides, bad sizes or a missing workspace.
cudaError_t xca_forward(const XcaFwdParams& p, cudaStream_t stream);

}  // namespace vitkernels
