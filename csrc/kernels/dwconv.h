// vitkernels — depthwise k×k conv on token layout, bias + activation fused (plain CUDA, no torch
// headers). Forward only; the backward runs on another backend (see vitkernels/ops/dwconv.py).
//
// Math (SPEC op 7; x in token layout, n = h·W + w, P = k // 2, x = 0 outside the H×W map):
//   z[b, h, w, c] = bias[c] + Σ_{i,j<k} weight[c, i, j] · x[b, (h + i − P)·W + (w + j − P), c]
//   y = act(z),  act: 0 identity, 1 GELU exact erf (0.5·z·(1 + erf(z/√2))), 2 ReLU
//   Accumulation in fp32; one rounding to the input dtype at the store. Weight and bias are read
//   in the input dtype (they are the caller's tensors; nothing is rounded before the FMAs).
//
// Work and traffic (element size e):
//   FLOPs = 2 · k² · B · N · C                (CUDA-core FMAs; + bias/activation O(B·N·C))
//   Bytes ≈ e · 2 · B · N · C                 (one read of x, one write of y; weight/bias ~ e·(k²+1)·C)
//   Intensity ≈ k²/2 FLOP/B at 2-byte types: always memory-bound.
//   H100 SXM floor (3.35 TB/s), SegFormer-B2 stage 1 at 512 px (B = 8, 128×128 tokens, C = 256,
//   k = 3, bf16): 2 · 8 · 16384 · 256 · 2 B = 134.2 MB → 40.1 µs (0.60 GFLOP ≈ 9 µs of fp32 FMA).
//
// Design:
//   * One CTA (256 threads) per output tile of TH × TW pixels × one channel chunk of CV·VEC
//     channels. The grid is 1-D: blockIdx.x = ((b·nTH + th)·nTW + tw)·nCB + cb (no y/z limit).
//   * The input halo tile ((TH + k − 1) × (TW + k − 1) pixels × the channel chunk) is staged in
//     shared memory in the input dtype, so every input element is read from HBM about once (halo
//     re-reads by neighbouring tiles mostly hit L2). The weights of the chunk, (k², chunk), are
//     staged next to it.
//   * Vector path (C % VEC == 0, 16-byte aligned x, token and batch strides multiples of VEC):
//     VEC = 8 halfs / 4 floats = 16 B per access, CV = 8 threads span a 128-byte channel chunk
//     (64 fp16/bf16 or 32 fp32 channels). Scalar fallback: VEC = 1, CV = 16 channels.
//   * Each thread owns RH × RW (RW = 4 consecutive columns; RH = 2 rows for k ≤ 3, else 1) outputs
//     × VEC channels. Per weight row i it loads the k weight vectors into registers, then for each
//     of its rows slides along the RW + k − 1 input vectors of that row in shared memory, each
//     used by up to k outputs (register sliding window along W).
//   * Tiles: vector TW = 16, TH = 16 (k ≤ 3) / 8; scalar TW = 16, TH = 8 (k ≤ 3) / 4. Static
//     shared memory ≤ 45.7 KB (k = 7, vector).
//   * Templates: dtype × k ∈ {1, 3, 5, 7} × vector/scalar; activation and bias are runtime flags.
//   * int64 offsets everywhere; any B·N·C. Deterministic, no atomics, no allocation, one launch
//     on the given stream (CUDA-graph capturable).
//
// Versions:
//   v1 — the design above. Written on a machine without a GPU: compiles for sm_80/sm_90a without
//        spills, and runs on the vkemu CPU emulator (tests/cuda_emu): tests/test_cuda_dwconv.py
//        passes there in fp16, bf16 and fp32. Not yet run on a GPU; unmeasured.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"  // vitkernels::DType (shared by all kernels of the extension)

namespace vitkernels {

struct DwconvFwdParams {
  const void* x;       // (B, H·W, C), channel stride 1, dtype `dtype`
  const void* weight;  // (C, k·k) contiguous, dtype `dtype`
  const void* bias;    // (C,) contiguous, dtype `dtype`, or nullptr
  void* out;           // (B, H·W, C) contiguous, dtype `dtype`
  int64_t x_stride_b;  // element strides of x (batch, token)
  int64_t x_stride_n;
  int B, H, W, C, k;
  int activation;  // 0 none, 1 gelu (exact erf), 2 relu
  DType dtype;
};

// Launches the forward on `stream`. Returns cudaErrorInvalidValue (nothing launched) on an
// unsupported k or activation, bad sizes or a grid that does not fit; cudaSuccess without a
// launch when B·H·W·C == 0; otherwise the launch status.
cudaError_t dwconv_forward(const DwconvFwdParams& p, cudaStream_t stream);

// Kernel sizes compiled in: 1, 3, 5, 7.
bool dwconv_forward_supports_k(int k);

}  // namespace vitkernels
