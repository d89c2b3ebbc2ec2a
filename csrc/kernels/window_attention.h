// vitkernels — fused Swin window attention forward, W-MSA / SW-MSA (plain CUDA, no torch headers).
//
// Math (SPEC.md op 3). qkv (B, L = H·W, 3C) is the qkv linear of the un-shifted, un-partitioned
// map; C = heads·D; windows of N = M² slots on the map padded to multiples of M. Slot t = p·M + c
// of window (wh, ww) is pure index math (no rolled / partitioned / mask tensors): it reads token
// ((wh·M + p + s) mod Hp)·W + (ww·M + c + s) mod Wp, or a padded slot whose q/k/v row is qkv_bias,
// and per window and head h
//   S = q·kᵀ·scale + table[rel(i, j), h] − 100·[s > 0 and region_i ≠ region_j]    (N × N)
//   out[b, token(i), h·D : h·D + D] = (softmax_rows(S) · v)[i]        for real slots i only.
// Options: shift_first (timm's order: shift the unpadded map, then pad) changes only the slot →
// token map; logit_scale (Swin V2) uses τ_h·q̂·k̂ᵀ, τ_h = exp(min(logit_scale[h], ln 100)).
//
// Layout: qkv with any batch / token strides (channel stride 1, 16-byte aligned); out contiguous
// (B, H·W, C); table ((2M−1)², heads) at any strides. fp16 / bf16 on tensor cores, float32 on CUDA
// cores; 1 ≤ M ≤ 16, D % 8 == 0, 8 ≤ D ≤ 128; sm_80+. Kernel versions (kernel_version): v2 (the
// default) runs two (batch, window, head) items per 8-warp CTA (a 4-warp half each) and issues the
// Q loads before the K/V staging barrier; v1 runs one item per 4-warp CTA.
// Index math, design, cost model and version history: docs/window_attention.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"  // DType

namespace vitkernels {

struct WindowAttentionFwdParams {
  const void* qkv;          // (B, H·W, 3C), dtype `dtype`
  int64_t qkv_stride[3];    // element strides for (B, token, channel); channel stride must be 1
  const void* table;        // nullable; ((2M−1)², heads), dtype `dtype`
  int64_t table_stride[2];  // element strides of the table (any)
  const void* qkv_bias;     // nullable; (3C,) contiguous, dtype `dtype`
  void* out;                // (B, H·W, C) contiguous, dtype `dtype`
  const void* logit_scale;  // nullable: cosine attention; (heads,) contiguous, dtype `dtype`
  bool shift_first;         // timm's order: cyclic shift of the unpadded H×W map, then padding
  int B, H, W, C, heads, head_dim, window, shift;
  float scale;  // unused with logit_scale
  DType dtype;
  int kernel_version;  // 0: the newest (v2); 1: v1 (one window per 4-warp CTA, Q loaded after the K/V barrier)
};

// Launches the forward on `stream`. Returns cudaErrorInvalidValue (launching nothing) on
// unsupported window / head dim, bad sizes, unmet alignment or an unknown kernel_version;
// otherwise the launch status.
cudaError_t window_attention_forward(const WindowAttentionFwdParams& p, cudaStream_t stream);

// Whether the kernel runs window M, head dim D and dtype: 1 <= M <= 16, D % 8 == 0, 8 <= D <= 128.
bool window_attention_forward_supports(int window, int head_dim, DType dtype);

// True when ptr with (B, token, channel) element strides meets the 16-byte vector-load needs.
bool window_attention_tensor_aligned(const void* ptr, const int64_t stride[3], DType dtype);

}  // namespace vitkernels
