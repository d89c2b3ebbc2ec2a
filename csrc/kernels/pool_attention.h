// vitkernels — MViTv2 pooling-attention forward with decomposed relative positions, plain CUDA,
// no torch headers.
//
// Math (per batch b, head h; spatial tokens row-major after the class token when has_cls_token):
//   S[i, j] = scale · q_i·k_j + R[i, j],   R[i, j] = q_i·rel_h[dh(qh, kh)] + q_i·rel_w[dw(qw, kw)]
//             with i at (qh, qw) of q_hw and j at (kh, kw) of k_hw; R = 0 for the class row / column
//             or without tables. dh = trunc(qh·max(k_h/q_h, 1) − kh·max(q_h/k_h, 1) + (k_h−1)·max(q_h/k_h, 1))
//             in float32 operation by operation, exactly as timm's cal_rel_pos_type; dw likewise.
//   out[b, i, h·D + d] = Σ_j softmax_j(S[i, ·]) · v[j, d] + (q[i, d] if residual)
//   lse[b, h, i] = log Σ_j exp S[i, j]   (natural log, float32)
// Layout: q, k, v strided (B, H, N, D) views, out a (B, H, Nq, D) view (the token layout
// (B, Nq, H·D) is strides (Nq·H·D, D, H·D, 1)); last dims contiguous, 16-byte aligned bases and
// strides; tables contiguous (L, D) in q's dtype. fp16 / bf16 on tensor cores (mma.sync), float32
// on CUDA cores; D % 8 == 0, 8 ≤ D ≤ 128; with tables k_h, k_w ≤ 256; sm_80+.
// Design and cost: docs/pool_attention.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"  // DType

namespace vitkernels {

constexpr int kPoolAttentionMaxHeadDim = 128;
constexpr int kPoolAttentionMaxKeySide = 256;  // k_h and k_w, with tables

struct PoolAttentionFwdParams {
  const void* q;      // (B, H, Nq, D) view
  const void* k;      // (B, H, Nk, D) view
  const void* v;      // (B, H, Nk, D) view
  const void* rel_h;  // nullable (then rel_w too): contiguous (Lh, D), q's dtype
  const void* rel_w;  // contiguous (Lw, D)
  void* out;          // (B, H, Nq, D) view
  float* lse;         // float32, contiguous (B, H, Nq)
  // Element strides of the q, k, v and out views.
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4];
  int B, H, D;
  int q_h, q_w, k_h, k_w;  // Nq = q_h·q_w + cls, Nk = k_h·k_w + cls
  int Lh, Lw;              // table rows
  bool has_cls_token;
  bool residual;
  float scale;
  DType dtype;
};

// timm's relative-position index along one axis, dh(qi, ki) for q_size query and k_size key
// positions (float32 operation by operation, truncated toward zero). The table needs more rows
// than the largest index, rel_index(q_size - 1, 0, ...).
inline int pool_attention_rel_index(int qi, int ki, int q_size, int k_size) {
  const double q_ratio = static_cast<double>(k_size) / q_size > 1.0 ? static_cast<double>(k_size) / q_size : 1.0;
  const double k_ratio = static_cast<double>(q_size) / k_size > 1.0 ? static_cast<double>(q_size) / k_size : 1.0;
  // volatile: each step rounds to float32 on its own (no fused multiply-add on the host)
  volatile float a = static_cast<float>(qi) * static_cast<float>(q_ratio);
  volatile float b = static_cast<float>(ki) * static_cast<float>(k_ratio);
  volatile float d = a - b;
  volatile float e = d + static_cast<float>((k_size - 1) * k_ratio);
  return static_cast<int>(e);
}

// Dynamic shared memory of the kernel for (D, dtype, k_h, k_w, tables present); 0 outside its limits.
int pool_attention_forward_smem_bytes(int D, DType dtype, int k_h, int k_w, bool rel);

// Whether the kernel runs this head dim and dtype (with k_h, k_w ≤ 64 on every sm_80+ device):
// D % 8 == 0, 8 ≤ D ≤ 128, float32 / float16 / bfloat16.
bool pool_attention_forward_supports(int head_dim, DType dtype);

// Whether it runs these sizes on a device whose opt-in shared memory per block is max_smem_bytes.
bool pool_attention_forward_supports(int head_dim, DType dtype, int k_h, int k_w, bool rel, int max_smem_bytes);

// Launches on `stream` (current device). cudaErrorInvalidValue (nothing launched) on unsupported
// sizes or misaligned pointers/strides; otherwise the launch status.
cudaError_t pool_attention_forward(const PoolAttentionFwdParams& p, cudaStream_t stream);

}  // namespace vitkernels
