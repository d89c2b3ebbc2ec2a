// vitkernels — MViTv2 pooling-attention forward. Math and layout: pool_attention.h; design and
// cost: docs/pool_attention.md.
#include "pool_attention.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace vitkernels {
namespace {

using namespace ptx;            // cp_async_*, Mma<T>
using namespace mma_attention;  // load_tile_async, WarpRows, warp_* steps, dispatch_padded_head_dim

struct PoolArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* rel_h;  // null when there are no tables (the kernels are then instantiated without them)
  const void* rel_w;
  void* out;
  float* lse;
  int64_t qs[4], ks[4], vs[4], os[4];
  int H, Nq, Nk, D;
  int q_h, q_w, k_h, k_w, Lh, Lw;
  int cls;                               // 1 when the class token leads q, k and v
  int rel_stride;                        // floats per query row of the staged rel terms (odd, ≥ k_h + k_w + 1)
  int num_m_blocks;                      // query tiles per (b, h)
  float h_q_ratio, h_k_ratio, h_offset;  // timm's ratios and offset, rounded to float32 as torch does
  float w_q_ratio, w_k_ratio, w_offset;
  float scale_log2;  // scale · log2(e)
  bool residual;
};

// The staged rel terms of a query row: [relh(0..k_h) | relw(0..k_w) | 0 | pad], times log2(e).
// A key's offsets into it, packed (kh) | (k_h + kw) << 16; the class key and keys ≥ Nk point both
// halves at the zero slot k_h + k_w.
int rel_stride_of(int k_h, int k_w) { return (k_h + k_w + 1) | 1; }

__device__ __forceinline__ uint32_t key_offsets(const PoolArgs& a, int j) {
  const int s = j - a.cls;
  if (s < 0 || j >= a.Nk) {
    const uint32_t z = static_cast<uint32_t>(a.k_h + a.k_w);
    return z | (z << 16);
  }
  const int kh = s / a.k_w;
  const int kw = s - kh * a.k_w;
  return static_cast<uint32_t>(kh) | (static_cast<uint32_t>(a.k_h + kw) << 16);
}

// timm's cal_rel_pos_type index: float32 products, difference and sum, each rounded on its own (no
// contraction into an FMA), then truncated toward zero as .long() does; clamped into the table.
__device__ __forceinline__ int rel_index(int qi, int ki, float q_ratio, float k_ratio, float offset, int L) {
  const float d = __fadd_rn(
      __fsub_rn(__fmul_rn(static_cast<float>(qi), q_ratio), __fmul_rn(static_cast<float>(ki), k_ratio)), offset);
  return min(max(static_cast<int>(d), 0), L - 1);
}

// Where the CTA works: sequence bh = b·H + h and its query tile, from the 1-D grid.
struct Tile {
  int b, h, bh, m_block;
  __device__ __forceinline__ explicit Tile(const PoolArgs& a) {
    m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.num_m_blocks));
    bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.num_m_blocks));
    b = bh / a.H;
    h = bh - b * a.H;
  }
  __device__ __forceinline__ int64_t offset(const int64_t* s) const { return b * s[0] + h * s[1]; }
};

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 tensor-core kernel.
// ---------------------------------------------------------------------------------------------
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA (16 per warp)
constexpr int kBlockN = kKeyBlock;    // keys per iteration

// acc (16 rows × 8 columns) += Q_warp · Bᵀ where column g of B is the table row `brow` of lane
// group g (nullptr: a zero column). The head dim is permuted the same way in both operands so
// that each lane reads 16 contiguous bytes of Q and of its table row per 32 head dims: in chunk c,
// mma k = 2t + e ↔ d = 32c + 8t + e and k = 2t + 8 + e ↔ d = 32c + 8t + 2 + e (first k-step), +4
// for the second; a 16-wide tail uses 8 bytes (d = 4t + e, 4t + 2 + e). aq / aq_tail: Q rows g and
// g + 8 in that order, loaded once per warp.
template <typename T, int kDp>
struct RelFragments {
  static constexpr int kC32 = kDp / 32;
  static constexpr bool kTail = kDp % 32 != 0;
  uint4 aq[kC32 > 0 ? kC32 : 1][2];
  uint2 aq_tail[2];

  __device__ __forceinline__ void load(const T* sQw0, int g, int t) {
    constexpr int kStride = Shape<kDp>::kStride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const T* row = sQw0 + (g + 8 * r) * kStride;
#pragma unroll
      for (int c = 0; c < kC32; ++c) aq[c][r] = *reinterpret_cast<const uint4*>(row + 32 * c + 8 * t);
      if constexpr (kTail) aq_tail[r] = *reinterpret_cast<const uint2*>(row + 32 * kC32 + 4 * t);
    }
  }

  __device__ __forceinline__ void product(float (&acc)[4], const T* brow, int D, int t) const {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
    for (int c = 0; c < kC32; ++c) {
      const int d0 = 32 * c + 8 * t;  // D % 8 == 0: the 8 dims are all in range or all out
      uint4 b = make_uint4(0u, 0u, 0u, 0u);
      if (brow != nullptr && d0 < D) b = *reinterpret_cast<const uint4*>(brow + d0);
      const uint32_t a0[4] = {aq[c][0].x, aq[c][1].x, aq[c][0].y, aq[c][1].y};
      Mma<T>::run(acc, a0, b.x, b.y);
      const uint32_t a1[4] = {aq[c][0].z, aq[c][1].z, aq[c][0].w, aq[c][1].w};
      Mma<T>::run(acc, a1, b.z, b.w);
    }
    if constexpr (kTail) {
      const int d0 = 32 * kC32 + 4 * t;
      uint2 b = make_uint2(0u, 0u);
      if (brow != nullptr && d0 < D) b = *reinterpret_cast<const uint2*>(brow + d0);
      const uint32_t a[4] = {aq_tail[0].x, aq_tail[1].x, aq_tail[0].y, aq_tail[1].y};
      Mma<T>::run(acc, a, b.x, b.y);
    }
  }
};

// One axis of warp_rel_terms, for the query position `pos` on that axis (qh or qw): per 8 key positions kk <
// n_k, an 8-column tile of Q_warp · table rows idx(pos, kk) (gathered by row index); each accumulator
// element is kept by the lane whose row has that position (pos_r: its rows g and g + 8), at column
// col0 + kk of its sRel row (stride RS), times log2(e).
template <typename T, int kDp>
__device__ __forceinline__ void axis_rel_terms(const RelFragments<T, kDp>& fr, const T* table, int pos,
                                               const int (&pos_r)[2], int n_k, int col0, float q_ratio, float k_ratio,
                                               float offset, int L, int D, float* sRelw0, int RS, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
  float acc[4];
  const int n_kc = (n_k + 7) / 8;
  for (int kc = 0; kc < n_kc; ++kc) {
    const int kk = kc * 8 + g;  // this lane group's column
    const T* brow = nullptr;
    if (kk < n_k) brow = table + int64_t{rel_index(pos, kk, q_ratio, k_ratio, offset, L)} * D;
    fr.product(acc, brow, D, t);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (pos_r[r] != pos) continue;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = kc * 8 + 2 * t + e;
        if (col < n_k) sRelw0[(g + 8 * r) * RS + col0 + col] = acc[2 * r + e] * kLog2e;
      }
    }
  }
}

// The rel terms of one warp's 16 query rows (row0 = the first), into its 16 rows of sRel (stride
// a.rel_stride floats): relh[r, kh] = q_r · rel_h[dh(qh_r, kh)], relw[r, kw] likewise, times
// log2(e); zero for the class row, rows past Nq and the zero slot. On tensor cores: per distinct qh
// of the warp's rows, one 8-column tile per 8 kh (columns gathered from the table by row index),
// and per distinct qw one per 8 kw; each accumulator element is kept by the lane whose row has that
// qh (qw). sQw0 = the warp's first Q row in shared memory.
template <typename T, int kDp>
__device__ __forceinline__ void warp_rel_terms(const PoolArgs& a, const T* sQw0, float* sRelw0, int row0, int lane) {
  const int RS = a.rel_stride;
  for (int i = lane; i < 16 * RS; i += 32) sRelw0[i] = 0.f;
  __syncwarp();
  const int S = a.q_h * a.q_w;  // spatial query positions
  const int s_first = max(row0 - a.cls, 0);
  const int s_last = min(row0 + 15 - a.cls, S - 1);
  if (s_first > s_last) return;  // the class row and padding only (uniform across the warp)

  const int g = lane >> 2;
  const int t = lane & 3;
  int qh_r[2], qw_r[2];  // (qh, qw) of this lane's accumulator rows g and g + 8; -1: not spatial
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int s = row0 + g + 8 * r - a.cls;
    const bool spatial = s >= 0 && s < S;
    qh_r[r] = spatial ? s / a.q_w : -1;
    qw_r[r] = spatial ? s - (s / a.q_w) * a.q_w : -1;
  }
  RelFragments<T, kDp> fr;
  fr.load(sQw0, g, t);
  const T* rel_h = static_cast<const T*>(a.rel_h);
  const T* rel_w = static_cast<const T*>(a.rel_w);
  for (int qh = s_first / a.q_w; qh <= s_last / a.q_w; ++qh) {
    axis_rel_terms<T, kDp>(fr, rel_h, qh, qh_r, a.k_h, 0, a.h_q_ratio, a.h_k_ratio, a.h_offset, a.Lh, a.D, sRelw0, RS,
                           lane);
  }
  const int n_qw = min(s_last - s_first + 1, a.q_w);  // consecutive positions: distinct qw mod q_w
  const int qw_first = s_first - (s_first / a.q_w) * a.q_w;
  for (int u = 0; u < n_qw; ++u) {
    const int qw = qw_first + u < a.q_w ? qw_first + u : qw_first + u - a.q_w;
    axis_rel_terms<T, kDp>(fr, rel_w, qw, qw_r, a.k_w, a.k_h, a.w_q_ratio, a.w_k_ratio, a.w_offset, a.Lw, a.D, sRelw0,
                           RS, lane);
  }
  __syncwarp();  // the rows are read back by other lanes of the warp
}

template <typename T, int kDp, bool kRel>
__global__ void __launch_bounds__(kThreads) pool_attention_fwd_mma_kernel(const PoolArgs a) {
#if VK_SM80
  constexpr int kStride = Shape<kDp>::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;
  float* sRel = reinterpret_cast<float*>(sV + kBlockN * kStride);  // kBlockM × rel_stride (kRel)
  uint32_t* sKOff = reinterpret_cast<uint32_t*>(sRel + (kRel ? kBlockM * a.rel_stride : 0));  // kBlockN

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const Tile tile(a);
  const int Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int m0 = tile.m_block * kBlockM;
  const T* q = static_cast<const T*>(a.q) + tile.offset(a.qs);
  const T* k = static_cast<const T*>(a.k) + tile.offset(a.ks);
  const T* v = static_cast<const T*>(a.v) + tile.offset(a.vs);

  // Prologue: the Q tile and K[0] in one cp.async group, the key offsets of block 0.
  load_tile_async<T, kBlockM, kDp, kStride, kThreads>(sQ, q, a.qs[2], m0, Nq, D);
  load_tile_async<T, kBlockN, kDp, kStride, kThreads>(sK, k, a.ks[2], 0, Nk, D);
  cp_async_commit();
  if (kRel && tid < kBlockN) sKOff[tid] = key_offsets(a, tid);
  cp_async_wait_all();
  __syncthreads();

  // A warp whose 16 rows all lie past Nq only helps load tiles and keeps the barriers.
  const bool active = m0 + warp * 16 < Nq;
  T* sQw0 = sQ + warp * 16 * kStride;
  const T* sQw = sQw0 + (lane & 15) * kStride + (lane >> 4) * 8;
  float* sRelw0 = sRel + warp * 16 * a.rel_stride;
  const float* rel_r0 = sRelw0 + g * a.rel_stride;  // this lane's accumulator rows g and g + 8
  const float* rel_r1 = rel_r0 + 8 * a.rel_stride;
  if (kRel && active) warp_rel_terms<T, kDp>(a, sQw0, sRelw0, m0 + warp * 16, lane);
  uint32_t qf[Shape<kDp>::kQRegs][4];
  if (active) load_q_fragments<T, kDp>(qf, sQw);

  WarpRows<kDp> w;
  w.reset();
  mma_key_loop<T, kDp, kThreads>(
      w, qf, sQw, sK, sV, k, a.ks[2], v, a.vs[2], Nk, D, active, lane,
      [&](float(&s)[kNT][4], int n0) {
        // With tables x = s · scale · log2 e + (relh + relw) · log2 e; the update then runs with scale 1.
        if (kRel) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const uint32_t off = sKOff[nt * 8 + 2 * t + e];
              const int oh = static_cast<int>(off & 0xffffu);
              const int ow = static_cast<int>(off >> 16);
              s[nt][e] = fmaf(s[nt][e], a.scale_log2, rel_r0[oh] + rel_r0[ow]);
              s[nt][2 + e] = fmaf(s[nt][2 + e], a.scale_log2, rel_r1[oh] + rel_r1[ow]);
            }
          }
          softmax_update<T, kDp>(s, w, n0, Nk, 1.f, nullptr, nullptr, 0, t);
        } else {
          softmax_update<T, kDp>(s, w, n0, Nk, a.scale_log2, nullptr, nullptr, 0, t);
        }
      },
      [&](int n_next) {
        if (kRel && tid < kBlockN) sKOff[tid] = key_offsets(a, n_next + tid);
      });

  // Epilogue: lse, then o / l (+ q) staged through the warp's own 16 rows of sQ, which still hold its Q.
  if (active) {
    T* out = static_cast<T*>(a.out) + tile.offset(a.os);
    warp_store<T, kDp>(w, sQw0, out, a.os[2], a.lse + static_cast<int64_t>(tile.bh) * Nq, m0 + warp * 16, Nq, D, lane,
                       nullptr, nullptr, a.residual);
  }
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// ---------------------------------------------------------------------------------------------
// float32 CUDA-core kernel (QuadTraits: 32 query rows per CTA, 4 threads per row, keys in blocks of 32).
// ---------------------------------------------------------------------------------------------
template <int kDp, bool kRel>
__global__ void __launch_bounds__(QuadTraits<kDp>::kThreads) pool_attention_fwd_f32_kernel(const PoolArgs a) {
#if VK_SM80
  using Tr = QuadTraits<kDp>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const QuadTiles<kDp> sm(smem_raw);
  float* sRel = sm.rest;  // kBlockM × rel_stride
  uint32_t* sKOff = reinterpret_cast<uint32_t*>(sRel + (kRel ? Tr::kBlockM * a.rel_stride : 0));  // kBlockN

  const int tid = threadIdx.x;
  const int r = tid >> 2;  // query row within the tile
  const int c = tid & 3;   // lane within the row's quad
  const Tile tile(a);
  const int Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int m0 = tile.m_block * Tr::kBlockM;
  const int row = m0 + r;

  load_tile_async<float, Tr::kBlockM, kDp, Tr::kStride, Tr::kThreads>(
      sm.q, static_cast<const float*>(a.q) + tile.offset(a.qs), a.qs[2], m0, Nq, D);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  const float* qrow = sm.q + r * Tr::kStride;

  float* rel_row = sRel + r * a.rel_stride;
  if (kRel) {
    // The row's quad computes its rel terms: lane c takes entries c, c + 4, ... of the row.
    const int S = a.q_h * a.q_w;
    const int s = row - a.cls;
    const bool spatial = s >= 0 && s < S && row < Nq;
    const int qh = spatial ? s / a.q_w : 0;
    const int qw = spatial ? s - qh * a.q_w : 0;
    for (int idx = c; idx < a.rel_stride; idx += 4) {
      const float* trow = nullptr;
      if (spatial && idx < a.k_h) {
        trow = static_cast<const float*>(a.rel_h) +
               static_cast<int64_t>(rel_index(qh, idx, a.h_q_ratio, a.h_k_ratio, a.h_offset, a.Lh)) * D;
      } else if (spatial && idx < a.k_h + a.k_w) {
        trow = static_cast<const float*>(a.rel_w) +
               static_cast<int64_t>(rel_index(qw, idx - a.k_h, a.w_q_ratio, a.w_k_ratio, a.w_offset, a.Lw)) * D;
      }
      float acc = 0.f;
      if (trow != nullptr) {
        for (int d = 0; d < D; d += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(qrow + d);
          const float4 tv = *reinterpret_cast<const float4*>(trow + d);
          acc = fmaf(qv.x, tv.x, acc);
          acc = fmaf(qv.y, tv.y, acc);
          acc = fmaf(qv.z, tv.z, acc);
          acc = fmaf(qv.w, tv.w, acc);
        }
      }
      rel_row[idx] = acc * kLog2e;
    }
    __syncwarp();  // the row is read back by the other lanes of its quad
  }

  QuadRow<kDp> qr;
  qr.reset();
  quad_key_loop<kDp>(
      qr, sm, qrow, static_cast<const float*>(a.k) + tile.offset(a.ks), a.ks[2],
      static_cast<const float*>(a.v) + tile.offset(a.vs), a.vs[2], Nk, D, r, c,
      [&](int n0) {
        if (kRel && tid < Tr::kBlockN) sKOff[tid] = key_offsets(a, n0 + tid);
      },
      [&](float dot, int, int jj) {
        float x = dot * a.scale_log2;
        if (kRel) {
          const uint32_t off = sKOff[c + 4 * jj];
          x += rel_row[off & 0xffffu] + rel_row[off >> 16];
        }
        return x;
      });

  const float l = qr.total();
  if (row < Nq) {
    const float inv = (l == 0.f) ? 0.f : 1.f / l;
    if (c == 0)
      a.lse[static_cast<int64_t>(tile.bh) * Nq + row] = (l == 0.f) ? INFINITY : (qr.row_max + log2f(l)) * kLn2;
    float* out = static_cast<float*>(a.out) + tile.offset(a.os) + static_cast<int64_t>(row) * a.os[2];
#pragma unroll
    for (int i = 0; i < Tr::kI; ++i) {
      const int d = 16 * i + 4 * c;
      if (d < D) {
        float4 res = make_float4(qr.o[i][0] * inv, qr.o[i][1] * inv, qr.o[i][2] * inv, qr.o[i][3] * inv);
        if (a.residual) {
          const float4 qv = *reinterpret_cast<const float4*>(qrow + d);
          res.x += qv.x;
          res.y += qv.y;
          res.z += qv.z;
          res.w += qv.w;
        }
        *reinterpret_cast<float4*>(out + d) = res;
      }
    }
  }
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
template <typename T, int kDp, bool kRel>
cudaError_t launch(const PoolArgs& base, int64_t sequences, int smem, cudaStream_t stream) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int kRows = kF32 ? QuadTraits<kDp>::kBlockM : kBlockM;
  PoolArgs a = base;
  const int64_t m_blocks = (static_cast<int64_t>(a.Nq) + kRows - 1) / kRows;
  const int64_t grid = m_blocks * sequences;
  if (grid > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  a.num_m_blocks = static_cast<int>(m_blocks);
  const unsigned g = static_cast<unsigned>(grid);
  if constexpr (kF32) {
    return launch_kernel(pool_attention_fwd_f32_kernel<kDp, kRel>, g, QuadTraits<kDp>::kThreads, smem, stream, a);
  } else {
    return launch_kernel(pool_attention_fwd_mma_kernel<T, kDp, kRel>, g, kThreads, smem, stream, a);
  }
}

// float32 ratios and offset of one axis, as torch rounds timm's Python floats.
void axis_constants(int q_size, int k_size, float* q_ratio, float* k_ratio, float* offset) {
  const double qr = static_cast<double>(k_size) / q_size > 1.0 ? static_cast<double>(k_size) / q_size : 1.0;
  const double kr = static_cast<double>(q_size) / k_size > 1.0 ? static_cast<double>(q_size) / k_size : 1.0;
  *q_ratio = static_cast<float>(qr);
  *k_ratio = static_cast<float>(kr);
  *offset = static_cast<float>((k_size - 1) * kr);
}

}  // namespace

int pool_attention_forward_smem_bytes(int D, DType dtype, int k_h, int k_w, bool rel) {
  if (!pool_attention_forward_supports(D, dtype)) return 0;
  if (rel && (k_h < 1 || k_w < 1 || k_h > kPoolAttentionMaxKeySide || k_w > kPoolAttentionMaxKeySide)) return 0;
  const int dp = padded_head_dim(D);
  const int rs = rel ? rel_stride_of(k_h, k_w) : 0;
  if (dtype == DType::kFloat32) {
    int floats = 0;
    dispatch_padded_head_dim(D, [&](auto kDp) {
      using Tr = QuadTraits<decltype(kDp)::value>;
      floats = Tr::kTileFloats + (rel ? Tr::kBlockM * rs + Tr::kBlockN : 0);
      return cudaSuccess;
    });
    return floats * 4;
  }
  return (kBlockM + 2 * kBlockN) * (dp + 8) * 2 + (rel ? (kBlockM * rs + kBlockN) * 4 : 0);
}

bool pool_attention_forward_supports(int head_dim, DType dtype) {
  return known_dtype(dtype) && head_dim_in_range(head_dim, kPoolAttentionMaxHeadDim);
}

bool pool_attention_forward_supports(int head_dim, DType dtype, int k_h, int k_w, bool rel, int max_smem_bytes) {
  const int smem = pool_attention_forward_smem_bytes(head_dim, dtype, k_h, k_w, rel);
  return smem > 0 && smem <= max_smem_bytes;
}

cudaError_t pool_attention_forward(const PoolAttentionFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.q_h < 1 || p.q_w < 1 || p.k_h < 1 || p.k_w < 1) return cudaErrorInvalidValue;
  if (!pool_attention_forward_supports(p.D, p.dtype)) return cudaErrorInvalidValue;
  const bool rel = p.rel_h != nullptr;
  if (rel != (p.rel_w != nullptr)) return cudaErrorInvalidValue;
  if (rel && (p.Lh < 1 || p.Lw < 1)) return cudaErrorInvalidValue;
  const int cls = p.has_cls_token ? 1 : 0;
  const int64_t nq = static_cast<int64_t>(p.q_h) * p.q_w + cls;
  const int64_t nk = static_cast<int64_t>(p.k_h) * p.k_w + cls;
  if (nq > INT_MAX || nk > INT_MAX) return cudaErrorInvalidValue;
  const int64_t sequences = static_cast<int64_t>(p.B) * p.H;
  if (sequences == 0) return cudaSuccess;
  if (sequences > INT_MAX) return cudaErrorInvalidConfiguration;
  if (p.out == nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  if (!qkv_out_vector_aligned(p)) return cudaErrorInvalidValue;
  if (rel && (!aligned_to(p.rel_h, 16) || !aligned_to(p.rel_w, 16))) return cudaErrorInvalidValue;

  int max_smem = 0;
  const cudaError_t err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &max_smem);
  if (err != cudaSuccess) return err;
  const int smem = pool_attention_forward_smem_bytes(p.D, p.dtype, p.k_h, p.k_w, rel);
  if (smem == 0 || smem > max_smem) return cudaErrorInvalidValue;

  PoolArgs a{};
  copy_head_views(a, p);
  a.rel_h = p.rel_h;
  a.rel_w = p.rel_w;
  a.lse = p.lse;
  a.Nq = static_cast<int>(nq);
  a.Nk = static_cast<int>(nk);
  a.q_h = p.q_h;
  a.q_w = p.q_w;
  a.k_h = p.k_h;
  a.k_w = p.k_w;
  a.Lh = p.Lh;
  a.Lw = p.Lw;
  a.cls = cls;
  a.rel_stride = rel ? rel_stride_of(p.k_h, p.k_w) : 0;
  axis_constants(p.q_h, p.k_h, &a.h_q_ratio, &a.h_k_ratio, &a.h_offset);
  axis_constants(p.q_w, p.k_w, &a.w_q_ratio, &a.w_k_ratio, &a.w_offset);
  a.scale_log2 = p.scale * kLog2e;
  a.residual = p.residual;

  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_padded_head_dim(p.D, [&](auto dp) {
      constexpr int kDp = decltype(dp)::value;
      return rel ? launch<T, kDp, true>(a, sequences, smem, stream) : launch<T, kDp, false>(a, sequences, smem, stream);
    });
  });
}

}  // namespace vitkernels
