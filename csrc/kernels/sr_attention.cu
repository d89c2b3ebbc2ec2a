// vitkernels — spatial-reduction attention forward (N ≫ M). Math and layout: sr_attention.h;
// design and cost: docs/sr_attention.md.
#include "sr_attention.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace vitkernels {
namespace {

using namespace ptx;            // cp_async_*, Mma<T>
using namespace mma_attention;  // load_tile_async, WarpRows, warp_* steps, kKeyBlock, padded head dims

constexpr int kMaxKeys = 256;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per tile (16 per warp)

struct SrArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t qs[4], ks[4], vs[4], os[4];
  int H, N, M, D;
  int m_pad;       // M rounded up to a multiple of kKeyBlock (rows of K and V in shared memory)
  int rows;        // query rows per CTA, a multiple of kBlockM
  int num_chunks;  // CTAs per (b, h) = ⌈N / rows⌉
  float scale_log2;
};

template <typename T, int kDp>
__global__ void __launch_bounds__(kThreads) sr_attention_fwd_kernel(const SrArgs a) {
#if VK_SM80
  constexpr int kStride = Shape<kDp>::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + a.m_pad * kStride;
  T* sQbuf = sV + a.m_pad * kStride;  // two query tiles of kBlockM rows (double buffer)

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int chunk = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.num_chunks));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.num_chunks));
  const int b = bh / a.H;
  const int h = bh - b * a.H;
  const int r_begin = chunk * a.rows;
  const int r_end = min(r_begin + a.rows, a.N);

  const T* q = static_cast<const T*>(a.q) + b * a.qs[0] + h * a.qs[1];
  const T* k = static_cast<const T*>(a.k) + b * a.ks[0] + h * a.ks[1];
  const T* v = static_cast<const T*>(a.v) + b * a.vs[0] + h * a.vs[1];
  T* out = static_cast<T*>(a.out) + b * a.os[0] + h * a.os[1];
  float* lse = a.lse + static_cast<int64_t>(bh) * a.N;

  // Prologue: every key and value of the head (zero rows past M) and the first query tile.
  for (int j = 0; j < a.m_pad; j += kKeyBlock) {
    load_tile_async<T, kKeyBlock, kDp, kStride, kThreads>(sK + j * kStride, k, a.ks[2], j, a.M, a.D);
    load_tile_async<T, kKeyBlock, kDp, kStride, kThreads>(sV + j * kStride, v, a.vs[2], j, a.M, a.D);
  }
  load_tile_async<T, kBlockM, kDp, kStride, kThreads>(sQbuf, q, a.qs[2], r_begin, r_end, a.D);
  cp_async_commit();

  const int n_tiles = (r_end - r_begin + kBlockM - 1) / kBlockM;
  const int n_key_blocks = a.m_pad / kKeyBlock;
  for (int i = 0; i < n_tiles; ++i) {
    T* sQ = sQbuf + (i & 1) * kBlockM * kStride;
    const int m0 = r_begin + i * kBlockM;
    if (i + 1 < n_tiles) {
      // Prefetch tile i + 1 into the other buffer (free: the barrier ending iteration i - 1).
      load_tile_async<T, kBlockM, kDp, kStride, kThreads>(sQbuf + ((i + 1) & 1) * kBlockM * kStride, q, a.qs[2],
                                                          m0 + kBlockM, r_end, a.D);
      cp_async_commit();
      cp_async_wait<1>();  // everything but that prefetch has landed (tile i, and K/V)
    } else {
      cp_async_wait_all();
    }
    __syncthreads();

    const T* sQw = sQ + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
    uint32_t qf[Shape<kDp>::kQRegs][4];
    load_q_fragments<T, kDp>(qf, sQw);
    WarpRows<kDp> w;
    w.reset();
    // K and V are resident: no barrier in this loop.
    for (int j = 0; j < n_key_blocks; ++j) {
      float s[kNT][4];
      const int n_valid = a.M - j * kKeyBlock;
      warp_scores<T, kDp>(s, qf, sQw, sK + j * kKeyBlock * kStride, lane, n_valid);
      softmax_update<T, kDp>(s, w, j * kKeyBlock, a.M, a.scale_log2, nullptr, nullptr, 0, lane & 3);
      uint32_t pf[kPK][4];
      pack_p<T>(pf, s);
      warp_pv<T, kDp>(w, pf, sV + j * kKeyBlock * kStride, lane, n_valid);
    }
    // Output staged through this warp's own 16 rows of the current query buffer.
    warp_store<T, kDp>(w, sQ + warp * 16 * kStride, out, a.os[2], lse, m0 + warp * 16, r_end, a.D, lane);
    __syncthreads();  // every warp is done with buffer (i & 1) before tile i + 2 is loaded into it
  }
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// The general kernel for float32 (CUDA cores, keys streamed).
cudaError_t forward_fp32(const SrAttentionFwdParams& p, cudaStream_t stream) {
  AttentionFwdParams g{};
  g.q = p.q;
  g.k = p.k;
  g.v = p.v;
  g.bias = nullptr;
  g.out = p.out;
  g.lse = p.lse;
  attention_one_group_strides(p.q_stride, g.q_stride);
  attention_one_group_strides(p.k_stride, g.k_stride);
  attention_one_group_strides(p.v_stride, g.v_stride);
  attention_one_group_strides(p.out_stride, g.out_stride);
  for (int i = 0; i < 5; ++i) g.bias_stride[i] = 0;
  g.B = p.B;
  g.G = 1;
  g.H = p.H;
  g.Nq = p.N;
  g.Nk = p.M;
  g.D = p.D;
  g.scale = p.scale;
  g.dtype = DType::kFloat32;
  return attention_forward(g, stream);
}

}  // namespace

int sr_attention_forward_smem_bytes(int M, int D) {
  if (M < 1 || M > kMaxKeys || !head_dim_in_range(D, kAttentionMaxHeadDim)) return 0;
  const int m_pad = (M + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  return (2 * m_pad + 2 * kBlockM) * (padded_head_dim(D) + 8) * 2;
}

bool sr_attention_forward_supports(int M, int D, DType dtype, int max_smem_bytes) {
  if (M < 1 || M > kMaxKeys || !attention_forward_supports(D, dtype)) return false;
  if (dtype == DType::kFloat32) return true;
  return sr_attention_forward_smem_bytes(M, D) <= max_smem_bytes;
}

cudaError_t sr_attention_forward(const SrAttentionFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.N < 0 || p.M < 1 || p.M > kMaxKeys) return cudaErrorInvalidValue;
  if (!attention_forward_supports(p.D, p.dtype)) return cudaErrorInvalidValue;
  if (p.rows_per_cta < 0 || p.rows_per_cta % kBlockM != 0) return cudaErrorInvalidValue;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  if (bh == 0 || p.N == 0) return cudaSuccess;
  if (p.out == nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  if (p.dtype == DType::kFloat32) return forward_fp32(p, stream);
  if (!attention_forward_tensor_aligned(p.q, p.q_stride, p.dtype) ||
      !attention_forward_tensor_aligned(p.k, p.k_stride, p.dtype) ||
      !attention_forward_tensor_aligned(p.v, p.v_stride, p.dtype) ||
      !attention_forward_tensor_aligned(p.out, p.out_stride, p.dtype)) {
    return cudaErrorInvalidValue;
  }

  int sms = 0, max_smem = 0;
  cudaError_t err = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err == cudaSuccess) err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &max_smem);
  if (err != cudaSuccess) return err;
  const int smem = sr_attention_forward_smem_bytes(p.M, p.D);
  if (smem == 0 || smem > max_smem) return cudaErrorInvalidValue;

  // Rows per CTA: about 4 CTAs per SM over the whole grid, a multiple of the query tile.
  int64_t rows = p.rows_per_cta;
  if (rows == 0) {
    const int64_t per_head = (4 * static_cast<int64_t>(sms) + bh - 1) / bh;  // CTAs per (b, h)
    rows = (p.N + per_head - 1) / per_head;
    rows = (rows + kBlockM - 1) / kBlockM * kBlockM;
  }
  const int64_t chunks = (p.N + rows - 1) / rows;
  if (chunks * bh > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;

  SrArgs args{};
  copy_head_views(args, p);
  args.lse = p.lse;
  args.N = p.N;
  args.M = p.M;
  args.m_pad = (p.M + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  args.rows = static_cast<int>(rows);
  args.num_chunks = static_cast<int>(chunks);
  args.scale_log2 = p.scale * kLog2e;
  const unsigned grid = static_cast<unsigned>(chunks * bh);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same<T, float>::value) {
      return cudaErrorInvalidValue;  // float32 went to forward_fp32 above
    } else {
      return dispatch_padded_head_dim(p.D, [&](auto dp) {
        return launch_kernel(sr_attention_fwd_kernel<T, decltype(dp)::value>, grid, kThreads, smem, stream, args);
      });
    }
  });
}

}  // namespace vitkernels
