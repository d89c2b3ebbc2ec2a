// vitkernels — warp-level pieces of the fp16/bf16 tensor-core attention forward, shared by
// attention.cu and pool_attention.cu (keys streamed through shared memory) and sr_attention.cu (keys
// resident in shared memory), and the float32 CUDA-core ("quad") kernels' pieces of attention.cu and
// pool_attention.cu. Header-only, no torch headers; sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async).
//
// One warp owns 16 query rows. Per block of 64 keys it computes S = Q·Kᵀ (16 × 64, fp32),
// updates the online softmax in the log2 domain (running max, running sum, rescale of the output
// accumulator), and accumulates O += P·V with P rounded to the input type. Accumulator layout of
// mma.m16n8k16: lane = 4·g + t holds rows g and g + 8, columns 2t and 2t + 1 of every 8-wide tile.
// Shared-memory tiles are row-major with a padded row stride kStride = kDp + 8 elements (odd number
// of 16-byte units → conflict-free ldmatrix).
#pragma once

#include "common.cuh"
#include "ptx_sm80.cuh"

#include <cmath>
#include <cstdint>

namespace vitkernels {
namespace mma_attention {

using namespace ptx;

constexpr int kKeyBlock = 64;        // keys per step
constexpr int kNT = kKeyBlock / 8;   // score n-tiles per warp
constexpr int kPK = kKeyBlock / 16;  // k-steps of the P·V GEMM

template <int kDp>
struct Shape {
  static constexpr int kStride = kDp + 8;  // padded smem row (elements)
  static constexpr int kDT = kDp / 8;      // output n-tiles (8 head dims each)
  static constexpr int kKQ = kDp / 16;     // k-steps of the Q·Kᵀ GEMM
  // Q fragments stay in registers for the whole key loop for kDp <= 64; larger head dims re-read
  // them from shared memory per key block (as FA2 does) to stay under 255 registers.
  static constexpr bool kQInRegs = kDp <= 64;
  static constexpr int kQRegs = kQInRegs ? kKQ : 1;
  static_assert(kDp % 16 == 0 && kDp <= 128, "padded head dim must be a multiple of 16, <= 128");
  static_assert(((kStride * 2 / 16) & 1) == 1, "row stride in 16B units must be odd");
};

// The head dim a kernel is compiled for: D rounded up to 32, 48, 64, 80, 96 or 128 (the pad lanes
// are zero-filled and never stored). dispatch_padded_head_dim(D, f) calls f with that width as an
// std::integral_constant; padded_head_dim(D) returns it.
template <typename F>
cudaError_t dispatch_padded_head_dim(int D, F&& f) {
  return dispatch_head_dim<32, 48, 64, 80, 96, 128>(D, std::forward<F>(f));
}

inline int padded_head_dim(int D) {
  int dp = 0;
  dispatch_padded_head_dim(D, [&](auto kDp) {
    dp = decltype(kDp)::value;
    return cudaSuccess;
  });
  return dp;
}

// Copies rows [row0, row0 + kRows) × head dims [0, kDp) of one (N, D) matrix into shared memory
// (row stride kSmemStride elements) with 16-byte cp.async; rows ≥ n_rows and chunks ≥ D are
// zero-filled, except that row n_rows reads `extra_row` when it is given (a "prefix" query that
// lives outside the matrix, see attention.h). kElems = elements per 16-byte chunk. Rows are split
// over kThreads threads.
template <typename T, int kRows, int kDp, int kSmemStride, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gbase, int64_t row_stride, int row0, int n_rows,
                                                int D, const T* extra_row = nullptr) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunks = kDp / kElems;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must divide evenly across threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = i / kChunks;
    const int c = i - r * kChunks;
    const int row = row0 + r;
    const bool extra = extra_row != nullptr && row == n_rows;
    const bool valid = (row < n_rows || extra) && (c * kElems < D);
    const T* src = !valid  ? gbase
                   : extra ? extra_row + c * kElems
                           : gbase + static_cast<int64_t>(row) * row_stride + c * kElems;
    cp_async_16(smem + r * kSmemStride + c * kElems, src, valid ? 16 : 0);
  }
}

// Output accumulator and online-softmax statistics of one warp's 16 query rows.
template <int kDp>
struct WarpRows {
  float o[Shape<kDp>::kDT][4];
  float row_max[2];
  float row_sum[2];  // per-thread partial sums, reduced across the quad in finish()

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int i = 0; i < Shape<kDp>::kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }
};

// Starts the online softmax of this warp's two rows (g, g + 8) with one "prefix" key/value row
// kp / vp (global memory, D contiguous) instead of an empty state: score s = q·kp (fp32, from the
// Q tile in shared memory, sQrow0 = the warp's first Q row), running max = s·scale·log2 e, running
// sum = 1 (held by the quad's lane t = 0; the sum is reduced over the quad at the end) and
// o = vp, so the prefix is exactly one more key of the softmax. Call once Q has landed in smem.
template <typename T, int kDp>
__device__ __forceinline__ void warp_prefix_key(WarpRows<kDp>& w, const T* sQrow0, const T* kp, const T* vp, int D,
                                                float scale_log2, int lane) {
  constexpr int kStride = Shape<kDp>::kStride;
  const int g = lane >> 2;
  const int t = lane & 3;
  float s[2] = {0.f, 0.f};
  // Lane t of the quad takes head dims t, t + 4, ...; smem pad lanes (≥ D) hold zeros.
  for (int d = t; d < D; d += 4) {
    const float kd = to_float(kp[d]);
    s[0] = fmaf(to_float(sQrow0[g * kStride + d]), kd, s[0]);
    s[1] = fmaf(to_float(sQrow0[(g + 8) * kStride + d]), kd, s[1]);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s[r] += __shfl_xor_sync(0xffffffffu, s[r], 1);
    s[r] += __shfl_xor_sync(0xffffffffu, s[r], 2);
    w.row_max[r] = s[r] * scale_log2;
    w.row_sum[r] = (t == 0) ? 1.f : 0.f;
  }
#pragma unroll
  for (int i = 0; i < Shape<kDp>::kDT; ++i) {
    const int d = i * 8 + 2 * t;
    const float v0 = d < D ? to_float(vp[d]) : 0.f;      // D % 8 == 0: d and d + 1 are both in
    const float v1 = d < D ? to_float(vp[d + 1]) : 0.f;  // range or both out
    w.o[i][0] = w.o[i][2] = v0;
    w.o[i][1] = w.o[i][3] = v1;
  }
}

// Q fragments of this warp's rows (sQw = first Q row of the warp + ldmatrix lane offset).
template <typename T, int kDp>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[Shape<kDp>::kQRegs][4], const T* sQw) {
  if (Shape<kDp>::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < Shape<kDp>::kQRegs; ++kk) ldmatrix_x4(qf[kk], sQw + kk * 16);
  }
}

// s = Q · K[64 keys]ᵀ, fp32, for kG groups of 16 query rows (group r's Q at sQw + 16·r rows;
// qf[r] its fragments, load_q_fragments). sK points at the first key row of the block; n_valid = keys of the
// block that exist (the block's last key index + 1 - its first, or more). 16-key groups past n_valid
// are skipped (their scores stay 0 and softmax_update masks them to -inf): a block of a short
// sequence (a TimeSformer time-axis sequence has 8 keys) does not pay for 64.
template <typename T, int kDp, int kG>
__device__ __forceinline__ void warp_scores_rows(float (&s)[kG][kNT][4], uint32_t (&qf)[kG][Shape<kDp>::kQRegs][4],
                                                 const T* sQw, const T* sK, int lane, int n_valid = kKeyBlock) {
  using S = Shape<kDp>;
#pragma unroll
  for (int r = 0; r < kG; ++r) {
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[r][i][0] = s[r][i][1] = s[r][i][2] = s[r][i][3] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < S::kKQ; ++kk) {
    const int qi = S::kQInRegs ? kk : 0;
    if (!S::kQInRegs) {
#pragma unroll
      for (int r = 0; r < kG; ++r) ldmatrix_x4(qf[r][qi], sQw + r * 16 * S::kStride + kk * 16);
    }
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      if (np * 16 >= n_valid) break;  // uniform across the CTA
      uint32_t kb[4];
      ldmatrix_x4(kb, sK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * S::kStride + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int r = 0; r < kG; ++r) {  // one K fragment feeds every 16-row group of the warp
        Mma<T>::run(s[r][2 * np], qf[r][qi], kb[0], kb[1]);
        Mma<T>::run(s[r][2 * np + 1], qf[r][qi], kb[2], kb[3]);
      }
    }
  }
}

// warp_scores_rows for one 16-row group.
template <typename T, int kDp>
__device__ __forceinline__ void warp_scores(float (&s)[kNT][4], uint32_t (&qf)[Shape<kDp>::kQRegs][4], const T* sQw,
                                            const T* sK, int lane, int n_valid = kKeyBlock) {
  warp_scores_rows<T, kDp, 1>(reinterpret_cast<float(&)[1][kNT][4]>(s),
                              reinterpret_cast<uint32_t(&)[1][Shape<kDp>::kQRegs][4]>(qf), sQw, sK, lane, n_valid);
}

// Scale to the log2 domain, add the bias (rows bias_r0 / bias_r1, nullable, column stride bs3),
// set the scores of keys a boolean mask excludes (rows mask_r0 / mask_r1, nullable, zero bytes; the
// same column stride) and of keys ≥ Nk to -inf, update the running max and sum, rescale o; s becomes P (unnormalised).
// n0 = index of the block's first key. A row with no finite score so far keeps max = -inf and
// uses 0 as the reference, so exp2 never sees -inf - (-inf).
template <typename T, int kDp>
__device__ __forceinline__ void softmax_update(float (&s)[kNT][4], WarpRows<kDp>& w, int n0, int Nk, float scale_log2,
                                               const T* bias_r0, const T* bias_r1, int64_t bs3, int t,
                                               const unsigned char* mask_r0 = nullptr,
                                               const unsigned char* mask_r1 = nullptr) {
  const bool need_mask = n0 + kKeyBlock > Nk;
  float new_max[2] = {w.row_max[0], w.row_max[1]};
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = n0 + nt * 8 + 2 * t + (e & 1);
      float x = s[nt][e] * scale_log2;
      const T* br = (e < 2) ? bias_r0 : bias_r1;
      if (br != nullptr && col < Nk) x = fmaf(to_float(br[col * bs3]), kLog2e, x);
      const unsigned char* mr = (e < 2) ? mask_r0 : mask_r1;
      if (mr != nullptr && col < Nk && mr[col * bs3] == 0) x = -INFINITY;
      if (need_mask && col >= Nk) x = -INFINITY;
      s[nt][e] = x;
      new_max[e >> 1] = fmaxf(new_max[e >> 1], x);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 1));
    new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 2));
  }
  float alpha[2], m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m_use[r] = (new_max[r] == -INFINITY) ? 0.f : new_max[r];
    alpha[r] = exp2f(w.row_max[r] - m_use[r]);
    w.row_max[r] = new_max[r];
    w.row_sum[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(s[nt][e] - m_use[e >> 1]);
      s[nt][e] = p;
      w.row_sum[e >> 1] += p;
    }
  }
#pragma unroll
  for (int i = 0; i < Shape<kDp>::kDT; ++i) {
    w.o[i][0] *= alpha[0];
    w.o[i][1] *= alpha[0];
    w.o[i][2] *= alpha[1];
    w.o[i][3] *= alpha[1];
  }
}

// P as A fragments (the accumulator layout of two n-tiles is the A layout of one k-step).
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&pf)[kPK][4], const float (&s)[kNT][4]) {
#pragma unroll
  for (int kk = 0; kk < kPK; ++kk) {
    pf[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    pf[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    pf[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pf[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// o += P · V[64 keys] for kG 16-row groups (w[r], pf[r]); sV points at the first value row of the block. 16-key steps
// past n_valid (as in warp_scores) are skipped: their P is exactly 0.
template <typename T, int kDp, int kG>
__device__ __forceinline__ void warp_pv_rows(WarpRows<kDp> (&w)[kG], const uint32_t (&pf)[kG][kPK][4], const T* sV,
                                             int lane, int n_valid = kKeyBlock) {
  constexpr int kStride = Shape<kDp>::kStride;
#pragma unroll
  for (int kk = 0; kk < kPK; ++kk) {
    if (kk * 16 >= n_valid) break;  // uniform across the CTA
#pragma unroll
    for (int dp = 0; dp < kDp / 16; ++dp) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + dp * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int r = 0; r < kG; ++r) {  // one V fragment feeds every 16-row group of the warp
        Mma<T>::run(w[r].o[2 * dp], pf[r][kk], vb[0], vb[1]);
        Mma<T>::run(w[r].o[2 * dp + 1], pf[r][kk], vb[2], vb[3]);
      }
    }
  }
}

// warp_pv_rows for one 16-row group.
template <typename T, int kDp>
__device__ __forceinline__ void warp_pv(WarpRows<kDp>& w, const uint32_t (&pf)[kPK][4], const T* sV, int lane,
                                        int n_valid = kKeyBlock) {
  warp_pv_rows<T, kDp, 1>(reinterpret_cast<WarpRows<kDp>(&)[1]>(w), reinterpret_cast<const uint32_t(&)[1][kPK][4]>(pf),
                          sV, lane, n_valid);
}

// The key loop of a tensor-core kernel whose first key block K[0] is in sK, landed and visible to every
// thread, for warps of kG 16-row groups. Per block j of kKeyBlock keys: V[j] is copied while each
// active warp forms its scores of K[j] (warp_scores_rows), turns each group's into P with
// `update(r, s, n0)` (softmax_update with the kernel's bias, mask or
// rel terms; n0 = the block's first key) and packs P; then K[j + 1] is copied, `stage(n0 + kKeyBlock)`
// writes any per-key data of that block (visible to every thread at the next step), and the warp adds
// P·V[j]. sQw / qf: the warp's Q (group r: sQw + 16·r rows, qf[r]); k, v: the (b, h) bases, row strides ks, vs.
template <typename T, int kDp, int kThreads, int kG, typename Update, typename Stage>
__device__ __forceinline__ void mma_key_loop_rows(WarpRows<kDp> (&w)[kG], uint32_t (&qf)[kG][Shape<kDp>::kQRegs][4],
                                                  const T* sQw, T* sK, T* sV, const T* k, int64_t ks, const T* v,
                                                  int64_t vs, int Nk, int D, bool active, int lane, Update&& update,
                                                  Stage&& stage) {
  constexpr int kStride = Shape<kDp>::kStride;
  const int n_blocks = (Nk + kKeyBlock - 1) / kKeyBlock;
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kKeyBlock;
    if (j > 0) {
      cp_async_wait_all();  // K[j] has landed
      __syncthreads();      // ... for every thread; every warp is done reading V[j-1]; block j's staged data written
    }
    load_tile_async<T, kKeyBlock, kDp, kStride, kThreads>(sV, v, vs, n0, Nk, D);
    cp_async_commit();

    const int n_valid = Nk - n0;
    uint32_t pf[kG][kPK][4];
    if (active) {
      float s[kG][kNT][4];
      warp_scores_rows<T, kDp, kG>(s, qf, sQw, sK, lane, n_valid);
#pragma unroll
      for (int r = 0; r < kG; ++r) {
        update(r, s[r], n0);
        pack_p<T>(pf[r], s[r]);
      }
    }

    cp_async_wait_all();  // V[j] has landed
    __syncthreads();      // ... for every thread, and every warp is done with K[j] and its staged data
    if (j + 1 < n_blocks) {
      load_tile_async<T, kKeyBlock, kDp, kStride, kThreads>(sK, k, ks, n0 + kKeyBlock, Nk, D);
      cp_async_commit();
      stage(n0 + kKeyBlock);
    }
    if (active) warp_pv_rows<T, kDp, kG>(w, pf, sV, lane, n_valid);
  }
}

// mma_key_loop_rows for one 16-row group: update(s, n0).
template <typename T, int kDp, int kThreads, typename Update, typename Stage>
__device__ __forceinline__ void mma_key_loop(WarpRows<kDp>& w, uint32_t (&qf)[Shape<kDp>::kQRegs][4], const T* sQw,
                                             T* sK, T* sV, const T* k, int64_t ks, const T* v, int64_t vs, int Nk,
                                             int D, bool active, int lane, Update&& update, Stage&& stage) {
  mma_key_loop_rows<T, kDp, kThreads, 1>(
      reinterpret_cast<WarpRows<kDp>(&)[1]>(w), reinterpret_cast<uint32_t(&)[1][Shape<kDp>::kQRegs][4]>(qf), sQw, sK,
      sV, k, ks, v, vs, Nk, D, active, lane, [&](int, float(&s)[kNT][4], int n0) { update(s, n0); }, stage);
}

// Epilogue of one warp: finish the row sums, write lse (natural log; +inf when every score was
// -inf) for rows < n_rows, normalise and store the 16 output rows in 16-byte chunks, staged
// through sO (16 smem rows private to this warp, stride kStride). row0 = the warp's first row;
// out = (b, h) base of the output (row stride os2); lse = (b, h) base of lse (row stride 1).
// When extra_out is given, row n_rows (the prefix query) goes to extra_out and *extra_lse. With
// `residual`, each output element adds the one sO holds (the warp's own Q rows, read by the lane
// that overwrites them).
template <typename T, int kDp>
__device__ __forceinline__ void warp_store(const WarpRows<kDp>& w, T* sO, T* out, int64_t os2, float* lse, int row0,
                                           int n_rows, int D, int lane, T* extra_out = nullptr,
                                           float* extra_lse = nullptr, bool residual = false) {
  constexpr int kStride = Shape<kDp>::kStride;
  const int g = lane >> 2;
  const int t = lane & 3;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = w.row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = (l == 0.f) ? 0.f : 1.f / l;  // (NaN scores propagate as NaN)
    const int row = row0 + g + 8 * r;
    const float lse_row = (l == 0.f) ? INFINITY : (w.row_max[r] + log2f(l)) * kLn2;
    if (t == 0 && row < n_rows) lse[row] = lse_row;
    if (t == 0 && row == n_rows && extra_out != nullptr) *extra_lse = lse_row;
  }
  __syncwarp();  // every lane's last read of these smem rows is done before they are overwritten
#pragma unroll
  for (int i = 0; i < Shape<kDp>::kDT; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      T* p = sO + (g + 8 * r) * kStride + i * 8 + 2 * t;
      float x0 = w.o[i][2 * r] * inv[r];
      float x1 = w.o[i][2 * r + 1] * inv[r];
      if (residual) {
        x0 += to_float(p[0]);
        x1 += to_float(p[1]);
      }
      *reinterpret_cast<uint32_t*>(p) = Mma<T>::pack(x0, x1);
    }
  }
  __syncwarp();
  constexpr int kChunks = kDp / 8;
#pragma unroll
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks;
    const int c = i - r * kChunks;
    const int row = row0 + r;
    T* dst = row < n_rows                              ? out + static_cast<int64_t>(row) * os2
             : (row == n_rows && extra_out != nullptr) ? extra_out
                                                       : nullptr;
    if (dst != nullptr && c * 8 < D) {
      *reinterpret_cast<uint4*>(dst + c * 8) = *reinterpret_cast<const uint4*>(sO + r * kStride + c * 8);
    }
  }
}

// ------------------------------------------------------------------ fp32 CUDA-core kernels
// The float32 kernels give each query row a quad of 4 threads; thread c of the quad owns keys
// c, c + 4, ... of a key block (kJ of them) and output columns 4c..4c+3 of every 16-wide slice
// (kI slices). Shared by attention.cu and pool_attention.cu.

// Tile sizes and shared-memory layout of a float32 quad kernel: 32 query rows per CTA, 4 threads per
// row, keys in blocks of 32; row-major float tiles Q, K, V (row stride kStride) and P (kPStride).
template <int kDp>
struct QuadTraits {
  static constexpr int kBlockM = 32;       // query rows per CTA
  static constexpr int kBlockN = 32;       // keys per iteration
  static constexpr int kThreads = 128;     // 4 threads per query row
  static constexpr int kStride = kDp + 4;  // floats; (kStride / 4) odd → conflict-free float4
  static constexpr int kPStride = kBlockN + 4;
  static constexpr int kJ = kBlockN / 4;  // scores per thread per key block (keys c, c + 4, ...)
  static constexpr int kI = kDp / 16;     // float4 output groups per thread (dims 16i + 4c .. + 3)
  static constexpr int kTileFloats = (kBlockM + 2 * kBlockN) * kStride + kBlockM * kPStride;
  static constexpr int kSmemBytes = kTileFloats * 4;
  static_assert(kDp % 16 == 0 && kDp <= 128, "padded head dim must be a multiple of 16, <= 128");
  static_assert(((kStride / 4) & 1) == 1, "row stride in 16B units must be odd");
};

// The quad kernel's tiles at the start of dynamic shared memory; `rest` is the first float after them.
template <int kDp>
struct QuadTiles {
  float* q;
  float* k;
  float* v;
  float* p;
  float* rest;

  __device__ __forceinline__ explicit QuadTiles(unsigned char* smem) {
    using Tr = QuadTraits<kDp>;
    q = reinterpret_cast<float*>(smem);
    k = q + Tr::kBlockM * Tr::kStride;
    v = k + Tr::kBlockN * Tr::kStride;
    p = v + Tr::kBlockN * Tr::kStride;
    rest = p + Tr::kBlockM * Tr::kPStride;
  }
};

// Output accumulator and online-softmax statistics of one thread of a query row's quad.
template <int kDp>
struct QuadRow {
  float o[QuadTraits<kDp>::kI][4];
  float row_max;
  float row_sum;  // partial over this thread's keys; total() reduces it over the quad

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int i = 0; i < QuadTraits<kDp>::kI; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    row_max = -INFINITY;
    row_sum = 0.f;
  }

  __device__ __forceinline__ float total() const {
    float l = row_sum;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return l;
  }
};

// s[jj] = q_row · k_{c + 4·jj} over the (padded) head dim, from row-major smem tiles.
template <int kJ, int kDp, int kStride>
__device__ __forceinline__ void quad_scores(float (&s)[kJ], const float* qrow, const float* sK, int c) {
#pragma unroll
  for (int jj = 0; jj < kJ; ++jj) s[jj] = 0.f;
#pragma unroll
  for (int d = 0; d < kDp; d += 4) {
    const float4 qv = *reinterpret_cast<const float4*>(qrow + d);
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) {
      const float4 kv = *reinterpret_cast<const float4*>(sK + (c + 4 * jj) * kStride + d);
      s[jj] = fmaf(qv.x, kv.x, s[jj]);
      s[jj] = fmaf(qv.y, kv.y, s[jj]);
      s[jj] = fmaf(qv.z, kv.z, s[jj]);
      s[jj] = fmaf(qv.w, kv.w, s[jj]);
    }
  }
}

// One online-softmax step on log2-domain scores s (masked keys already -inf): the quad's row max,
// the rescale of row_sum and o, P written to the row's smem slice prow (read back by the whole
// quad), and o += P·V over the kBN keys of the block.
template <int kDp>
__device__ __forceinline__ void quad_softmax_pv(float (&s)[QuadTraits<kDp>::kJ], QuadRow<kDp>& row, float* prow,
                                                const float* sV, int c) {
  using Tr = QuadTraits<kDp>;
  constexpr int kJ = Tr::kJ;
  constexpr int kI = Tr::kI;
  constexpr int kBN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;
  float& row_max = row.row_max;
  float& row_sum = row.row_sum;
  float(&o)[kI][4] = row.o;
  float new_max = row_max;
#pragma unroll
  for (int jj = 0; jj < kJ; ++jj) new_max = fmaxf(new_max, s[jj]);
  new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 1));
  new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 2));
  const float m_use = (new_max == -INFINITY) ? 0.f : new_max;
  const float alpha = exp2f(row_max - m_use);
  row_max = new_max;
  row_sum *= alpha;
#pragma unroll
  for (int jj = 0; jj < kJ; ++jj) {
    const float p = exp2f(s[jj] - m_use);
    row_sum += p;
    prow[c + 4 * jj] = p;
  }
#pragma unroll
  for (int i = 0; i < kI; ++i) {
    o[i][0] *= alpha;
    o[i][1] *= alpha;
    o[i][2] *= alpha;
    o[i][3] *= alpha;
  }
  __syncwarp();  // the row's P is written by its own quad (same warp)
#pragma unroll
  for (int n = 0; n < kBN; n += 4) {
    const float4 p4 = *reinterpret_cast<const float4*>(prow + n);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pe = e == 0 ? p4.x : e == 1 ? p4.y : e == 2 ? p4.z : p4.w;
      const float* vrow = sV + (n + e) * kStride + 4 * c;
#pragma unroll
      for (int i = 0; i < kI; ++i) {
        const float4 vv = *reinterpret_cast<const float4*>(vrow + 16 * i);
        o[i][0] = fmaf(pe, vv.x, o[i][0]);
        o[i][1] = fmaf(pe, vv.y, o[i][1]);
        o[i][2] = fmaf(pe, vv.z, o[i][2]);
        o[i][3] = fmaf(pe, vv.w, o[i][3]);
      }
    }
  }
  __syncwarp();  // P row reads done before the next block overwrites it
}

// The key loop of a float32 quad kernel, the row's Q in qrow (landed): per block of kBlockN keys, K and
// V are copied to shared memory (`stage(n0)` runs while they land: per-key data of the block, n0 = its
// first key), each thread forms its scores q·k_col of keys col = n0 + c + 4jj, `score(dot, col, jj)`
// turns one into the log2-domain score (keys ≥ Nk then get -inf), and one quad_softmax_pv step follows.
// k, v: the (b, h) bases, row strides ks, vs.
template <int kDp, typename Stage, typename Score>
__device__ __forceinline__ void quad_key_loop(QuadRow<kDp>& row, const QuadTiles<kDp>& sm, const float* qrow,
                                              const float* k, int64_t ks, const float* v, int64_t vs, int Nk, int D,
                                              int r, int c, Stage&& stage, Score&& score) {
  using Tr = QuadTraits<kDp>;
  const int n_blocks = (Nk + Tr::kBlockN - 1) / Tr::kBlockN;
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * Tr::kBlockN;
    __syncthreads();  // every thread is done with the previous block's tiles and staged data
    load_tile_async<float, Tr::kBlockN, kDp, Tr::kStride, Tr::kThreads>(sm.k, k, ks, n0, Nk, D);
    load_tile_async<float, Tr::kBlockN, kDp, Tr::kStride, Tr::kThreads>(sm.v, v, vs, n0, Nk, D);
    cp_async_commit();
    stage(n0);
    cp_async_wait_all();
    __syncthreads();

    float s[Tr::kJ];
    quad_scores<Tr::kJ, kDp, Tr::kStride>(s, qrow, sm.k, c);
#pragma unroll
    for (int jj = 0; jj < Tr::kJ; ++jj) {
      const int col = n0 + c + 4 * jj;
      float x = score(s[jj], col, jj);
      if (col >= Nk) x = -INFINITY;
      s[jj] = x;
    }
    quad_softmax_pv<kDp>(s, row, sm.p + r * Tr::kPStride, sm.v, c);
  }
}

}  // namespace mma_attention
}  // namespace vitkernels
