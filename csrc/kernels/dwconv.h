// vitkernels — depthwise k×k conv on token layout, bias + activation fused (plain CUDA, no torch
// headers). Forward only; the backward runs on another backend (see vitkernels/ops/dwconv.py).
//
// Math (SPEC op 7; x in token layout, n = h·W + w, P = k // 2, x = 0 outside the H×W map):
//   z[b, h, w, c] = bias[c] + Σ_{i,j<k} weight[c, i, j] · x[b, (h + i − P)·W + (w + j − P), c]
//   y = act(z),  act: 0 identity, 1 GELU exact erf (0.5·z·(1 + erf(z/√2))), 2 ReLU
//   Accumulation in fp32; one rounding to the input dtype at the store.
//
// Layout: x (B, H·W, C) with channel stride 1 and any batch / token strides; weight (C, k·k) and
// bias (C,) contiguous, in x's dtype; out contiguous (B, H·W, C). One CTA per output tile of pixels
// × a channel chunk, the input halo staged in shared memory; k ∈ {1, 3, 5, 7}; int64 offsets.
// Design, cost model and version history: docs/dwconv.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"  // DType

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

// Whether the kernel runs this kernel size and dtype: k in {1, 3, 5, 7} are compiled in, any DType.
bool dwconv_forward_supports(int kernel_size, DType dtype);

}  // namespace vitkernels
