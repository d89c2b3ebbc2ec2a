// vitkernels — fused Swin window attention forward, W-MSA / SW-MSA (plain CUDA, no torch headers).
//
// Math (SPEC.md op 3). qkv (B, L = H·W, 3C) is the qkv linear of the un-shifted, un-partitioned
// map; C = heads·D. Hp = ⌈H/M⌉·M, Wp = ⌈W/M⌉·M, nW = (Hp/M)·(Wp/M) windows of N = M² slots.
// Slot t = p·M + c of window (wh, ww) is pure index math (no rolled / partitioned / mask tensors):
//   shifted-grid coords  (y, x)     = (wh·M + p, ww·M + c)
//   source coords        (row, col) = ((y + s) mod Hp, (x + s) mod Wp)
//   token                row·W + col when row < H and col < W, else a padded slot whose
//                        q/k/v row is qkv_bias (zeros when qkv_bias is null)
//   region label         3·r(y, Hp) + r(x, Wp), r(z, Z) = [z ≥ Z − M] + [z ≥ Z − s]   (s > 0)
//   rel-pos index        (p_i − p_j + M − 1)·(2M − 1) + (c_i − c_j + M − 1)
// per window and head h:
//   S = q·kᵀ·scale + table[idx(i, j), h] − 100·[s > 0 and label_i ≠ label_j]       (N × N)
//   P = softmax_rows(S),  O = P·v;  out[b, token(i), h·D : h·D + D] = O[i] for real slots i only.
//
// Options (SPEC op 3):
//   shift_first (timm's order: shift the unpadded map, then pad) changes only the slot → token map:
//     token = ((y + s) mod H)·W + (x + s) mod W when y < H and x < W, else a padded slot; the region
//     labels stay those of the padded grid.
//   logit_scale (Swin V2 cosine attention) replaces q·kᵀ·scale by τ_h·q̂·k̂ᵀ, τ_h =
//     exp(min(logit_scale[h], ln 100)), q̂ = q / max(‖q‖₂, 1e-12) over D (likewise k̂); `scale` unused.
//
// Work and traffic:
//   FLOPs = 4 · B · nW · heads · N² · D        (q·kᵀ and P·v; executed on N rounded up to 16)
//   Bytes ≈ e · B · L · (3C + C) + table      (qkv read once, out written once; e = element size)
// Roofline floor on H100 SXM (≈ 989 TFLOP/s dense fp16/bf16, 3.35 TB/s HBM3), Swin-T stage 1:
//   B = 64, 56×56, C = 96, 3 heads (D = 32), M = 7 (N = 49, nW = 64), bf16:
//   3.78 GFLOP → 3.8 µs compute; 64·3136·(288 + 96)·2 B = 154.1 MB → 46.0 µs memory.
//   Floor ≈ 46 µs: ~25 FLOP/byte against a ridge of ~295, a pure bandwidth problem.
//
// Design:
//   * One CTA (4 warps) per (batch, window, head). 1-D grid, blockIdx.x = (b·nW + w)·heads + h
//     (the heads of one window, which read adjacent bytes of each token row, run side by side);
//     B·nW·heads may exceed 65,535. Batch/token offsets are int64.
//   * fp16 / bf16: the window's K and V rows (N rounded up to NP = 16·⌈N/16⌉ ≤ 256 slots, head
//     dim padded to Dp ∈ {32, 48, 64, 80, 96, 128}) are gathered once into shared memory with
//     16-byte loads (all N keys on chip: ≤ 2·256·136·2 B = 136 KiB). Each warp takes 16-row query
//     blocks; its Q fragments are gathered straight from global into registers. Keys run in
//     chunks of 64 (online softmax, log2 domain, exp2f): S = Q·Kᵀ with mma.sync m16n8k16
//     (fp32 accumulate, K fragments are 32-bit shared loads), O += P·V with V fragments from
//     ldmatrix.trans; P is rounded to the input type for the second GEMM (as eager PyTorch does).
//     The table column of head h is staged in shared memory (fp32, pre-multiplied by log2 e);
//     per-slot relative offsets and region labels are precomputed once per CTA.
//   * float32: CUDA-core kernel, fp32 FMA everywhere (no TF32). 4 threads per query row
//     (thread r owns head dims r, r + 4, …), 32 query rows per pass, keys streamed through shared
//     memory in chunks of 32 (gathered by index), online softmax per chunk.
//   * Scores of key slots ≥ N are −inf; query slots ≥ N or padded are computed and dropped.
//   * Options. shift_first is a runtime flag read only where the slot table is built (once per
//     CTA). Cosine attention is a template switch (kCosine), so the default kernels are unchanged:
//     fp16 / bf16 keep q and k exact in the MMAs and scale each fp32 score instead,
//     s = (q·k)·τ_h·log2 e / (max(‖q‖, 1e-12)·max(‖k‖, 1e-12)): 1/‖k‖ of every staged key row in
//     shared memory (a warp per row, +NP floats), 1/‖q‖ of each query row from its own Q
//     fragments (the quad's four lanes hold all its columns); fp32 normalises q in registers and
//     each staged 32-key chunk in place. No global traffic beyond the heads' logit scales.
//     The option fields sit at the end of the kernel-argument struct: placed before the
//     existing fields they changed ptxas's register allocation of the default kernels.
//   * Supported: 1 ≤ M ≤ 16 (N ≤ 256), D % 8 == 0 and 8 ≤ D ≤ 128
//     (window_attention_forward_supports). Requirements checked by window_attention_forward
//     (else cudaErrorInvalidValue, nothing launched): channel stride 1, qkv / qkv_bias / out
//     16-byte aligned, qkv batch and token strides multiples of 16 bytes, out contiguous
//     (B, H·W, C), table element-aligned.
//   * Deterministic, no atomics, no allocation, CUDA-graph capturable (a cudaFuncSetAttribute for
//     > 48 KiB dynamic shared memory, plus the launch, on the given stream). Requires sm_80+.
//
// Versions:
//   v1.1 — logit_scale (Swin V2 cosine attention) and shift_first (timm's order); default-path
//        kernels compile to the same registers / spills as v1 (sm_80, sm_90a). Unmeasured.
//   v1 — unmeasured. Written on a machine without a GPU: compiled for sm_80 / sm_90a, and run on
//        the vkemu CPU emulator (tests/cuda_emu): tests/test_cuda_window_attention.py passes there
//        in fp16, bf16 and fp32 (M = 4…16, shifts, padding, D = 32…128). Not yet run on a GPU.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention.h"  // DType

namespace vitkernels {

struct WindowAttentionFwdParams {
  const void* qkv;            // (B, H·W, 3C), dtype `dtype`
  int64_t qkv_stride[3];      // element strides for (B, token, channel); channel stride must be 1
  const void* table;          // nullable; ((2M−1)², heads), dtype `dtype`
  int64_t table_stride[2];    // element strides of the table (any)
  const void* qkv_bias;       // nullable; (3C,) contiguous, dtype `dtype`
  void* out;                  // (B, H·W, C) contiguous, dtype `dtype`
  const void* logit_scale;    // nullable: cosine attention; (heads,) contiguous, dtype `dtype`
  bool shift_first;           // timm's order: cyclic shift of the unpadded H×W map, then padding
  int B, H, W, C, heads, head_dim, window, shift;
  float scale;               // unused with logit_scale
  DType dtype;
};

// Launches the forward on `stream`. Returns cudaErrorInvalidValue (launching nothing) on
// unsupported window / head dim, bad sizes or unmet alignment; otherwise the launch status.
cudaError_t window_attention_forward(const WindowAttentionFwdParams& p, cudaStream_t stream);

// Whether the fused kernel handles window M and head dim D: 1 <= M <= 16, D % 8 == 0, 8 <= D <= 128.
bool window_attention_forward_supports(int window, int head_dim);

// True when ptr with (B, token, channel) element strides meets the 16-byte vector-load needs.
bool window_attention_tensor_aligned(const void* ptr, const int64_t stride[3], DType dtype);

}  // namespace vitkernels
