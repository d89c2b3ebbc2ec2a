// vitkernels — fused Swin window attention forward. Math and layout: window_attention.h; design
// and cost: docs/window_attention.md.
#include "window_attention.h"
#include "common.cuh"
#include "ptx_sm80.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vitkernels {
namespace {

constexpr float kMaskLog2 = -100.0f * 1.4426950408889634f;  // the −100 shift mask, log2 domain
constexpr int kMaxWindow = 16;                              // N = M² <= 256 slots
constexpr int kMaxHeadDim = 128;
constexpr int kThreads = 128;                         // 4 warps per CTA, both kernels
constexpr float kLogitScaleMax = 4.605170185988092f;  // Swin V2 clamps logit_scale at ln 100
constexpr float kNormEps = 1e-12f;                    // F.normalize's eps

using namespace ptx;  // smem_addr, ldmatrix_x4_trans, Mma<T> (ptx_sm80.cuh)

// Kernel arguments (geometry resolved on the host).
struct WaArgs {
  const void* qkv;
  const void* table;
  const void* qkv_bias;
  void* out;
  int64_t s_b, s_t;  // qkv element strides (batch, token); channel stride is 1
  int64_t tab_s0, tab_s1;
  int H, W, Hp, Wp, nWw, nW, C, heads, D, M, shift, N;
  float scale_log2;  // scale · log2(e); 1 with logit_scale (unused: τ_h·log2 e is read on the device)
  // The options, appended so that the default path's parameter layout (and ptxas's register
  // allocation of its kernels) stays as before: shift_first in bit 0, (s mod H, s mod W) in bits
  // 8-15 / 16-23 (s < M <= 16); logit_scale (heads,) contiguous, nullable (cosine attention).
  int opts;
  const void* logit_scale;
};

__device__ __forceinline__ bool opt_shift_first(const WaArgs& a) { return (a.opts & 1) != 0; }

// Per-slot metadata, shared by all threads of a CTA:
//   info[t] = rel_t | (label_t << 12) with rel_t = p·(2M−1) + c (< 961), or −1 for t ≥ N;
//   tok[t]  = source token (≥ 0), −1 for a padded slot, −2 for t ≥ N.
// rel-pos index of (i, j) = rel_i + 2M·(M−1) − rel_j.
// slot_meta: slot t of window (wh, ww) in registers; fill_slots: a window's slots into shared memory.
struct SlotMeta {
  int tok, info;
};

__device__ __forceinline__ SlotMeta slot_meta(const WaArgs& a, int wh, int ww, int t) {
  if (t >= a.N) return {-2, -1};
  const int p = t / a.M;
  const int c = t - p * a.M;
  const int y = wh * a.M + p;
  const int x = ww * a.M + c;
  int row, col;
  bool real;
  if (opt_shift_first(a)) {
    real = y < a.H && x < a.W;
    row = y + ((a.opts >> 8) & 0xff);
    col = x + ((a.opts >> 16) & 0xff);
    if (row >= a.H) row -= a.H;
    if (col >= a.W) col -= a.W;
  } else {
    row = y + a.shift;
    col = x + a.shift;
    if (row >= a.Hp) row -= a.Hp;
    if (col >= a.Wp) col -= a.Wp;
    real = row < a.H && col < a.W;
  }
  int label = 0;
  if (a.shift > 0) {
    const int rh = (y >= a.Hp - a.M ? 1 : 0) + (y >= a.Hp - a.shift ? 1 : 0);
    const int rw = (x >= a.Wp - a.M ? 1 : 0) + (x >= a.Wp - a.shift ? 1 : 0);
    label = 3 * rh + rw;
  }
  return {real ? row * a.W + col : -1, (p * (2 * a.M - 1) + c) | (label << 12)};
}

__device__ __forceinline__ void fill_slots(const WaArgs& a, int w, int n_slots, int* s_info, int* s_tok) {
  const int wh = w / a.nWw;
  const int ww = w - wh * a.nWw;
  for (int t = threadIdx.x; t < n_slots; t += blockDim.x) {
    const SlotMeta sm = slot_meta(a, wh, ww, t);
    s_info[t] = sm.info;
    s_tok[t] = sm.tok;
  }
}

// The table column of head h as fp32 · log2(e).
template <typename T>
__device__ __forceinline__ void fill_table(const WaArgs& a, int h, float* s_tab) {
  const int n = (2 * a.M - 1) * (2 * a.M - 1);
  const T* tab = static_cast<const T*>(a.table);
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    s_tab[e] = to_float(tab[e * a.tab_s0 + h * a.tab_s1]) * kLog2e;
  }
}

// Cosine attention: τ_h · log2(e), τ_h = exp(min(logit_scale[h], ln 100)).
template <typename T>
__device__ __forceinline__ float cosine_scale_log2(const WaArgs& a, int h) {
  const float ls = to_float(static_cast<const T*>(a.logit_scale)[h]);
  return expf(fminf(ls, kLogitScaleMax)) * kLog2e;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Cosine attention, a warp per row of a shared-memory tile (row stride `stride` elements, `cols`
// columns): inv[r] = 1 / max(‖row r‖₂, 1e-12) in fp32 (inv == nullptr: the rows are replaced by
// x·inv instead, rounded back to T), by `warps` warps from warp0 on (rows warp0, warp0 + warps, …).
// The caller synchronises before and after.
template <typename T>
__device__ __forceinline__ void row_inv_norms_warps(T* tile, int rows, int stride, int cols, float* inv_out, int warp0,
                                                    int warps) {
  const int lane = threadIdx.x & 31;
  for (int r = warp0; r < rows; r += warps) {
    T* row = tile + r * stride;
    float ss = 0.0f;
    for (int c = lane; c < cols; c += 32) {
      const float v = to_float(row[c]);
      ss += v * v;
    }
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), kNormEps);
    if (inv_out != nullptr) {
      if (lane == 0) inv_out[r] = inv;
    } else {
      for (int c = lane; c < cols; c += 32) row[c] = from_float<T>(to_float(row[c]) * inv);
    }
  }
}

// row_inv_norms_warps by all warps of the CTA, rows shared out warp by warp.
template <typename T>
__device__ __forceinline__ void row_inv_norms(T* tile, int rows, int stride, int cols, float* inv_out) {
  row_inv_norms_warps(tile, rows, stride, cols, inv_out, static_cast<int>(threadIdx.x >> 5), kThreads / 32);
}

// The two T values packed in u (lo = low 16 bits), as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  T v[2];
  memcpy(v, &u, sizeof(v));
  return make_float2(to_float(v[0]), to_float(v[1]));
}

template <typename T>
__device__ __forceinline__ float sq2(uint32_t u) {
  const float2 f = unpack2<T>(u);
  return f.x * f.x + f.y * f.y;
}

// Row `part` (0 = q, 1 = k, 2 = v) of slot `tok` for head h: a real token row, the qkv_bias row
// (padded slot) or nullptr (zeros: padded slot without qkv_bias, or a slot ≥ N).
template <typename T>
__device__ __forceinline__ const T* slot_row(const WaArgs& a, const T* qkv_b, int tok, int part, int h) {
  const int64_t off = static_cast<int64_t>(part) * a.C + static_cast<int64_t>(h) * a.D;
  if (tok >= 0) return qkv_b + static_cast<int64_t>(tok) * a.s_t + off;
  if (tok == -1 && a.qkv_bias != nullptr) return static_cast<const T*>(a.qkv_bias) + off;
  return nullptr;
}

// Bias + mask of score (row with rel_base / label_i, key with info_j), log2 domain;
// −inf for key slots ≥ N.
__device__ __forceinline__ float score_extra(const WaArgs& a, const float* s_tab, int base_i, int label_i, int info_j) {
  if (info_j < 0) return -INFINITY;
  float e = 0.0f;
  if (a.table != nullptr) e += s_tab[base_i - (info_j & 0xfff)];
  if (a.shift > 0 && label_i != (info_j >> 12)) e += kMaskLog2;
  return e;
}

// Score scales of a warp's rows r0 / r1 under cosine attention: τ·log2 e / max(‖q‖, 1e-12), from
// the rows' Q fragments (a quad's four lanes hold all columns of its two rows), applied to the fp32
// score with the key's 1 / max(‖k‖, 1e-12): q̂·k̂ᵀ without rounding q̂ or k̂ to T.
template <typename T, int kKQ>
__device__ __forceinline__ void cosine_row_scales(const WaArgs& a, int h, const uint32_t (&qa)[kKQ][4], float& sc0,
                                                  float& sc1) {
  const float cos_scale = cosine_scale_log2<T>(a, h);
  float ss0 = 0.0f, ss1 = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kKQ; ++kk) {
    ss0 += sq2<T>(qa[kk][0]) + sq2<T>(qa[kk][2]);
    ss1 += sq2<T>(qa[kk][1]) + sq2<T>(qa[kk][3]);
  }
  ss0 += __shfl_xor_sync(0xffffffffu, ss0, 1);
  ss0 += __shfl_xor_sync(0xffffffffu, ss0, 2);
  ss1 += __shfl_xor_sync(0xffffffffu, ss1, 1);
  ss1 += __shfl_xor_sync(0xffffffffu, ss1, 2);
  sc0 = cos_scale / fmaxf(sqrtf(ss0), kNormEps);
  sc1 = cos_scale / fmaxf(sqrtf(ss1), kNormEps);
}

// s += Q·Kᵀ of one 8-key tile: Q fragments qa against the K rows at krow (the lane's row and column
// already added) in shared memory.
template <typename T, int kKQ>
__device__ __forceinline__ void qk_mma(float (&s)[4], const T* krow, const uint32_t (&qa)[kKQ][4]) {
#pragma unroll
  for (int kk = 0; kk < kKQ; ++kk) {
    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
    Mma<T>::run(s, qa[kk], b0, b1);
  }
}

// Base-2 scores of one chunk of kNT 8-key tiles from key slot kc for a warp's rows r0 / r1: Q·Kᵀ times
// the row scales (sc0, sc1; the scale, or τ/‖q‖ with the keys' 1/‖k‖ in sKn under cosine attention),
// plus extra(r, info_j), the bias and mask of row r (0: r0, 1: r1) against key info_j; −inf past NP.
template <typename T, int kKQ, int kNT, bool kCosine, typename Extra>
__device__ __forceinline__ void chunk_scores(float (&s)[kNT][4], const T* sK, int kStride, int kc, int NP, int g, int t,
                                             const uint32_t (&qa)[kKQ][4], const int* sInfo, const float* sKn,
                                             float sc0, float sc1, Extra extra) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    const int key0 = kc + nt * 8;
    if (key0 < NP) {
      qk_mma<T, kKQ>(s[nt], sK + (key0 + g) * kStride + 2 * t, qa);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int info_j = sInfo[key0 + 2 * t + e];
        if constexpr (kCosine) {
          const float kn = sKn[key0 + 2 * t + e];
          s[nt][e] = s[nt][e] * sc0 * kn + extra(0, info_j);
          s[nt][2 + e] = s[nt][2 + e] * sc1 * kn + extra(1, info_j);
        } else {
          s[nt][e] = s[nt][e] * sc0 + extra(0, info_j);
          s[nt][2 + e] = s[nt][2 + e] * sc1 + extra(1, info_j);
        }
      }
    } else {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = -INFINITY;
    }
  }
}

// O += P · V of one 16-key step: P from the fp32 scores of two 8-key tiles (s_lo, s_hi), rounded to
// T, against the V rows at vrow (the lane's ldmatrix row and column already added).
template <typename T, int kDp>
__device__ __forceinline__ void pv_mma(float (&o)[kDp / 8][4], const float (&s_lo)[4], const float (&s_hi)[4],
                                       const T* vrow) {
  uint32_t pa[4];
  pa[0] = Mma<T>::pack(s_lo[0], s_lo[1]);
  pa[1] = Mma<T>::pack(s_lo[2], s_lo[3]);
  pa[2] = Mma<T>::pack(s_hi[0], s_hi[1]);
  pa[3] = Mma<T>::pack(s_hi[2], s_hi[3]);
#pragma unroll
  for (int dp = 0; dp < kDp / 16; ++dp) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, vrow + dp * 16);
    Mma<T>::run(o[2 * dp], pa, vb[0], vb[1]);
    Mma<T>::run(o[2 * dp + 1], pa, vb[2], vb[3]);
  }
}

// An accumulator tile's rows r0 (elements 0, 1) and r1 (2, 3) rescaled by the online softmax.
template <int kTiles>
__device__ __forceinline__ void scale_rows(float (&o)[kTiles][4], float al0, float al1) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    o[i][0] *= al0;
    o[i][1] *= al0;
    o[i][2] *= al1;
    o[i][3] *= al1;
  }
}

// The online softmax's step over one chunk of base-2 scores of rows r0 / r1 (s: a thread's part of
// the chunk; m, l: the running maxima and thread-partial sums, which the quad reduces at the end): the
// chunk's weights exp2(s − m_new) in place of s, and the output accumulator rescaled for the new maxima.
template <int kNT, int kTiles>
__device__ __forceinline__ void online_softmax_step(float (&s)[kNT][4], float& m0, float& m1, float& l0, float& l1,
                                                    float (&o)[kTiles][4]) {
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
    mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
  const float al0 = exp2f(m0 - mn0), al1 = exp2f(m1 - mn1);
  m0 = mn0;
  m1 = mn1;
  float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    s[nt][0] = exp2f(s[nt][0] - mn0);
    s[nt][1] = exp2f(s[nt][1] - mn0);
    s[nt][2] = exp2f(s[nt][2] - mn1);
    s[nt][3] = exp2f(s[nt][3] - mn1);
    sum0 += s[nt][0] + s[nt][1];
    sum1 += s[nt][2] + s[nt][3];
  }
  l0 = l0 * al0 + sum0;
  l1 = l1 * al1 + sum1;
  scale_rows(o, al0, al1);
}

// The sum of v over the four lanes of a quad (the lanes that share a row of an mma tile).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 tensor-core kernel: one CTA per (b, window, head); K, V of the window resident.
// ---------------------------------------------------------------------------------------------
// One warp's 16 query rows (r0 = g, r1 = g + 8 of the quad layout) against all NP key slots in
// chunks of kNT 8-key tiles: online softmax (log2 domain) and O = P·V in 16-key steps. Leaves o
// unnormalised and l0 / l1 the rows' full sums (quad-reduced). ``extra(r, info_j)``: the bias and
// mask term of row r (0 / 1) and key j. Key slot 0 is always valid, so m is finite after chunk 0.
template <typename T, int kKQ, int kNT, int kDp, bool kCosine, typename Extra>
__device__ __forceinline__ void attend_keys(float (&o)[kDp / 8][4], float& l0, float& l1, const T* sK, const T* sV,
                                            int kStride, int NP, int g, int t, int lane, const uint32_t (&qa)[kKQ][4],
                                            const int* sInfo, const float* sKn, float sc0, float sc1, Extra extra) {
  constexpr int kChunk = kNT * 8;
#pragma unroll
  for (int i = 0; i < kDp / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY;
  l0 = l1 = 0.0f;
  for (int kc = 0; kc < NP; kc += kChunk) {
    float s[kNT][4];
    chunk_scores<T, kKQ, kNT, kCosine>(s, sK, kStride, kc, NP, g, t, qa, sInfo, sKn, sc0, sc1, extra);
    online_softmax_step(s, m0, m1, l0, l1, o);
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      const int key0 = kc + ks * 16;
      if (key0 < NP) {
        pv_mma<T, kDp>(o, s[2 * ks], s[2 * ks + 1], sV + (key0 + (lane & 15)) * kStride + (lane >> 4) * 8);
      }
    }
  }
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);
}

// out rows of tokens tok0 / tok1 (−1: a padded slot, not stored) of image b, head h: o / l in T,
// the thread's two head dims per 8-dim tile.
template <typename T, int kDT>
__device__ __forceinline__ void store_out_rows(const WaArgs& a, int64_t b, int h, int tok0, int tok1,
                                               const float (&o)[kDT][4], float l0, float l1, int t) {
  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  const int64_t L = static_cast<int64_t>(a.H) * a.W;
  const int64_t head_off = static_cast<int64_t>(h) * a.D;
  T* out = static_cast<T*>(a.out);
  T* out0 = tok0 >= 0 ? out + (b * L + tok0) * a.C + head_off : nullptr;
  T* out1 = tok1 >= 0 ? out + (b * L + tok1) * a.C + head_off : nullptr;
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
    const int col = i * 8 + 2 * t;
    if (col < a.D) {
      if (out0 != nullptr) *reinterpret_cast<uint32_t*>(out0 + col) = Mma<T>::pack(o[i][0] * inv0, o[i][1] * inv0);
      if (out1 != nullptr) *reinterpret_cast<uint32_t*>(out1 + col) = Mma<T>::pack(o[i][2] * inv1, o[i][3] * inv1);
    }
  }
}

template <int kDp>
struct MmaTraits {
  static constexpr int kStride = kDp + 8;  // padded smem row (elements): conflict-free ldmatrix
  static_assert(kDp % 16 == 0 && kDp <= 128, "padded head dim must be a multiple of 16, <= 128");
  static_assert(((kStride * 2 / 16) & 1) == 1, "row stride in 16B units must be odd");
};

template <typename T, int kDp, bool kCosine>
__global__ void __launch_bounds__(kThreads) window_attention_fwd_mma_kernel(const WaArgs a) {
#if VK_SM80
  constexpr int kStride = MmaTraits<kDp>::kStride;
  constexpr int kKQ = kDp / 16;  // k-steps of q·kᵀ
  constexpr int kDT = kDp / 8;   // output n-tiles (8 head dims each)
  constexpr int kChunk = 64;     // keys per online-softmax step
  constexpr int kNT = kChunk / 8;

  const int NP = (a.N + 15) & ~15;  // slots rounded up to whole 16-row MMA tiles
  const int tab_n = (2 * a.M - 1) * (2 * a.M - 1);
  extern __shared__ __align__(16) unsigned char wa_smem[];
  T* sK = reinterpret_cast<T*>(wa_smem);
  T* sV = sK + NP * kStride;
  float* sTab = reinterpret_cast<float*>(sV + NP * kStride);
  int* sInfo = reinterpret_cast<int*>(sTab + tab_n);
  int* sTok = sInfo + NP;
  float* sKn = reinterpret_cast<float*>(sTok + NP);  // kCosine: 1 / max(‖k_j‖, 1e-12)

  const unsigned bid = blockIdx.x;
  const int h = static_cast<int>(bid % static_cast<unsigned>(a.heads));
  const unsigned bw = bid / static_cast<unsigned>(a.heads);
  const int w = static_cast<int>(bw % static_cast<unsigned>(a.nW));
  const int64_t b = static_cast<int64_t>(bw / static_cast<unsigned>(a.nW));
  const T* qkv_b = static_cast<const T*>(a.qkv) + b * a.s_b;

  fill_slots(a, w, NP, sInfo, sTok);
  if (a.table != nullptr) fill_table<T>(a, h, sTab);
  __syncthreads();

  // Gather K and V rows (16-byte chunks); slots ≥ N and head dims ≥ D are zero.
  {
    constexpr int kChunks = kDp / 8;
    const int per_part = NP * kChunks;
    for (int i = threadIdx.x; i < 2 * per_part; i += kThreads) {
      const int part = i / per_part;
      const int rem = i - part * per_part;
      const int r = rem / kChunks;
      const int c = rem - r * kChunks;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (c * 8 < a.D) {
        const T* src = slot_row<T>(a, qkv_b, sTok[r], part + 1, h);
        if (src != nullptr) val = *reinterpret_cast<const uint4*>(src + c * 8);
      }
      T* dst = (part == 0 ? sK : sV) + r * kStride + c * 8;
      *reinterpret_cast<uint4*>(dst) = val;
    }
  }
  __syncthreads();
  if constexpr (kCosine) {  // exact inputs to the MMAs; the norms scale the fp32 scores
    row_inv_norms<T>(sK, NP, kStride, kDp, sKn);
    __syncthreads();
  }

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int rel_shift = 2 * a.M * (a.M - 1);

  for (int rb = warp; rb * 16 < NP; rb += kThreads / 32) {
    const int r0 = rb * 16 + g;
    const int r1 = r0 + 8;
    const int tok0 = sTok[r0], tok1 = sTok[r1];
    const int info0 = sInfo[r0], info1 = sInfo[r1];
    // Slots ≥ N act as (p, c) = (0, 0), label 0: computed, never stored.
    const int base0 = (info0 < 0 ? 0 : (info0 & 0xfff)) + rel_shift;
    const int base1 = (info1 < 0 ? 0 : (info1 & 0xfff)) + rel_shift;
    const int lab0 = info0 < 0 ? 0 : (info0 >> 12);
    const int lab1 = info1 < 0 ? 0 : (info1 >> 12);

    // Q fragments straight from global (A operand, row-major 16 × kDp).
    uint32_t qa[kKQ][4];
    {
      const T* q0 = slot_row<T>(a, qkv_b, tok0, 0, h);
      const T* q1 = slot_row<T>(a, qkv_b, tok1, 0, h);
#pragma unroll
      for (int kk = 0; kk < kKQ; ++kk) {
        const int c0 = kk * 16 + 2 * t;
        const int c1 = c0 + 8;
        const bool in0 = c0 < a.D, in1 = c1 < a.D;
        qa[kk][0] = (q0 != nullptr && in0) ? *reinterpret_cast<const uint32_t*>(q0 + c0) : 0u;
        qa[kk][1] = (q1 != nullptr && in0) ? *reinterpret_cast<const uint32_t*>(q1 + c0) : 0u;
        qa[kk][2] = (q0 != nullptr && in1) ? *reinterpret_cast<const uint32_t*>(q0 + c1) : 0u;
        qa[kk][3] = (q1 != nullptr && in1) ? *reinterpret_cast<const uint32_t*>(q1 + c1) : 0u;
      }
    }
    // Score scale of rows r0 / r1: scale·log2 e, or (cosine) τ·log2 e / max(‖q‖, 1e-12), applied
    // to the fp32 score with the key's 1 / max(‖k‖, 1e-12): q̂·k̂ᵀ without rounding q̂ or k̂ to T.
    // The quad's four lanes hold all columns of their two rows.
    [[maybe_unused]] float sc0 = a.scale_log2, sc1 = a.scale_log2;
    if constexpr (kCosine) cosine_row_scales<T, kKQ>(a, h, qa, sc0, sc1);

    float o[kDT][4], l0, l1;
    attend_keys<T, kKQ, kNT, kDp, kCosine>(
        o, l0, l1, sK, sV, kStride, NP, g, t, lane, qa, sInfo, sKn, sc0, sc1, [&](int r, int info_j) {
          return r == 0 ? score_extra(a, sTab, base0, lab0, info_j) : score_extra(a, sTab, base1, lab1, info_j);
        });
    store_out_rows<T, kDT>(a, b, h, tok0, tok1, o, l0, l1, t);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// float32 CUDA-core kernel: 4 threads per query row (thread r owns head dims r, r + 4, …),
// 32 query rows per pass, keys streamed through shared memory in chunks of 32.
// ---------------------------------------------------------------------------------------------
constexpr int kF32Rows = kThreads / 4;  // 32 query rows per pass
constexpr int kF32Keys = 32;            // keys per chunk

// One chunk of kF32Keys staged keys for the fp32 kernels' query row (4 threads a row, thread r owning
// head dims r, r + 4, …): the scores (dot product over the quad, scale, bias and mask, base 2), the
// online softmax (m, l) and the output accumulator o. Key 0 is valid, so m is finite after chunk 0.
// K and V rows of key slots kc … kc + kF32Keys − 1 into sK / sV (kDp floats a row, 16-byte
// chunks; slots ≥ N and head dims ≥ D are zero), by threads tid of nthreads.
template <int kDp>
__device__ __forceinline__ void stage_f32_keys(const WaArgs& a, const float* qkv_b, const int* sTok, int kc, int h,
                                               float* sK, float* sV, int tid, int nthreads) {
  constexpr int kChunks4 = kDp / 4;
  for (int e = tid; e < 2 * kF32Keys * kChunks4; e += nthreads) {
    const int part = e / (kF32Keys * kChunks4);
    const int rem = e - part * (kF32Keys * kChunks4);
    const int j = rem / kChunks4;
    const int c = rem - j * kChunks4;
    float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (kc + j < a.N && c * 4 < a.D) {
      const float* src = slot_row<float>(a, qkv_b, sTok[kc + j], part + 1, h);
      if (src != nullptr) val = *reinterpret_cast<const float4*>(src + c * 4);
    }
    *reinterpret_cast<float4*>((part == 0 ? sK : sV) + j * kDp + c * 4) = val;
  }
}

template <int kDp>
__device__ __forceinline__ void f32_chunk_step(const WaArgs& a, const float (&q)[kDp / 4], const float* sK,
                                               const float* sV, const int* sInfo, const float* sTab, int kc, int r,
                                               int base_i, int lab_i, float& m, float& l, float (&o)[kDp / 4]) {
  constexpr int kPer = kDp / 4;
  float s[kF32Keys];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kF32Keys; ++j) {
    float acc = 0.0f;
#pragma unroll
    for (int ii = 0; ii < kPer; ++ii) acc = fmaf(q[ii], sK[j * kDp + ii * 4 + r], acc);
    acc = quad_sum(acc);
    const int key = kc + j;
    const int info_j = key < a.N ? sInfo[key] : -1;
    s[j] = acc * a.scale_log2 + score_extra(a, sTab, base_i, lab_i, info_j);
    mx = fmaxf(mx, s[j]);
  }
  const float mn = fmaxf(m, mx);
  const float alpha = exp2f(m - mn);
  m = mn;
  float sum = 0.0f;
#pragma unroll
  for (int ii = 0; ii < kPer; ++ii) o[ii] *= alpha;
#pragma unroll
  for (int j = 0; j < kF32Keys; ++j) {
    const float pj = exp2f(s[j] - mn);
    sum += pj;
#pragma unroll
    for (int ii = 0; ii < kPer; ++ii) o[ii] = fmaf(pj, sV[j * kDp + ii * 4 + r], o[ii]);
  }
  l = l * alpha + sum;
}

template <int kDp, bool kCosine>
__global__ void __launch_bounds__(kThreads) window_attention_fwd_f32_kernel(const WaArgs a) {
  static_assert(kDp % 32 == 0 && kDp <= 128, "fp32 padded head dim must be a multiple of 32");
  constexpr int kPer = kDp / 4;
  const int NQ = (a.N + kF32Rows - 1) / kF32Rows * kF32Rows;
  const int tab_n = (2 * a.M - 1) * (2 * a.M - 1);
  extern __shared__ __align__(16) unsigned char wa_smem[];
  float* sK = reinterpret_cast<float*>(wa_smem);
  float* sV = sK + kF32Keys * kDp;
  float* sTab = sV + kF32Keys * kDp;
  int* sInfo = reinterpret_cast<int*>(sTab + tab_n);
  int* sTok = sInfo + NQ;

  const unsigned bid = blockIdx.x;
  const int h = static_cast<int>(bid % static_cast<unsigned>(a.heads));
  const unsigned bw = bid / static_cast<unsigned>(a.heads);
  const int w = static_cast<int>(bw % static_cast<unsigned>(a.nW));
  const int64_t b = static_cast<int64_t>(bw / static_cast<unsigned>(a.nW));
  const float* qkv_b = static_cast<const float*>(a.qkv) + b * a.s_b;

  fill_slots(a, w, NQ, sInfo, sTok);
  if (a.table != nullptr) fill_table<float>(a, h, sTab);
  __syncthreads();

  const int r = threadIdx.x & 3;
  const int qr = threadIdx.x >> 2;
  const int rel_shift = 2 * a.M * (a.M - 1);
  const int64_t L = static_cast<int64_t>(a.H) * a.W;

  for (int qb = 0; qb < NQ; qb += kF32Rows) {
    const int i = qb + qr;
    const int tok_i = sTok[i];
    const int info_i = sInfo[i];
    const int base_i = (info_i < 0 ? 0 : (info_i & 0xfff)) + rel_shift;
    const int lab_i = info_i < 0 ? 0 : (info_i >> 12);
    float q[kPer], o[kPer];
    {
      const float* qrow = slot_row<float>(a, qkv_b, tok_i, 0, h);
#pragma unroll
      for (int ii = 0; ii < kPer; ++ii) {
        const int d = ii * 4 + r;
        q[ii] = (qrow != nullptr && d < a.D) ? qrow[d] : 0.0f;
        o[ii] = 0.0f;
      }
      if constexpr (kCosine) {  // q̂·τ·log2 e in registers (scale_log2 = 1); the row's 4 threads are adjacent lanes
        float ss = 0.0f;
#pragma unroll
        for (int ii = 0; ii < kPer; ++ii) ss = fmaf(q[ii], q[ii], ss);
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        const float f = cosine_scale_log2<float>(a, h) / fmaxf(sqrtf(ss), kNormEps);
#pragma unroll
        for (int ii = 0; ii < kPer; ++ii) q[ii] *= f;
      }
    }
    float m = -INFINITY, l = 0.0f;

    for (int kc = 0; kc < a.N; kc += kF32Keys) {
      __syncthreads();  // previous chunk fully consumed
      stage_f32_keys<kDp>(a, qkv_b, sTok, kc, h, sK, sV, threadIdx.x, kThreads);
      __syncthreads();
      if constexpr (kCosine) {  // k̂ of this chunk, in place
        row_inv_norms<float>(sK, kF32Keys, kDp, kDp, nullptr);
        __syncthreads();
      }

      f32_chunk_step<kDp>(a, q, sK, sV, sInfo, sTab, kc, r, base_i, lab_i, m, l, o);  // m finite after chunk 0
    }

    if (i < a.N && tok_i >= 0) {
      float* orow = static_cast<float*>(a.out) + (b * L + tok_i) * a.C + static_cast<int64_t>(h) * a.D;
      const float inv = 1.0f / l;
#pragma unroll
      for (int ii = 0; ii < kPer; ++ii) {
        const int d = ii * 4 + r;
        if (d < a.D) orow[d] = o[ii] * inv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// v2 kernels (the default; v1 above stays selectable: kernel_version = 1). Three changes:
//  (a) each thread computes the slot → token map of its own rows in registers, so its Q rows (and,
//      in the mma kernel, its K/V rows) are loaded before the CTA's first barrier: the Q loads are
//      in flight while K and V are staged, and the metadata → K/V barrier of v1 is gone;
//  (b) kWin (batch, window, head) items per CTA, a 4-warp half each (item = kWin·blockIdx.x +
//      half), with separate shared memory; the halves share only the CTA-wide barriers, which
//      both pass the same number of times (an idle half, past the last item, passes them too);
//  (c) the mma kernel's online softmax steps over 16 keys (v1: 64), so D = 32 fits 80 registers
//      and three 8-warp CTAs (24 warps) fit an SM where v1 holds five 4-warp CTAs (20 warps).
// fp32 takes (a) only (kF32V2Win = 1).
// ---------------------------------------------------------------------------------------------
constexpr int kHalf = 128;  // threads per item (4 warps)

// One item of a v2 CTA: which (b, window, head) the half at `half` runs, and whether it runs one.
struct WaItem {
  int64_t b;
  int wh, ww, h;
  bool active;
};

__device__ __forceinline__ WaItem v2_item(const WaArgs& a, unsigned items, int kwin, int half) {
  const unsigned item = blockIdx.x * static_cast<unsigned>(kwin) + static_cast<unsigned>(half);
  WaItem it;
  it.active = kwin == 1 || item < items;  // one item per CTA: the grid is exact
  const unsigned id = it.active ? item : 0u;
  it.h = static_cast<int>(id % static_cast<unsigned>(a.heads));
  const unsigned bw = id / static_cast<unsigned>(a.heads);
  const int w = static_cast<int>(bw % static_cast<unsigned>(a.nW));
  it.b = static_cast<int64_t>(bw / static_cast<unsigned>(a.nW));
  it.wh = w / a.nWw;
  it.ww = w - it.wh * a.nWw;
  return it;
}

// The head's table column (fp32 · log2 e) by the `ltid`-th of kHalf threads.
template <typename T>
__device__ __forceinline__ void fill_table_half(const WaArgs& a, int h, float* s_tab, int ltid) {
  const int n = (2 * a.M - 1) * (2 * a.M - 1);
  const T* tab = static_cast<const T*>(a.table);
  for (int e = ltid; e < n; e += kHalf) s_tab[e] = to_float(tab[e * a.tab_s0 + h * a.tab_s1]) * kLog2e;
}

// row_inv_norms by the 4 warps of one half (warp `hw` of it).
template <typename T>
__device__ __forceinline__ void row_inv_norms_half(T* tile, int rows, int stride, int cols, float* inv_out, int hw) {
  row_inv_norms_warps(tile, rows, stride, cols, inv_out, hw, kHalf / 32);
}

// Shared memory of one item of the v2 mma kernel (16-byte multiple, so the next half's K stays
// aligned): K and V of the NP slots, the table column (fp32), the key info and tokens (+ 1/‖k‖
// with cosine attention).
template <int kDp, bool kCosine>
__host__ __device__ __forceinline__ int mma_v2_item_bytes(int np, int tab_n) {
  return (2 * np * MmaTraits<kDp>::kStride * 2 + 4 * tab_n + (kCosine ? 12 : 8) * np + 15) & ~15;
}

// score_extra with the row's rel offset and label packed as (rel_i + 2M(M−1)) | label_i << 12.
__device__ __forceinline__ float score_extra_row(const WaArgs& a, const float* s_tab, int row, int info_j) {
  if (info_j < 0) return -INFINITY;
  float e = 0.0f;
  if (a.table != nullptr) e += s_tab[(row & 0xfff) - (info_j & 0xfff)];
  if (a.shift > 0 && (row >> 12) != (info_j >> 12)) e += kMaskLog2;
  return e;
}

// v2 launch shapes (ptxas -v numbers and the occupancy arithmetic: docs/window_attention.md). Per
// SM: 64 K registers, 64 warps; registers are allocated per warp in units of 8 per thread.
//   kWin: items per CTA. kMinBlocks: __launch_bounds__'s CTAs per SM, i.e. a register cap of
//   64 K / (kMinBlocks · kWin · 128) per thread, chosen so that a v2 CTA pair keeps at least v1's
//   resident warps without spills: D = 32: 80 registers → 3 × 8 = 24 warps (v1: 96 → 5 × 4 = 20);
//   D = 48…96: 128 → 2 × 8 = 16 (v1: 126…168 → 16 or 12). D = 128 would need ≤ 128 registers
//   with two items per CTA (it spills there) and keeps one item per 4-warp CTA at ≤ 168 (12 warps).
// fp32 takes (a) only: two items per CTA need more registers than v1 there (128 at D = 32, i.e.
// 16 warps, against v1's 20 or 28), so it keeps one item per CTA and ptxas's own allocation.
template <int kDp>
struct MmaV2Shape {
  static constexpr int kWin = kDp <= 96 ? 2 : 1;
  static constexpr int kMinBlocks = kDp <= 32 ? 3 : kDp <= 96 ? 2 : 3;
};
constexpr int kF32V2Win = 1;

// The A fragments (row-major 16 × kDp) of query rows q0 / q1 (nullptr: zeros).
template <typename T, int kKQ>
__device__ __forceinline__ void load_q_frags(const WaArgs& a, const T* q0, const T* q1, int t, uint32_t (&qa)[kKQ][4]) {
#pragma unroll
  for (int kk = 0; kk < kKQ; ++kk) {
    const int c0 = kk * 16 + 2 * t;
    const int c1 = c0 + 8;
    const bool in0 = c0 < a.D, in1 = c1 < a.D;
    qa[kk][0] = (q0 != nullptr && in0) ? *reinterpret_cast<const uint32_t*>(q0 + c0) : 0u;
    qa[kk][1] = (q1 != nullptr && in0) ? *reinterpret_cast<const uint32_t*>(q1 + c0) : 0u;
    qa[kk][2] = (q0 != nullptr && in1) ? *reinterpret_cast<const uint32_t*>(q0 + c1) : 0u;
    qa[kk][3] = (q1 != nullptr && in1) ? *reinterpret_cast<const uint32_t*>(q1 + c1) : 0u;
  }
}

template <typename T, int kDp, bool kCosine, int kWin>
__global__ void __launch_bounds__(kWin* kHalf, MmaV2Shape<kDp>::kMinBlocks)
    window_attention_fwd_mma_v2_kernel(const WaArgs a, const unsigned items) {
#if VK_SM80
  constexpr int kStride = MmaTraits<kDp>::kStride;
  constexpr int kKQ = kDp / 16;
  constexpr int kDT = kDp / 8;
  constexpr int kChunk = 16;  // keys per online-softmax step (v1: 64): 24 fewer score registers
  constexpr int kNT = kChunk / 8;
  constexpr int kChunks = kDp / 8;  // 16-byte chunks per K / V row

  const int NP = (a.N + 15) & ~15;
  const int tab_n = (2 * a.M - 1) * (2 * a.M - 1);
  const int half = kWin == 1 ? 0 : static_cast<int>(threadIdx.x) / kHalf;
  const int ltid = static_cast<int>(threadIdx.x) - half * kHalf;
  extern __shared__ __align__(16) unsigned char wa_smem[];
  unsigned char* mine = wa_smem + static_cast<size_t>(half) * mma_v2_item_bytes<kDp, kCosine>(NP, tab_n);
  T* sK = reinterpret_cast<T*>(mine);
  T* sV = sK + NP * kStride;
  float* sTab = reinterpret_cast<float*>(sV + NP * kStride);
  int* sInfo = reinterpret_cast<int*>(sTab + tab_n);
  int* sTok = sInfo + NP;
  float* sKn = reinterpret_cast<float*>(sTok + NP);  // kCosine: 1 / max(‖k_j‖, 1e-12)

  const WaItem it = v2_item(a, items, kWin, half);
  const int h = it.h;
  const T* qkv_b = static_cast<const T*>(a.qkv) + it.b * a.s_b;

  const int hw = ltid >> 5;  // warp within the half
  const int lane = ltid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int rel_shift = 2 * a.M * (a.M - 1);

  // (a) The Q fragments of this warp's first 16-row block, issued before anything is staged.
  int rb = hw;
  uint32_t qa[kKQ][4];
  if (it.active && rb * 16 < NP) {
    const int tok0 = slot_meta(a, it.wh, it.ww, rb * 16 + g).tok;
    const int tok1 = slot_meta(a, it.wh, it.ww, rb * 16 + g + 8).tok;
    load_q_frags<T, kKQ>(a, slot_row<T>(a, qkv_b, tok0, 0, h), slot_row<T>(a, qkv_b, tok1, 0, h), t, qa);
  }

  if (it.active) {
    if (a.table != nullptr) fill_table_half<T>(a, h, sTab, ltid);
    // K and V rows (16-byte chunks, two (row, chunk) items per thread and step: four loads in
    // flight); slots ≥ N and head dims ≥ D are zero. The chunk-0 thread of a row writes its info
    // and token.
    const int n_items = NP * kChunks;
    for (int i0 = ltid; i0 < n_items; i0 += 2 * kHalf) {
      uint4 kv[2][2];
      int dst[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int i = i0 + u * kHalf;
        kv[u][0] = kv[u][1] = make_uint4(0u, 0u, 0u, 0u);
        dst[u] = -1;
        if (i < n_items) {
          const int r = i / kChunks;
          const int c = i - r * kChunks;
          const SlotMeta sm = slot_meta(a, it.wh, it.ww, r);
          if (c == 0) {
            sInfo[r] = sm.info;
            sTok[r] = sm.tok;
          }
          if (c * 8 < a.D) {
            const T* krow = slot_row<T>(a, qkv_b, sm.tok, 1, h);  // the v row is C elements on
            if (krow != nullptr) {
              kv[u][0] = *reinterpret_cast<const uint4*>(krow + c * 8);
              kv[u][1] = *reinterpret_cast<const uint4*>(krow + a.C + c * 8);
            }
          }
          dst[u] = r * kStride + c * 8;
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (dst[u] >= 0) {
          *reinterpret_cast<uint4*>(sK + dst[u]) = kv[u][0];
          *reinterpret_cast<uint4*>(sV + dst[u]) = kv[u][1];
        }
      }
    }
  }
  __syncthreads();  // the one staging barrier (both halves)
  if constexpr (kCosine) {
    if (it.active) row_inv_norms_half<T>(sK, NP, kStride, kDp, sKn, hw);
    __syncthreads();
  }
  if (!it.active) return;  // past the last barrier

  for (; rb * 16 < NP; rb += kHalf / 32) {
    const int r0 = rb * 16 + g;
    const int r1 = r0 + 8;
    if (rb != hw) {  // later row blocks (N > 64): loaded here, as in v1
      load_q_frags<T, kKQ>(a, slot_row<T>(a, qkv_b, sTok[r0], 0, h), slot_row<T>(a, qkv_b, sTok[r1], 0, h), t, qa);
    }
    // Rows as rel_i + 2M(M−1) | label << 12 (< 4096 + labels); slots ≥ N act as (p, c) = (0, 0),
    // label 0: computed, never stored.
    const int row0 = max(sInfo[r0], 0) + rel_shift;
    const int row1 = max(sInfo[r1], 0) + rel_shift;

    [[maybe_unused]] float sc0 = a.scale_log2, sc1 = a.scale_log2;
    if constexpr (kCosine) cosine_row_scales<T, kKQ>(a, h, qa, sc0, sc1);

    float o[kDT][4], l0, l1;
    attend_keys<T, kKQ, kNT, kDp, kCosine>(
        o, l0, l1, sK, sV, kStride, NP, g, t, lane, qa, sInfo, sKn, sc0, sc1,
        [&](int r, int info_j) { return score_extra_row(a, sTab, r == 0 ? row0 : row1, info_j); });
    // tokens read here: not live across the key loop
    store_out_rows<T, kDT>(a, it.b, h, sTok[r0], sTok[r1], o, l0, l1, t);
  }
#endif
}

// Shared memory of one item of the v2 fp32 kernel: a chunk of kF32Keys K and V rows, the table
// column and the token / info tables of the NQ query-side slots (read when keys are staged).
template <int kDp>
__host__ __device__ __forceinline__ int f32_v2_item_bytes(int nq, int tab_n) {
  return (2 * kF32Keys * kDp * 4 + 4 * tab_n + 8 * nq + 15) & ~15;
}

template <int kDp, bool kCosine, int kWin>
__global__ void __launch_bounds__(kWin* kHalf)
    window_attention_fwd_f32_v2_kernel(const WaArgs a, const unsigned items) {
  static_assert(kDp % 32 == 0 && kDp <= 128, "fp32 padded head dim must be a multiple of 32");
  constexpr int kPer = kDp / 4;
  const int NQ = (a.N + kF32Rows - 1) / kF32Rows * kF32Rows;
  const int tab_n = (2 * a.M - 1) * (2 * a.M - 1);
  const int half = kWin == 1 ? 0 : static_cast<int>(threadIdx.x) / kHalf;
  const int ltid = static_cast<int>(threadIdx.x) - half * kHalf;
  extern __shared__ __align__(16) unsigned char wa_smem[];
  float* sK = reinterpret_cast<float*>(wa_smem + static_cast<size_t>(half) * f32_v2_item_bytes<kDp>(NQ, tab_n));
  float* sV = sK + kF32Keys * kDp;
  float* sTab = sV + kF32Keys * kDp;
  int* sInfo = reinterpret_cast<int*>(sTab + tab_n);
  int* sTok = sInfo + NQ;

  const WaItem it = v2_item(a, items, kWin, half);
  const int h = it.h;
  const float* qkv_b = static_cast<const float*>(a.qkv) + it.b * a.s_b;

  // Slot tables and table column; no barrier of their own: the first chunk's barrier below
  // orders them before any read.
  if (it.active) {
    for (int s = ltid; s < NQ; s += kHalf) {
      const SlotMeta sm = slot_meta(a, it.wh, it.ww, s);
      sInfo[s] = sm.info;
      sTok[s] = sm.tok;
    }
    if (a.table != nullptr) fill_table_half<float>(a, h, sTab, ltid);
  }

  const int r = ltid & 3;
  const int qr = ltid >> 2;
  const int rel_shift = 2 * a.M * (a.M - 1);
  const int64_t L = static_cast<int64_t>(a.H) * a.W;

  for (int qb = 0; qb < NQ; qb += kF32Rows) {
    const int i = qb + qr;
    // (a) the query row's token from registers: its loads need no barrier
    const SlotMeta mi = slot_meta(a, it.wh, it.ww, i);
    const int base_i = (mi.info < 0 ? 0 : (mi.info & 0xfff)) + rel_shift;
    const int lab_i = mi.info < 0 ? 0 : (mi.info >> 12);
    float q[kPer], o[kPer];
    {
      const float* qrow = it.active ? slot_row<float>(a, qkv_b, mi.tok, 0, h) : nullptr;
#pragma unroll
      for (int ii = 0; ii < kPer; ++ii) {
        const int d = ii * 4 + r;
        q[ii] = (qrow != nullptr && d < a.D) ? qrow[d] : 0.0f;
        o[ii] = 0.0f;
      }
      if constexpr (kCosine) {
        float ss = 0.0f;
#pragma unroll
        for (int ii = 0; ii < kPer; ++ii) ss = fmaf(q[ii], q[ii], ss);
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        const float f = (it.active ? cosine_scale_log2<float>(a, h) : 0.0f) / fmaxf(sqrtf(ss), kNormEps);
#pragma unroll
        for (int ii = 0; ii < kPer; ++ii) q[ii] *= f;
      }
    }
    float m = -INFINITY, l = 0.0f;

    for (int kc = 0; kc < a.N; kc += kF32Keys) {
      __syncthreads();  // previous chunk consumed (first chunk: the slot tables written)
      if (it.active) stage_f32_keys<kDp>(a, qkv_b, sTok, kc, h, sK, sV, ltid, kHalf);
      __syncthreads();
      if constexpr (kCosine) {
        if (it.active) row_inv_norms_half<float>(sK, kF32Keys, kDp, kDp, nullptr, ltid >> 5);
        __syncthreads();
      }
      if (!it.active) continue;  // an idle half only keeps the barrier count

      f32_chunk_step<kDp>(a, q, sK, sV, sInfo, sTab, kc, r, base_i, lab_i, m, l, o);  // m finite after chunk 0
    }

    if (it.active && i < a.N && mi.tok >= 0) {
      float* orow = static_cast<float*>(a.out) + (it.b * L + mi.tok) * a.C + static_cast<int64_t>(h) * a.D;
      const float inv = 1.0f / l;
#pragma unroll
      for (int ii = 0; ii < kPer; ++ii) {
        const int d = ii * 4 + r;
        if (d < a.D) orow[d] = o[ii] * inv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
// fp16 / bf16: K and V of the window's NP = 16·⌈N/16⌉ slots, the head's table column (fp32) and
// the per-slot metadata (+ 1/‖k‖ per slot with cosine attention).
template <typename T, int kDp, bool kCosine>
cudaError_t launch_mma(const WaArgs& args, unsigned grid, cudaStream_t stream) {
  const int np = (args.N + 15) & ~15;
  const int tab_n = (2 * args.M - 1) * (2 * args.M - 1);
  const size_t smem = static_cast<size_t>(2) * np * MmaTraits<kDp>::kStride * 2 + static_cast<size_t>(tab_n) * 4 +
                      static_cast<size_t>(kCosine ? 3 : 2) * np * 4;
  return launch_kernel(window_attention_fwd_mma_kernel<T, kDp, kCosine>, grid, kThreads, smem, stream, args);
}

// float32: a chunk of kF32Keys staged K and V rows, the table column and the query-side metadata.
template <int kDp, bool kCosine>
cudaError_t launch_f32(const WaArgs& args, unsigned grid, cudaStream_t stream) {
  const int nq = (args.N + kF32Rows - 1) / kF32Rows * kF32Rows;
  const int tab_n = (2 * args.M - 1) * (2 * args.M - 1);
  const size_t smem =
      static_cast<size_t>(2) * kF32Keys * kDp * 4 + static_cast<size_t>(tab_n) * 4 + static_cast<size_t>(2) * nq * 4;
  return launch_kernel(window_attention_fwd_f32_kernel<kDp, kCosine>, grid, kThreads, smem, stream, args);
}

// v2: kWin items per CTA (MmaV2Shape / kF32V2Win), each with its own copy of the layouts above.
template <typename T, int kDp, bool kCosine>
cudaError_t launch_mma_v2(const WaArgs& args, unsigned items, cudaStream_t stream) {
  constexpr int kWin = MmaV2Shape<kDp>::kWin;
  const int np = (args.N + 15) & ~15;
  const int tab_n = (2 * args.M - 1) * (2 * args.M - 1);
  const size_t smem = static_cast<size_t>(kWin) * mma_v2_item_bytes<kDp, kCosine>(np, tab_n);
  // Two items past the device's opt-in shared memory (never on H100 / H200; A100's 163 KiB: M >= 14
  // at D = 81…96, M >= 15 at D = 65…80): this call runs v1, one item per CTA.
  if (kWin > 1 && smem > 48 * 1024) {
    int max_smem = 0;
    const cudaError_t err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &max_smem);
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(max_smem)) return launch_mma<T, kDp, kCosine>(args, items, stream);
  }
  const unsigned grid = (items - 1) / kWin + 1;
  return launch_kernel(window_attention_fwd_mma_v2_kernel<T, kDp, kCosine, kWin>, grid, kWin * kHalf, smem, stream,
                       args, items);
}

template <int kDp, bool kCosine>
cudaError_t launch_f32_v2(const WaArgs& args, unsigned items, cudaStream_t stream) {
  constexpr int kWin = kF32V2Win;
  const int nq = (args.N + kF32Rows - 1) / kF32Rows * kF32Rows;
  const int tab_n = (2 * args.M - 1) * (2 * args.M - 1);
  const size_t smem = static_cast<size_t>(kWin) * f32_v2_item_bytes<kDp>(nq, tab_n);
  const unsigned grid = (items - 1) / kWin + 1;
  return launch_kernel(window_attention_fwd_f32_v2_kernel<kDp, kCosine, kWin>, grid, kWin * kHalf, smem, stream, args,
                       items);
}

// `items` = B·nW·heads (> 0); v1 launches one CTA per item.
template <bool kCosine>
cudaError_t dispatch(DType dtype, const WaArgs& args, unsigned items, bool v1, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same<T, float>::value) {
      return dispatch_head_dim<32, 64, 96, 128>(args.D, [&](auto dp) {
        constexpr int kDp = decltype(dp)::value;
        return v1 ? launch_f32<kDp, kCosine>(args, items, stream) : launch_f32_v2<kDp, kCosine>(args, items, stream);
      });
    } else {
      return dispatch_head_dim<32, 48, 64, 80, 96, 128>(args.D, [&](auto dp) {
        constexpr int kDp = decltype(dp)::value;
        return v1 ? launch_mma<T, kDp, kCosine>(args, items, stream)
                  : launch_mma_v2<T, kDp, kCosine>(args, items, stream);
      });
    }
  });
}

}  // namespace

bool window_attention_forward_supports(int window, int head_dim, DType dtype) {
  return known_dtype(dtype) && window >= 1 && window <= kMaxWindow && head_dim_in_range(head_dim, kMaxHeadDim);
}

bool window_attention_tensor_aligned(const void* ptr, const int64_t stride[3], DType dtype) {
  return vector_aligned(ptr, stride, 3, dtype);
}

cudaError_t window_attention_forward(const WindowAttentionFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 1 || p.W < 1 || p.heads < 1 || p.head_dim < 1) return cudaErrorInvalidValue;
  if (!window_attention_forward_supports(p.window, p.head_dim, p.dtype)) return cudaErrorInvalidValue;
  if (p.shift < 0 || p.shift >= p.window) return cudaErrorInvalidValue;
  if (p.kernel_version != 0 && p.kernel_version != 1) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.heads) * p.head_dim != p.C) return cudaErrorInvalidValue;
  const int M = p.window;
  const int64_t Hp = (static_cast<int64_t>(p.H) + M - 1) / M * M;
  const int64_t Wp = (static_cast<int64_t>(p.W) + M - 1) / M * M;
  if (Hp > INT_MAX / 2 || Wp > INT_MAX / 2 || static_cast<int64_t>(p.H) * p.W > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const int64_t nW = (Hp / M) * (Wp / M);
  if (nW > INT_MAX) return cudaErrorInvalidValue;
  const int64_t grid = static_cast<int64_t>(p.B) * nW * p.heads;
  if (grid == 0) return cudaSuccess;
  if (grid > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (!window_attention_tensor_aligned(p.qkv, p.qkv_stride, p.dtype)) return cudaErrorInvalidValue;
  if (!aligned_to(p.out, 16)) return cudaErrorInvalidValue;
  if (p.qkv_bias != nullptr && !aligned_to(p.qkv_bias, 16)) return cudaErrorInvalidValue;
  const uintptr_t elem = static_cast<uintptr_t>(element_size(p.dtype));
  if (p.table != nullptr && !aligned_to(p.table, elem)) return cudaErrorInvalidValue;
  if (p.logit_scale != nullptr && !aligned_to(p.logit_scale, elem)) return cudaErrorInvalidValue;

  WaArgs args{};
  args.qkv = p.qkv;
  args.table = p.table;
  args.qkv_bias = p.qkv_bias;
  args.logit_scale = p.logit_scale;
  args.out = p.out;
  args.s_b = p.qkv_stride[0];
  args.s_t = p.qkv_stride[1];
  args.tab_s0 = p.table != nullptr ? p.table_stride[0] : 0;
  args.tab_s1 = p.table != nullptr ? p.table_stride[1] : 0;
  args.H = p.H;
  args.W = p.W;
  args.Hp = static_cast<int>(Hp);
  args.Wp = static_cast<int>(Wp);
  args.nWw = static_cast<int>(Wp / M);
  args.nW = static_cast<int>(nW);
  args.C = p.C;
  args.heads = p.heads;
  args.D = p.head_dim;
  args.M = M;
  args.shift = p.shift;
  // Both orders are one function when nothing is padded (or nothing shifted).
  const bool shift_first = p.shift_first && p.shift > 0 && (Hp != p.H || Wp != p.W);
  args.opts = shift_first ? (1 | ((p.shift % p.H) << 8) | ((p.shift % p.W) << 16)) : 0;
  args.N = M * M;
  // Cosine attention: the kernels scale by τ_h·log2 e / (‖q‖·‖k‖) instead (τ is read on the device).
  args.scale_log2 = p.logit_scale != nullptr ? 1.0f : p.scale * kLog2e;
  const unsigned items = static_cast<unsigned>(grid);
  const bool v1 = p.kernel_version == 1;
  return p.logit_scale != nullptr ? dispatch<true>(p.dtype, args, items, v1, stream)
                                  : dispatch<false>(p.dtype, args, items, v1, stream);
}

}  // namespace vitkernels
