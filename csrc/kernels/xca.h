// vitkernels — XCiT cross-covariance attention forward (plain CUDA, no torch headers).
//
// Math (per batch b, head h; q, k, v the head's (N, D) slices of the packed qkv, τ = temperature[h]):
//   G   = qᵀ · k                                   (D × D, reduced over the N tokens, fp32)
//   r_q = max(‖q_:,i‖₂, 1e-12), r_k = max(‖k_:,j‖₂, 1e-12)    (norms over the tokens, per channel)
//   A   = softmax_j(τ · G_ij / (r_q,i · r_k,j))      (= softmax(τ q̂ᵀ k̂), no D^-1/2 scale)
//   out = v · Aᵀ                                   (N × D: out[n, i] = Σ_j A[i, j] v[n, j])
//
// Work and traffic (C = H·D, e = element size):
//   FLOPs = 4 · B · N · C · D      (the Gram matrix and the apply, 2·B·N·C·D each)
//   Bytes ≈ e · 4 · B · N · C      (q, k read by the stats pass, v by the apply pass, out written)
//   Memory-bound at every XCiT size (D = 48: 24 FLOP/byte at 2-byte types, ridge ≈ 295).
//   XCiT-S12/16 at 224 px, B = 64 (N = 196, C = 384, 8 heads), bf16: 38.5 MB → 11.5 µs at 3.35 TB/s.
//
// Design:
//   * Two passes over the tokens per (b, h), 64-token tiles through shared memory (cp.async):
//     - stats: G = qᵀk and the squared column norms of q and k. fp16/bf16: mma.sync m16n8k16 with
//       fp32 accumulation; qᵀ and k come from the row-major token tiles through ldmatrix.trans;
//       warp w owns G's channel rows [16w, 16w + 16). fp32: CUDA-core FMAs.
//     - softmax of the D × D matrix in shared memory, a quad of threads per row;
//     - apply: out tile = v tile · Aᵀ, A rounded to the input type for the tensor cores (as the
//       eager `attn @ v` does); each warp owns 16 tokens. Staged through shared memory, stored
//       in 16-byte chunks.
//   * One CTA per head does both passes when B·H alone fills the GPU (≥ 2 CTAs per SM) or N fits
//     one tile. Otherwise the tokens are split in chunks (about 4 CTAs per SM, at most 8 chunks per
//     head): a stats kernel writes each chunk's fp32 partial G and norms to a workspace
//     (xca_forward_workspace_floats) and an apply kernel sums them over the chunks in a fixed
//     order, so results are deterministic without atomics. Every apply CTA re-reads its head's
//     partials (L2 hits), hence the cap.
//   * Nothing N-sized but the inputs and the output touches HBM: the eager path's normalised q, k,
//     their transposes and the (B, H, D, N) output are never written.
//   * Head dims: D % 8 == 0, 8 ≤ D ≤ 64, padded to 32, 48 or 64 (pad channels are zero-filled,
//     masked out of the softmax and never stored).
//   * Requirements (else cudaErrorInvalidValue, nothing launched): 16-byte aligned q/k/v/out
//     pointers, last-dim stride 1, other strides multiples of 16 bytes; temperature float32 (H).
//     Deterministic, no allocation (the caller passes the workspace), CUDA-graph capturable.
//     sm_80 or newer.
//
// Versions:
//   v1 — the design above. Written on a machine without a GPU: compiled for sm_80/sm_90a, run on
//        the vkemu CPU emulator (tests/test_cuda_xca.py passes there in fp16, bf16 and fp32). Not
//        yet run or timed on a GPU (docs/xca.md).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"  // DType

namespace vitkernels {

struct XcaFwdParams {
  const void* q;             // (B, H, N, D) view
  const void* k;             // (B, H, N, D) view
  const void* v;             // (B, H, N, D) view
  void* out;                 // (B, H, N, D) view
  const float* temperature;  // float32, contiguous (H)
  float* workspace;          // xca_forward_workspace_floats(p) floats, or null when that is 0
  int64_t q_stride[4];
  int64_t k_stride[4];
  int64_t v_stride[4];
  int64_t out_stride[4];
  int B, H, N, D;
  DType dtype;
};

// Head dims the kernel handles: D % 8 == 0 and 8 <= D <= 64.
bool xca_forward_supports_head_dim(int D);

// Floats of fp32 workspace the launch needs on the current device (0: one CTA per head, no
// workspace). Negative on a CUDA error.
int64_t xca_forward_workspace_floats(const XcaFwdParams& p);

// Launches the forward on `stream`. cudaErrorInvalidValue (nothing launched) on an unsupported head
// dim, misaligned pointers/strides, bad sizes or a missing workspace.
cudaError_t xca_forward(const XcaFwdParams& p, cudaStream_t stream);

}  // namespace vitkernels
