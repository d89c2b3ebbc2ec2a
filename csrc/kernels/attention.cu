// vitkernels — fused attention forward. See attention.h for the math, cost model and design.
#include "attention.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace vitkernels {
namespace {

using namespace ptx;             // cp_async_*, ldmatrix_*, Mma<T>, to_float (ptx_sm80.cuh)
using namespace mma_attention;  // load_tile_async, WarpRows, warp_* steps, kLog2e, kLn2

// Kernel arguments, already resolved to one dtype.
struct KernelArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* bias;
  void* out;
  float* lse;
  int64_t qs[4], ks[4], vs[4], bs[4], os[4];
  int H, Nq, Nk, D;
  int num_m_blocks;
  float scale_log2;  // scale · log2(e)
};

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 tensor-core kernel.
// ---------------------------------------------------------------------------------------------
template <int kDp>
struct MmaTraits {
  static constexpr int kBlockM = 64;         // query rows per CTA (16 per warp)
  static constexpr int kBlockN = kKeyBlock;  // keys per iteration
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = Shape<kDp>::kStride;
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kStride;
  static constexpr int kSmemBytes = kSmemElems * 2;
};

template <typename T, int kDp>
__global__ void __launch_bounds__(MmaTraits<kDp>::kThreads)
    attention_fwd_mma_kernel(const KernelArgs args) {
#if VK_SM80
  using Tr = MmaTraits<kDp>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // accumulator row within the 8-row group
  const int t = lane & 3;   // accumulator column pair

  const int m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(args.num_m_blocks));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(args.num_m_blocks));
  const int b = bh / args.H;
  const int h = bh - b * args.H;
  const int Nq = args.Nq, Nk = args.Nk, D = args.D;
  const int m0 = m_block * kBlockM;

  const T* q = static_cast<const T*>(args.q) + b * args.qs[0] + h * args.qs[1];
  const T* k = static_cast<const T*>(args.k) + b * args.ks[0] + h * args.ks[1];
  const T* v = static_cast<const T*>(args.v) + b * args.vs[0] + h * args.vs[1];

  // Prologue: Q tile and K[0] in one cp.async group.
  const int n_blocks = (Nk + kBlockN - 1) / kBlockN;
  load_tile_async<T, kBlockM, kDp, kStride, Tr::kThreads>(sQ, q, args.qs[2], m0, Nq, D);
  if (n_blocks > 0) {
    load_tile_async<T, kBlockN, kDp, kStride, Tr::kThreads>(sK, k, args.ks[2], 0, Nk, D);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  const T* sQw = sQ + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
  uint32_t qf[Shape<kDp>::kQRegs][4];
  load_q_fragments<T, kDp>(qf, sQw);

  // Bias row pointers for the two rows this thread owns (nullptr when the row is out of range).
  const int row0 = m0 + warp * 16 + g;
  const int row1 = row0 + 8;
  const T* bias_r0 = nullptr;
  const T* bias_r1 = nullptr;
  if (args.bias != nullptr) {
    const T* bb = static_cast<const T*>(args.bias) + b * args.bs[0] + h * args.bs[1];
    if (row0 < Nq) bias_r0 = bb + static_cast<int64_t>(row0) * args.bs[2];
    if (row1 < Nq) bias_r1 = bb + static_cast<int64_t>(row1) * args.bs[2];
  }

  WarpRows<kDp> w;
  w.reset();
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    if (j > 0) {
      cp_async_wait_all();  // K[j] has landed
      __syncthreads();      // ... for every thread, and every warp is done reading V[j-1]
    }
    load_tile_async<T, kBlockN, kDp, kStride, Tr::kThreads>(sV, v, args.vs[2], n0, Nk, D);
    cp_async_commit();

    float s[kNT][4];
    warp_scores<T, kDp>(s, qf, sQw, sK, lane);
    softmax_update<T, kDp>(s, w, n0, Nk, args.scale_log2, bias_r0, bias_r1, args.bs[3], t);
    uint32_t pf[kPK][4];
    pack_p<T>(pf, s);

    cp_async_wait_all();  // V[j] has landed
    __syncthreads();      // ... for every thread, and every warp is done reading K[j]
    if (j + 1 < n_blocks) {
      load_tile_async<T, kBlockN, kDp, kStride, Tr::kThreads>(sK, k, args.ks[2], n0 + kBlockN, Nk,
                                                              D);
      cp_async_commit();
    }
    warp_pv<T, kDp>(w, pf, sV, lane);
  }

  // Epilogue: this warp's 16 rows are staged through its own rows of sQ (no other warp touches
  // them, and Q was consumed into registers by this warp).
  T* out = static_cast<T*>(args.out) + b * args.os[0] + h * args.os[1];
  warp_store<T, kDp>(w, sQ + warp * 16 * kStride, out, args.os[2],
                     args.lse + static_cast<int64_t>(bh) * Nq, m0 + warp * 16, Nq, D, lane);
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// ---------------------------------------------------------------------------------------------
// fp32 CUDA-core kernel.
// ---------------------------------------------------------------------------------------------
template <int kDp>
struct F32Traits {
  static constexpr int kBlockM = 32;  // query rows per CTA
  static constexpr int kBlockN = 32;  // keys per iteration
  static constexpr int kThreads = 128;  // 4 threads per query row
  static constexpr int kStride = kDp + 4;  // floats; (kStride / 4) odd → conflict-free float4
  static constexpr int kPStride = kBlockN + 4;
  static constexpr int kSmemFloats = (kBlockM + 2 * kBlockN) * kStride + kBlockM * kPStride;
  static constexpr int kSmemBytes = kSmemFloats * 4;
  static_assert(kDp % 16 == 0 && kDp <= 128, "padded head dim must be a multiple of 16, <= 128");
  static_assert(((kStride / 4) & 1) == 1, "row stride in 16B units must be odd");
};

template <int kDp>
__global__ void __launch_bounds__(F32Traits<kDp>::kThreads)
    attention_fwd_f32_kernel(const KernelArgs args) {
#if VK_SM80
  using Tr = F32Traits<kDp>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;
  constexpr int kPStride = Tr::kPStride;
  constexpr int kJ = kBlockN / 4;  // scores per thread per tile (keys c, c+4, ...)
  constexpr int kI = kDp / 16;     // float4 output groups per thread (dims 16i + 4c .. +3)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + kBlockM * kStride;
  float* sV = sK + kBlockN * kStride;
  float* sP = sV + kBlockN * kStride;

  const int tid = threadIdx.x;
  const int r = tid >> 2;  // query row within the tile
  const int c = tid & 3;   // lane within the row's quad

  const int m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(args.num_m_blocks));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(args.num_m_blocks));
  const int b = bh / args.H;
  const int h = bh - b * args.H;
  const int Nq = args.Nq, Nk = args.Nk, D = args.D;
  const int m0 = m_block * kBlockM;
  const int row = m0 + r;

  const float* q = static_cast<const float*>(args.q) + b * args.qs[0] + h * args.qs[1];
  const float* k = static_cast<const float*>(args.k) + b * args.ks[0] + h * args.ks[1];
  const float* v = static_cast<const float*>(args.v) + b * args.vs[0] + h * args.vs[1];

  const float* bias_r = nullptr;
  if (args.bias != nullptr && row < Nq) {
    bias_r = static_cast<const float*>(args.bias) + b * args.bs[0] + h * args.bs[1] +
             static_cast<int64_t>(row) * args.bs[2];
  }
  const int64_t bs3 = args.bs[3];

  load_tile_async<float, kBlockM, kDp, kStride, Tr::kThreads>(sQ, q, args.qs[2], m0, Nq, D);
  cp_async_commit();

  float o[kI][4];
#pragma unroll
  for (int i = 0; i < kI; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max = -INFINITY;
  float row_sum = 0.f;  // partial over this thread's keys

  const int n_blocks = (Nk + kBlockN - 1) / kBlockN;
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    __syncthreads();  // every thread is done with the previous K/V tiles
    load_tile_async<float, kBlockN, kDp, kStride, Tr::kThreads>(sK, k, args.ks[2], n0, Nk, D);
    load_tile_async<float, kBlockN, kDp, kStride, Tr::kThreads>(sV, v, args.vs[2], n0, Nk, D);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    float s[kJ];
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) s[jj] = 0.f;
    const float* qrow = sQ + r * kStride;
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

    float new_max = row_max;
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) {
      const int col = n0 + c + 4 * jj;
      float x = s[jj] * args.scale_log2;
      if (bias_r != nullptr && col < Nk) x = fmaf(bias_r[col * bs3], kLog2e, x);
      if (col >= Nk) x = -INFINITY;
      s[jj] = x;
      new_max = fmaxf(new_max, x);
    }
    new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 1));
    new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 2));
    const float m_use = (new_max == -INFINITY) ? 0.f : new_max;
    const float alpha = exp2f(row_max - m_use);
    row_max = new_max;
    row_sum *= alpha;
    float* prow = sP + r * kPStride;
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
    for (int n = 0; n < kBlockN; n += 4) {
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
    __syncwarp();  // P row reads done before the next iteration overwrites it
  }
  if (n_blocks == 0) cp_async_wait_all();  // retire the Q copy before exiting

  float l = row_sum;
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  const float inv = (l == 0.f) ? 0.f : 1.f / l;  // l == 0: fully masked row
  if (row < Nq) {
    if (c == 0) {
      args.lse[static_cast<int64_t>(bh) * Nq + row] =
          (l == 0.f) ? INFINITY : (row_max + log2f(l)) * kLn2;
    }
    float* out = static_cast<float*>(args.out) + b * args.os[0] + h * args.os[1] +
                 static_cast<int64_t>(row) * args.os[2];
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      const int d = 16 * i + 4 * c;
      if (d < D) {
        *reinterpret_cast<float4*>(out + d) =
            make_float4(o[i][0] * inv, o[i][1] * inv, o[i][2] * inv, o[i][3] * inv);
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
template <typename Kernel>
cudaError_t launch(Kernel kernel, int threads, int smem_bytes, unsigned grid, cudaStream_t stream,
                   const KernelArgs& args) {
  if (smem_bytes > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <int kDp>
cudaError_t dispatch_dtype(DType dtype, const KernelArgs& base, int64_t bh, int Nq,
                           cudaStream_t stream) {
  KernelArgs args = base;
  int block_m;
  if (dtype == DType::kFloat32) {
    block_m = F32Traits<kDp>::kBlockM;
  } else {
    block_m = MmaTraits<kDp>::kBlockM;
  }
  const int64_t m_blocks = (static_cast<int64_t>(Nq) + block_m - 1) / block_m;
  const int64_t grid = m_blocks * bh;
  if (grid > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  args.num_m_blocks = static_cast<int>(m_blocks);
  const unsigned g = static_cast<unsigned>(grid);
  switch (dtype) {
    case DType::kFloat32:
      return launch(attention_fwd_f32_kernel<kDp>, F32Traits<kDp>::kThreads,
                    F32Traits<kDp>::kSmemBytes, g, stream, args);
    case DType::kFloat16:
      return launch(attention_fwd_mma_kernel<__half, kDp>, MmaTraits<kDp>::kThreads,
                    MmaTraits<kDp>::kSmemBytes, g, stream, args);
    case DType::kBFloat16:
      return launch(attention_fwd_mma_kernel<__nv_bfloat16, kDp>, MmaTraits<kDp>::kThreads,
                    MmaTraits<kDp>::kSmemBytes, g, stream, args);
  }
  return cudaErrorInvalidValue;
}

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

#define VK_STRINGIFY_(...) #__VA_ARGS__
#define VK_STRINGIFY(...) VK_STRINGIFY_(__VA_ARGS__)

}  // namespace

bool attention_forward_supports_head_dim(int D) { return D >= 8 && D <= 128 && D % 8 == 0; }

bool attention_forward_tensor_aligned(const void* ptr, const int64_t stride[4], DType dtype) {
  if (ptr == nullptr) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  if (stride[3] != 1) return false;
  const int64_t per16 = 16 / element_size(dtype);
  for (int i = 0; i < 3; ++i) {
    if (stride[i] % per16 != 0) return false;
  }
  return true;
}

const char* attention_built_archs() {
#if defined(__CUDA_ARCH_LIST__)
  return VK_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

cudaError_t attention_forward(const AttentionFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0 || p.D <= 0) return cudaErrorInvalidValue;
  if (!attention_forward_supports_head_dim(p.D)) return cudaErrorInvalidValue;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  if (bh == 0 || p.Nq == 0) return cudaSuccess;  // nothing to compute
  if (p.lse == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (!attention_forward_tensor_aligned(p.q, p.q_stride, p.dtype) ||
      !attention_forward_tensor_aligned(p.out, p.out_stride, p.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (p.Nk > 0 && (!attention_forward_tensor_aligned(p.k, p.k_stride, p.dtype) ||
                   !attention_forward_tensor_aligned(p.v, p.v_stride, p.dtype))) {
    return cudaErrorInvalidValue;
  }
  if (p.bias != nullptr &&
      reinterpret_cast<uintptr_t>(p.bias) % static_cast<uintptr_t>(element_size(p.dtype)) != 0) {
    return cudaErrorInvalidValue;
  }

  KernelArgs args{};
  args.q = p.q;
  args.k = p.k;
  args.v = p.v;
  args.bias = p.bias;
  args.out = p.out;
  args.lse = p.lse;
  for (int i = 0; i < 4; ++i) {
    args.qs[i] = p.q_stride[i];
    args.ks[i] = p.k_stride[i];
    args.vs[i] = p.v_stride[i];
    args.bs[i] = p.bias != nullptr ? p.bias_stride[i] : 0;
    args.os[i] = p.out_stride[i];
  }
  args.H = p.H;
  args.Nq = p.Nq;
  args.Nk = p.Nk;
  args.D = p.D;
  args.scale_log2 = p.scale * kLog2e;

  if (p.D <= 32) return dispatch_dtype<32>(p.dtype, args, bh, p.Nq, stream);
  if (p.D <= 48) return dispatch_dtype<48>(p.dtype, args, bh, p.Nq, stream);
  if (p.D <= 64) return dispatch_dtype<64>(p.dtype, args, bh, p.Nq, stream);
  if (p.D <= 80) return dispatch_dtype<80>(p.dtype, args, bh, p.Nq, stream);
  if (p.D <= 96) return dispatch_dtype<96>(p.dtype, args, bh, p.Nq, stream);
  return dispatch_dtype<128>(p.dtype, args, bh, p.Nq, stream);
}

}  // namespace vitkernels
