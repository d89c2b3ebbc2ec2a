// vitkernels — spatial-reduction attention forward for N ≫ M (PVT / SegFormer), plain CUDA,
// no torch headers.
//
// Math (per batch b, head h; q (N, D) from the full-resolution map, k, v (M, D) from the reduced map):
//   out = softmax(q · kᵀ · scale) · v        (N × D)
//   lse = log Σ_j exp(q_i · k_j · scale)      (natural log, float32, contiguous (B, H, N))
//
// Work and traffic (C = H·D, e = element size):
//   FLOPs = 4 · B · N · M · C
//   Bytes ≈ e · (2·B·N·C + 2·B·M·C) + 4 · B · H · N   (q, out; k and v once per CTA, mostly L2)
//   Arithmetic intensity ≈ M FLOP/byte at 2-byte types: memory-bound for M ≲ 295 on an H100.
//   PVTv2-b2 stage 1 (B 64, N 3136, M 49, C 64, bf16): 2.52 GFLOP, 53 MB → 15.8 µs memory floor at
//   3.35 TB/s (compute floor 2.5 µs at 989 TFLOP/s).
//
// Design:
//   * fp16 / bf16: one CTA of 4 warps per (b·h, chunk of query rows). The CTA copies all M keys
//     and values of its head into shared memory once (cp.async; rows ≥ M zero-filled, padded to a
//     multiple of 64) and keeps them there while it walks its chunk in 64-row query tiles. Each warp
//     owns 16 rows of a tile and runs the same warp-level steps as attention.cu (attention_mma.cuh):
//     S = Q·K_jᵀ with mma.sync m16n8k16, online softmax in the log2 domain over the ⌈M/64⌉ resident
//     key blocks (for M ≤ 64 that is a single pass), O += P·V_j. No __syncthreads inside the key
//     loop: K and V never change. The next query tile is prefetched with cp.async into a second
//     buffer while the current one is computed.
//   * The chunk (rows per CTA, a multiple of 64) is chosen by the launcher so that the grid has
//     about 4 CTAs per SM (rows_per_cta = 0) or given by the caller. k and v are read from L2 once per
//     chunk, not once per query tile.
//   * float32: delegated to the general CUDA-core attention kernel (attention_forward), which
//     streams the keys; no tensor cores are used for fp32 (as in attention.cu).
//   * Limits: 1 ≤ M ≤ 256, D % 8 == 0 with 8 ≤ D ≤ 128, and the shared memory
//     (2·⌈M/64⌉·64 + 2·64) · (Dp + 8) · 2 bytes must fit the device's opt-in limit
//     (sr_attention_forward_smem_bytes). M = 256, D = 64: 90 KiB.
//   * Requirements as attention.h: 16-byte aligned pointers, last-dim stride 1, other strides
//     multiples of 16 bytes (else cudaErrorInvalidValue, nothing launched). Deterministic, no atomics,
//     no allocation, CUDA-graph capturable. sm_80 or newer.
//
// Versions:
//   v1 — the design above. Written on a machine without a GPU: compiled for sm_80/sm_90a with
//        -Werror, and run on the vkemu CPU emulator (tests/cuda_emu):
//        tests/test_cuda_sr_attention.py passes there in fp16, bf16 and fp32. Not yet run or timed
//        on a GPU (docs/sr_attention.md).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"  // DType

namespace vitkernels {

struct SrAttentionFwdParams {
  const void* q;    // (B, H, N, D) view
  const void* k;    // (B, H, M, D) view
  const void* v;    // (B, H, M, D) view
  void* out;        // (B, H, N, D) view
  float* lse;       // float32, contiguous (B, H, N)
  int64_t q_stride[4];
  int64_t k_stride[4];
  int64_t v_stride[4];
  int64_t out_stride[4];
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
