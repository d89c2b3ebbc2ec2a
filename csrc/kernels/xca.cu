// vitkernels — XCiT cross-covariance attention forward. Math and layout: xca.h; design and cost:
// docs/xca.md.
#include "xca.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

namespace vitkernels {
namespace {

using namespace ptx;            // cp_async_*, ldmatrix_*, Mma<T>
using namespace mma_attention;  // load_tile_async, load_q_fragments, warp_scores, Shape, kNT, padded_head_dim

// kOnePass: one CTA per head runs stats, softmax and apply. kStats / kApply: the two halves of a
// split head, one CTA per (head, chunk of tokens), joined by the fp32 workspace.
enum Mode { kOnePass, kStats, kApply };

constexpr int kThreads = 128;  // 4 warps

struct XcaArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const float* temperature;
  float* workspace;
  int64_t qs[4], ks[4], vs[4], os[4];
  int H, N, D;
  int chunk_rows;  // tokens per CTA, a multiple of the tile
  int num_chunks;  // CTAs per head
};

template <typename T, int kDp>
struct XcaTraits {
  static constexpr bool kMma = sizeof(T) == 2;                          // tensor cores for fp16 / bf16
  static constexpr int kRows = kMma ? 64 : 32;                          // tokens per tile
  static constexpr int kStride = kMma ? Shape<kDp>::kStride : kDp + 4;  // tile row, elements
  static constexpr int kGStride = kDp + 1;                              // fp32 G row (fp32 kernels: A too)
  static constexpr int kPartFloats = kDp * kDp + 2 * kDp;               // one chunk's G and squared norms
  static constexpr int kTileBytes = kRows * kStride * static_cast<int>(sizeof(T));
  static constexpr int kGBytes = kDp * kGStride * 4;
  static constexpr int kNormBytes = 2 * kDp * 4;
  static constexpr int kABytes = kMma ? kDp * kStride * 2 : 0;  // fp32: A overwrites G in place
  // Two token tiles (q and k; v and the output staging use the first), G, norms, A.
  static constexpr int kSmemBytes = 2 * kTileBytes + kGBytes + kNormBytes + kABytes;
  static_assert((2 * kTileBytes + kGBytes + kNormBytes) % 16 == 0, "A must be 16-byte aligned");
  static_assert(kSmemBytes <= 48 * 1024, "fits the default dynamic shared memory");
};

// ---------------------------------------------------------------------------------- stats pass
// G (channel rows of this warp, fp16/bf16 on tensor cores) += qᵀ k over one token tile. qᵀ is the A
// operand (channels × tokens) and k the B operand (tokens × channels): both come from row-major
// token tiles through ldmatrix.trans.
template <typename T, int kDp>
__device__ __forceinline__ void gram_tile_mma(float (&acc)[kDp / 8][4], const T* sQ, const T* sK, int warp, int lane) {
  using Tr = XcaTraits<T, kDp>;
  constexpr int kStride = Tr::kStride;
#pragma unroll
  for (int kk = 0; kk < Tr::kRows / 16; ++kk) {
    uint32_t af[4];  // matrices: (tokens 0-7, ch 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15)
    ldmatrix_x4_trans(
        af, sQ + (kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * kStride + warp * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int np = 0; np < kDp / 16; ++np) {
      uint32_t bf[4];  // as the V operand of attention's P·V
      ldmatrix_x4_trans(bf, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + np * 16 + (lane >> 4) * 8);
      Mma<T>::run(acc[2 * np], af, bf[0], bf[1]);
      Mma<T>::run(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// fp32 on CUDA cores: the thread's G row i = tid / 2, columns [(tid % 2)·kDp/2, +kDp/2).
template <int kDp>
__device__ __forceinline__ void gram_tile_fma(float (&acc)[kDp / 2], const float* sQ, const float* sK, int tid) {
  using Tr = XcaTraits<float, kDp>;
  const int i = tid >> 1;
  const int j0 = (tid & 1) * (kDp / 2);
  if (i >= kDp) return;
  for (int r = 0; r < Tr::kRows; ++r) {
    const float qi = sQ[r * Tr::kStride + i];
    const float* kr = sK + r * Tr::kStride + j0;
#pragma unroll
    for (int jj = 0; jj < kDp / 2; ++jj) acc[jj] = fmaf(qi, kr[jj], acc[jj]);
  }
}

// Reduces G and the squared column norms of q and k over tokens [r_begin, r_end) of one head into
// g_out (row stride g_stride) and norm_out ([0, kDp): ‖q_i‖², [kDp, 2·kDp): ‖k_j‖²): shared memory
// or a workspace partial.
template <typename T, int kDp>
__device__ __forceinline__ void stats_pass(const XcaArgs& a, const T* q, const T* k, int r_begin, int r_end, T* sQ,
                                           T* sK, float* g_out, int g_stride, float* norm_out) {
  using Tr = XcaTraits<T, kDp>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float acc_mma[kDp / 8][4];
  float acc_fma[kDp / 2];
#pragma unroll
  for (int i = 0; i < kDp / 8; ++i) acc_mma[i][0] = acc_mma[i][1] = acc_mma[i][2] = acc_mma[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kDp / 2; ++i) acc_fma[i] = 0.f;
  float sq = 0.f;  // column tid of [q | k]: the thread's squared norm
  for (int r0 = r_begin; r0 < r_end; r0 += Tr::kRows) {
    __syncthreads();  // every thread is done with the previous tiles
    load_tile_async<T, Tr::kRows, kDp, Tr::kStride, kThreads>(sQ, q, a.qs[2], r0, r_end, a.D);
    load_tile_async<T, Tr::kRows, kDp, Tr::kStride, kThreads>(sK, k, a.ks[2], r0, r_end, a.D);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (tid < 2 * kDp) {  // rows past r_end and channels past D are zero-filled
      const T* col = tid < kDp ? sQ + tid : sK + (tid - kDp);
      for (int r = 0; r < Tr::kRows; ++r) {
        const float x = to_float(col[r * Tr::kStride]);
        sq = fmaf(x, x, sq);
      }
    }
    if constexpr (Tr::kMma) {
      if (warp * 16 < kDp) gram_tile_mma<T, kDp>(acc_mma, sQ, sK, warp, lane);
    } else {
      gram_tile_fma<kDp>(acc_fma, sQ, sK, tid);
    }
  }
  if (tid < 2 * kDp) norm_out[tid] = sq;
  if constexpr (Tr::kMma) {
    if (warp * 16 < kDp) {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int nt = 0; nt < kDp / 8; ++nt) {
        float* row0 = g_out + (warp * 16 + g) * g_stride + nt * 8 + 2 * t;
        float* row1 = row0 + 8 * g_stride;
        row0[0] = acc_mma[nt][0];
        row0[1] = acc_mma[nt][1];
        row1[0] = acc_mma[nt][2];
        row1[1] = acc_mma[nt][3];
      }
    }
  } else {
    const int i = tid >> 1;
    if (i < kDp) {
#pragma unroll
      for (int jj = 0; jj < kDp / 2; ++jj) g_out[i * g_stride + (tid & 1) * (kDp / 2) + jj] = acc_fma[jj];
    }
  }
}

// --------------------------------------------------------------------------------------- softmax
// A = softmax_j(τ G_ij / (r_q,i r_k,j)) over j < D, from sG and sNorm; rows and columns ≥ D are 0.
// A quad of threads per row (lane c takes columns c, c + 4, ...). fp16/bf16: A goes to sA (input
// type, tile stride); fp32: over G in place (each quad reads its whole row before writing it).
template <typename T, int kDp>
__device__ __forceinline__ void softmax_rows(const XcaArgs& a, float tau, float* sG, const float* sNorm, T* sA) {
  using Tr = XcaTraits<T, kDp>;
  const int tid = threadIdx.x;
  const int c = tid & 3;
  for (int i0 = 0; i0 < kDp; i0 += kThreads / 4) {
    const int i = i0 + (tid >> 2);
    if (i >= kDp) break;  // whole warps: kDp - i0 is a multiple of 16 rows = 64 threads
    const bool row_live = i < a.D;
    const float rq = fmaxf(sqrtf(sNorm[i]), 1e-12f);
    float x[kDp / 4];
    float mx = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kDp / 4; ++jj) {
      const int j = c + 4 * jj;
      x[jj] = -INFINITY;
      if (row_live && j < a.D) {
        const float rk = fmaxf(sqrtf(sNorm[kDp + j]), 1e-12f);
        x[jj] = tau * (sG[i * Tr::kGStride + j] / (rq * rk)) * kLog2e;
      }
      mx = fmaxf(mx, x[jj]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    float sum = 0.f;
#pragma unroll
    for (int jj = 0; jj < kDp / 4; ++jj) {
      x[jj] = (x[jj] == -INFINITY) ? 0.f : exp2f(x[jj] - mx);
      sum += x[jj];
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int jj = 0; jj < kDp / 4; ++jj) {
      const int j = c + 4 * jj;
      if constexpr (Tr::kMma) {
        sA[i * Tr::kStride + j] = from_float<T>(x[jj] * inv);
      } else {
        sG[i * Tr::kGStride + j] = x[jj] * inv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------- apply pass
// out = v Aᵀ over tokens [r_begin, r_end). fp16/bf16: each warp owns 16 tokens of a 64-token
// tile; out = V · Aᵀ is attention's S = Q · Kᵀ step (warp_scores) with v as Q and A's rows as the
// keys. Staged through the warp's own rows of the tile, stored in 16-byte chunks.
template <typename T, int kDp>
__device__ __forceinline__ void apply_pass(const XcaArgs& a, const T* v, T* out, int r_begin, int r_end, T* sV,
                                           const T* sA, const float* sAf) {
  using Tr = XcaTraits<T, kDp>;
  constexpr int kStride = Tr::kStride;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  for (int r0 = r_begin; r0 < r_end; r0 += Tr::kRows) {
    __syncthreads();  // A is written; every warp is done with the previous tile's staging
    load_tile_async<T, Tr::kRows, kDp, kStride, kThreads>(sV, v, a.vs[2], r0, r_end, a.D);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if constexpr (Tr::kMma) {
      const int row0 = r0 + warp * 16;
      if (row0 >= r_end) continue;  // no barrier below: the warp may skip its work
      const T* sVw = sV + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
      uint32_t vf[Shape<kDp>::kQRegs][4];
      load_q_fragments<T, kDp>(vf, sVw);
      float s[kNT][4];
      warp_scores<T, kDp>(s, vf, sVw, sA, lane, kDp);
      T* sO = sV + warp * 16 * kStride;
      const int g = lane >> 2, t = lane & 3;
      __syncwarp();  // every lane's fragment loads of these rows are done
#pragma unroll
      for (int nt = 0; nt < kDp / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(sO + g * kStride + nt * 8 + 2 * t) = Mma<T>::pack(s[nt][0], s[nt][1]);
        *reinterpret_cast<uint32_t*>(sO + (g + 8) * kStride + nt * 8 + 2 * t) = Mma<T>::pack(s[nt][2], s[nt][3]);
      }
      __syncwarp();
      constexpr int kChunks = kDp / 8;
      for (int e = lane; e < 16 * kChunks; e += 32) {
        const int r = e / kChunks, ch = e - r * kChunks;
        if (row0 + r < r_end && ch * 8 < a.D) {
          *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * a.os[2] + ch * 8) =
              *reinterpret_cast<const uint4*>(sO + r * kStride + ch * 8);
        }
      }
    } else {
      // fp32: token r = tid / 4, output channels c, c + 4, ... (c = tid % 4), A from sAf (= G's place).
      const int r = tid >> 2, c = tid & 3;
      float o[kDp / 4];
#pragma unroll
      for (int ii = 0; ii < kDp / 4; ++ii) o[ii] = 0.f;
      for (int j = 0; j < kDp; ++j) {
        const float vj = to_float(sV[r * kStride + j]);
#pragma unroll
        for (int ii = 0; ii < kDp / 4; ++ii) o[ii] = fmaf(vj, sAf[(c + 4 * ii) * Tr::kGStride + j], o[ii]);
      }
      if (r0 + r < r_end) {
        float* dst = reinterpret_cast<float*>(out) + static_cast<int64_t>(r0 + r) * a.os[2];
#pragma unroll
        for (int ii = 0; ii < kDp / 4; ++ii) {
          if (c + 4 * ii < a.D) dst[c + 4 * ii] = o[ii];
        }
      }
    }
  }
}

// -------------------------------------------------------------------------------------- kernel
template <typename T, int kDp, int kMode>
__global__ void __launch_bounds__(kThreads) xca_fwd_kernel(const XcaArgs a) {
#if VK_SM80
  using Tr = XcaTraits<T, kDp>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sX = reinterpret_cast<T*>(smem_raw);  // q tile (stats); v tile and output staging (apply)
  T* sY = sX + Tr::kRows * Tr::kStride;    // k tile (stats)
  float* sG = reinterpret_cast<float*>(smem_raw + 2 * Tr::kTileBytes);
  float* sNorm = sG + kDp * Tr::kGStride;
  T* sA = reinterpret_cast<T*>(sNorm + 2 * kDp);

  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.num_chunks));
  const int chunk = static_cast<int>(blockIdx.x) - bh * a.num_chunks;
  const int b = bh / a.H, h = bh - b * a.H;
  const int r_begin = chunk * a.chunk_rows;
  const int r_end = min(a.N, r_begin + a.chunk_rows);

  if constexpr (kMode == kOnePass || kMode == kStats) {
    const T* q = static_cast<const T*>(a.q) + b * a.qs[0] + h * a.qs[1];
    const T* k = static_cast<const T*>(a.k) + b * a.ks[0] + h * a.ks[1];
    if constexpr (kMode == kStats) {
      float* part = a.workspace + static_cast<int64_t>(blockIdx.x) * Tr::kPartFloats;
      stats_pass<T, kDp>(a, q, k, r_begin, r_end, sX, sY, part, kDp, part + kDp * kDp);
      return;
    } else {
      stats_pass<T, kDp>(a, q, k, r_begin, r_end, sX, sY, sG, Tr::kGStride, sNorm);
    }
  } else {
    // Sum the head's chunk partials in chunk order (deterministic).
    const float* parts = a.workspace + static_cast<int64_t>(bh) * a.num_chunks * Tr::kPartFloats;
    for (int e = threadIdx.x; e < Tr::kPartFloats; e += kThreads) {
      float s = 0.f;
      for (int c = 0; c < a.num_chunks; ++c) s += parts[static_cast<int64_t>(c) * Tr::kPartFloats + e];
      if (e < kDp * kDp) {
        sG[(e / kDp) * Tr::kGStride + e % kDp] = s;
      } else {
        sNorm[e - kDp * kDp] = s;
      }
    }
  }
  __syncthreads();  // G and the norms are complete
  softmax_rows<T, kDp>(a, a.temperature[h], sG, sNorm, sA);
  const T* v = static_cast<const T*>(a.v) + b * a.vs[0] + h * a.vs[1];
  T* out = static_cast<T*>(a.out) + b * a.os[0] + h * a.os[1];
  apply_pass<T, kDp>(a, v, out, r_begin, r_end, sX, sA, sG);  // starts with a barrier
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// ---------------------------------------------------------------------------------------- host
constexpr int kMaxHeadDim = 64;

struct Plan {
  int chunk_rows;
  int num_chunks;
  int64_t workspace_floats;
};

// One CTA per head when B·H gives ≥ 2 CTAs per SM or the tokens fit one tile; otherwise about 4
// CTAs per SM, each a chunk of whole tiles.
cudaError_t make_plan(const XcaFwdParams& p, Plan* plan) {
  int sms = 0;
  const cudaError_t err = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err != cudaSuccess) return err;
  const int rows = element_size(p.dtype) == 2 ? 64 : 32;  // tokens per tile (XcaTraits::kRows)
  const int64_t tiles = (static_cast<int64_t>(p.N) + rows - 1) / rows;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  int64_t per_chunk = tiles;
  if (bh < 2 * static_cast<int64_t>(sms) && tiles > 1) {
    // Chunks per head: about 4 CTAs per SM, at most kMaxChunks, because every apply CTA sums all
    // of its head's partials (chunks² · (Dp² + 2·Dp) floats of L2 reads per head).
    constexpr int64_t kMaxChunks = 8;
    const int64_t want = std::min((4 * static_cast<int64_t>(sms) + bh - 1) / bh, kMaxChunks);
    per_chunk = (tiles + want - 1) / want;
  }
  const int64_t chunks = (tiles + per_chunk - 1) / per_chunk;
  if (chunks * bh > INT_MAX || per_chunk * rows > INT_MAX) return cudaErrorInvalidConfiguration;
  const int dp = padded_head_dim(p.D);
  plan->chunk_rows = static_cast<int>(per_chunk * rows);
  plan->num_chunks = static_cast<int>(chunks);
  plan->workspace_floats = chunks > 1 ? bh * chunks * (dp * dp + 2 * dp) : 0;
  return cudaSuccess;
}

template <typename T, int kDp, int kMode>
cudaError_t launch(const XcaArgs& a, unsigned grid, cudaStream_t stream) {
  return launch_kernel(xca_fwd_kernel<T, kDp, kMode>, grid, kThreads, XcaTraits<T, kDp>::kSmemBytes, stream, a);
}

template <typename T, int kDp>
cudaError_t run(const XcaArgs& a, int64_t bh, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(bh * a.num_chunks);
  if (a.num_chunks == 1) return launch<T, kDp, kOnePass>(a, grid, stream);
  const cudaError_t err = launch<T, kDp, kStats>(a, grid, stream);
  if (err != cudaSuccess) return err;
  return launch<T, kDp, kApply>(a, grid, stream);
}

}  // namespace

bool xca_forward_supports(int head_dim, DType dtype) {
  return known_dtype(dtype) && head_dim_in_range(head_dim, kMaxHeadDim);
}

int64_t xca_forward_workspace_floats(const XcaFwdParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.N <= 0 || !xca_forward_supports(p.D, p.dtype)) return 0;
  Plan plan{};
  if (make_plan(p, &plan) != cudaSuccess) return -1;
  return plan.workspace_floats;
}

cudaError_t xca_forward(const XcaFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.N < 0 || !xca_forward_supports(p.D, p.dtype)) return cudaErrorInvalidValue;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  if (bh == 0 || p.N == 0) return cudaSuccess;
  if (p.temperature == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (!qkv_out_vector_aligned(p)) return cudaErrorInvalidValue;
  Plan plan{};
  const cudaError_t err = make_plan(p, &plan);
  if (err != cudaSuccess) return err;
  if (plan.workspace_floats > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;

  XcaArgs a{};
  copy_head_views(a, p);
  a.temperature = p.temperature;
  a.workspace = p.workspace;
  a.N = p.N;
  a.chunk_rows = plan.chunk_rows;
  a.num_chunks = plan.num_chunks;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return dispatch_head_dim<32, 48, 64>(
        p.D, [&](auto dp) { return run<typename decltype(tag)::type, decltype(dp)::value>(a, bh, stream); });
  });
}

}  // namespace vitkernels
