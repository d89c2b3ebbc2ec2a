// vitkernels — fused multi-head attention forward (plain CUDA, no torch headers).
//
// Math (per sequence (b, g, h): batch, group, head; G = 1 for plain attention):
//   S   = q · kᵀ · scale + bias                 (Nq × Nk; never written to HBM)
//   P   = softmax(S) along keys                  (online softmax, FlashAttention-2 style)
//   out = P · v                                  (Nq × D)
//   lse = log Σ_j exp(S_ij)                      (natural log, float32, contiguous (B, G, H, Nq))
//   A row whose every score is -inf gives out = 0 and lse = +inf (so exp(S - lse) = 0 in backward).
//
// Work and traffic:
//   FLOPs = 4 · B · H · Nq · Nk · D               (two GEMMs: q·kᵀ and P·v)
//   Bytes ≈ e · B · H · (2·Nq·D + 2·Nk·D) + 4 · B · H · Nq       (q, out, k, v, lse; e = element size)
//           + e · (elements of bias actually stored, ≤ B·H·Nq·Nk) when a bias is given
//   K/V are re-read once per query block; those re-reads mostly hit L2.
//   Arithmetic intensity without bias ≈ Nq·Nk / (Nq + Nk) FLOP/byte at 2-byte types (ViT-B/16 at
//   224 px: N = 197, D = 64 → ~98 FLOP/B), above the H100 ridge point (989e12 / 3.35e12 ≈ 295
//   FLOP/B) only for N ≳ 600, so short-sequence ViT attention is bandwidth/latency bound.
//
// Roofline floor on H100 SXM (≈ 989 TFLOP/s dense bf16/fp16 tensor core, 3.35 TB/s HBM3):
//   t_min = max(FLOPs / 989e12, Bytes / 3.35e12).
//   Example ViT-B/16, B = 64, H = 12, N = 197, D = 64, bf16, no bias: 7.63 GFLOP → 7.7 µs compute
//   floor; q, k, v, out 4 × 19.4 MB + lse 0.6 MB = 78 MB → 23 µs memory floor (memory bound).
//   A broadcast bias (e.g. Swin's per-head (H, N, N) table) is re-read for every batch element;
//   those re-reads mostly hit L2. This kernel uses mma.sync (Ampere-class tensor-core issue), which
//   tops out well below the wgmma peak on H100; see docs/ for measured numbers.
//
// Design:
//   * One CTA per (query block of 64 rows, sequence). The grid is 1-D: blockIdx.x enumerates
//     ((b·G + g)·H + h) · num_m_blocks + m_block, so consecutive CTAs share K/V in L2 and no grid
//     y/z limit (65535) applies. All offsets are int64.
//   * Prefix rows (see AttentionFwdParams): a prefix key/value starts the online softmax of every
//     row (max = its score, sum = 1, o = its value) instead of the empty state; a prefix query is
//     row Nq of the last query block, loaded from and stored to its own pointers.
//   * fp16 / bf16: 4 warps, each owns 16 query rows (warp-level steps in attention_mma.cuh).
//     Q tile → shared memory (cp.async) → registers
//     (ldmatrix). Loop over key blocks of 64: K and V tiles stream through shared memory with
//     cp.async, overlapped FA2-style (V[j] loads while S = Q·K[j]ᵀ and the softmax run, K[j+1]
//     loads while O += P·V[j] runs). Both GEMMs use mma.sync.aligned.m16n8k16 with fp32
//     accumulation; P is rounded to the input type for the second GEMM (as eager PyTorch does).
//     Shared-memory rows are padded by 16 bytes, which makes ldmatrix conflict-free.
//   * float32: a CUDA-core kernel (32×32 tiles, 4 threads per query row, float4 shared loads,
//     fp32 FMA everywhere — no TF32), same online-softmax math.
//   * Online softmax in the log2 domain (scores pre-multiplied by log2 e, exp2f); running max,
//     running sum, rescale of the output accumulator; -inf-safe (a fully masked row never forms
//     -inf - -inf). Bias is read with its own strides (0 strides = broadcast), in the input dtype.
//   * Any Nq, Nk ≥ 1: out-of-range rows/keys are zero-filled in shared memory and masked to -inf.
//   * Head dims: any D with D % 8 == 0 and 8 ≤ D ≤ 128, compiled for padded head dims
//     32, 48, 64, 80, 96, 128 (pad lanes are zero-filled and never stored).
//   * Requirements checked by attention_forward (else cudaErrorInvalidValue, nothing launched):
//     16-byte aligned q/k/v/out pointers, last-dim stride 1 and other strides multiples of
//     8 (fp16/bf16) or 4 (fp32) elements. Callers copy to contiguous otherwise
//     (attention_forward_tensor_aligned tells them when).
//   * Deterministic, no atomics, no allocation, CUDA-graph capturable (only a cudaFuncSetAttribute
//     for > 48 KiB dynamic shared memory, plus the launch, on the given stream).
//   * Requires sm_80 or newer (cp.async, bf16 mma).
//
// Versions:
//   v1 — the design above. Written on a machine without a GPU: compiled for sm_80/sm_90a (no
//        spills; ≤ 185 registers/thread). It has run on the vkemu CPU emulator (tests/cuda_emu):
//        tests/test_cuda_attention.py passes there in fp16, bf16 and fp32. It has not yet been
//        run or timed on a GPU (record timings here and in docs/).
//   v2 — a group dim and prefix rows (space_time_attention); warps whose rows are all past the
//        last query skip their work, and 16-key groups past the last key skip their MMAs
//        (warp_scores / warp_pv n_valid). sm_90a: no spills, ≤ 182 registers. Passes
//        test_cuda_attention.py and test_cuda_space_time_attention.py on vkemu; not yet on a GPU.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vitkernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

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

// Head dims the fused kernel handles: D % 8 == 0 and 8 <= D <= 128.
bool attention_forward_supports_head_dim(int D);

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
