// vitkernels — fused attention forward. Math and layout: attention.h; design and cost:
// docs/attention.md.
#include "attention.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace vitkernels {
namespace {

using namespace ptx;            // cp_async_*, ldmatrix_*, Mma<T> (ptx_sm80.cuh)
using namespace mma_attention;  // load_tile_async, WarpRows, warp_* steps, dispatch_padded_head_dim

// Kernel arguments, already resolved to one dtype. Strides are (B, G, H, N, D), the prefix
// rows' (B, G, H).
struct KernelArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* bias;
  const unsigned char* mask;  // nullable boolean keep-mask at the bias strides (bs)
  void* out;
  float* lse;
  const void* k_prefix;  // nullable (then v_prefix is null too)
  const void* v_prefix;
  const void* q_prefix;  // nullable (then out_prefix and lse_prefix are null too)
  void* out_prefix;
  float* lse_prefix;
  int64_t qs[5], ks[5], vs[5], bs[5], os[5];
  int64_t kps[3], vps[3], qps[3], ops[3];
  int G, H, Nq, Nk, D;
  int num_m_blocks;
  float scale_log2;  // scale · log2(e)
};

// The CTA's sequence (b, g, h) and query block, from the 1-D grid.
struct Sequence {
  int64_t bgh;  // (b·G + g)·H + h: the row of lse
  int b, g, h;
  int m_block;

  __device__ __forceinline__ explicit Sequence(const KernelArgs& a) {
    m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.num_m_blocks));
    const int s = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.num_m_blocks));
    bgh = s;
    h = s % a.H;
    g = (s / a.H) % a.G;
    b = s / a.H / a.G;
  }
  // Element offset of this sequence in a tensor with (B, G, H, ...) strides s.
  __device__ __forceinline__ int64_t offset(const int64_t* s) const { return b * s[0] + g * s[1] + h * s[2]; }
};

template <typename T>
__device__ __forceinline__ const T* seq_ptr(const void* base, const Sequence& sq, const int64_t* s) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + sq.offset(s);
}

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
__global__ void __launch_bounds__(MmaTraits<kDp>::kThreads) attention_fwd_mma_kernel(const KernelArgs args) {
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

  const Sequence sq(args);
  const int Nq = args.Nq, Nk = args.Nk, D = args.D;
  const int m0 = sq.m_block * kBlockM;

  const T* q = seq_ptr<T>(args.q, sq, args.qs);
  const T* k = seq_ptr<T>(args.k, sq, args.ks);
  const T* v = seq_ptr<T>(args.v, sq, args.vs);
  const T* q_prefix = seq_ptr<T>(args.q_prefix, sq, args.qps);

  // Prologue: Q tile (with the prefix query as row Nq) and K[0] in one cp.async group.
  const int n_blocks = (Nk + kBlockN - 1) / kBlockN;
  load_tile_async<T, kBlockM, kDp, kStride, Tr::kThreads>(sQ, q, args.qs[3], m0, Nq, D, q_prefix);
  if (n_blocks > 0) {
    load_tile_async<T, kBlockN, kDp, kStride, Tr::kThreads>(sK, k, args.ks[3], 0, Nk, D);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // A warp whose 16 rows are all past the last query row (the prefix query included) only helps
  // load tiles and keeps the barriers: a short sequence (8 frames) does not pay for 64 rows.
  const bool active = m0 + warp * 16 < Nq + (q_prefix != nullptr ? 1 : 0);
  const T* sQw = sQ + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
  uint32_t qf[Shape<kDp>::kQRegs][4];
  if (active) load_q_fragments<T, kDp>(qf, sQw);

  // Bias row pointers for the two rows this thread owns (nullptr when the row is out of range).
  const int row0 = m0 + warp * 16 + g;
  const int row1 = row0 + 8;
  const T* bias_r0 = nullptr;
  const T* bias_r1 = nullptr;
  if (args.bias != nullptr) {
    const T* bb = seq_ptr<T>(args.bias, sq, args.bs);
    if (row0 < Nq) bias_r0 = bb + static_cast<int64_t>(row0) * args.bs[3];
    if (row1 < Nq) bias_r1 = bb + static_cast<int64_t>(row1) * args.bs[3];
  }
  const unsigned char* mask_r0 = nullptr;
  const unsigned char* mask_r1 = nullptr;
  if (args.mask != nullptr) {
    const unsigned char* mb = args.mask + sq.offset(args.bs);
    if (row0 < Nq) mask_r0 = mb + static_cast<int64_t>(row0) * args.bs[3];
    if (row1 < Nq) mask_r1 = mb + static_cast<int64_t>(row1) * args.bs[3];
  }

  WarpRows<kDp> w;
  w.reset();
  if (active && args.k_prefix != nullptr) {
    warp_prefix_key<T, kDp>(w, sQ + warp * 16 * kStride, seq_ptr<T>(args.k_prefix, sq, args.kps),
                            seq_ptr<T>(args.v_prefix, sq, args.vps), D, args.scale_log2, lane);
  }
  mma_key_loop<T, kDp, Tr::kThreads>(
      w, qf, sQw, sK, sV, k, args.ks[3], v, args.vs[3], Nk, D, active, lane,
      [&](float(&s)[kNT][4], int n0) {
        softmax_update<T, kDp>(s, w, n0, Nk, args.scale_log2, bias_r0, bias_r1, args.bs[4], t, mask_r0, mask_r1);
      },
      [](int) {});

  // Epilogue: this warp's 16 rows are staged through its own rows of sQ (no other warp touches
  // them, and Q was consumed into registers by this warp).
  T* out = static_cast<T*>(args.out) + sq.offset(args.os);
  T* out_prefix = args.out_prefix == nullptr ? nullptr : static_cast<T*>(args.out_prefix) + sq.offset(args.ops);
  if (active) {
    warp_store<T, kDp>(w, sQ + warp * 16 * kStride, out, args.os[3], args.lse + sq.bgh * Nq, m0 + warp * 16, Nq, D,
                       lane, out_prefix, out_prefix == nullptr ? nullptr : args.lse_prefix + sq.bgh);
  }
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// v2: each warp owns 32 query rows (two 16-row groups, a 128-row CTA), so every K / V fragment it
// loads with ldmatrix feeds two MMAs instead of one (mma_key_loop_rows). Head dims ≤ 64 only: Q
// stays in registers and two groups' (o, s, Q) fit 255 registers without spilling. Same math per
// row as v1 (the same scores, softmax steps and P·V order), so the results are bitwise equal.
template <int kDp>
constexpr bool kHasMmaV2 = kDp <= 64;

template <int kDp>
struct MmaV2Traits : MmaTraits<kDp> {
  static constexpr int kGroups = 2;
  static constexpr int kWarpRows = 16 * kGroups;
  static constexpr int kBlockM = MmaTraits<kDp>::kWarps * kWarpRows;
  static constexpr int kSmemBytes = (kBlockM + 2 * MmaTraits<kDp>::kBlockN) * MmaTraits<kDp>::kStride * 2;
};

template <typename T, int kDp>
__global__ void __launch_bounds__(MmaV2Traits<kDp>::kThreads) attention_fwd_mma_v2_kernel(const KernelArgs args) {
#if VK_SM80
  using Tr = MmaV2Traits<kDp>;
  constexpr int kG = Tr::kGroups;
  constexpr int kStride = Tr::kStride;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tr::kBlockM * kStride;
  T* sV = sK + Tr::kBlockN * kStride;

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;

  const Sequence sq(args);
  const int Nq = args.Nq, Nk = args.Nk, D = args.D;
  const int m0 = sq.m_block * Tr::kBlockM;
  const T* k = seq_ptr<T>(args.k, sq, args.ks);
  const T* v = seq_ptr<T>(args.v, sq, args.vs);
  const T* q_prefix = seq_ptr<T>(args.q_prefix, sq, args.qps);

  load_tile_async<T, Tr::kBlockM, kDp, kStride, Tr::kThreads>(sQ, seq_ptr<T>(args.q, sq, args.qs), args.qs[3], m0, Nq,
                                                              D, q_prefix);
  if (Nk > 0) load_tile_async<T, Tr::kBlockN, kDp, kStride, Tr::kThreads>(sK, k, args.ks[3], 0, Nk, D);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  const int wrow0 = m0 + warp * Tr::kWarpRows;  // the warp's first row
  const bool active = wrow0 < Nq + (q_prefix != nullptr ? 1 : 0);
  T* sQw0 = sQ + warp * Tr::kWarpRows * kStride;  // the warp's 32 Q rows (and later its output rows)
  const T* sQw = sQw0 + (lane & 15) * kStride + (lane >> 4) * 8;
  uint32_t qf[kG][Shape<kDp>::kQRegs][4];
  WarpRows<kDp> w[kG];
#pragma unroll
  for (int r = 0; r < kG; ++r) {
    if (active) load_q_fragments<T, kDp>(qf[r], sQw + r * 16 * kStride);
    w[r].reset();
    if (active && args.k_prefix != nullptr) {
      warp_prefix_key<T, kDp>(w[r], sQw0 + r * 16 * kStride, seq_ptr<T>(args.k_prefix, sq, args.kps),
                              seq_ptr<T>(args.v_prefix, sq, args.vps), D, args.scale_log2, lane);
    }
  }

  // Bias / mask row h (0, 1) of group r, formed where the key loop needs it (not held: two groups'
  // row pointers in registers cost a spill); nullptr past Nq or without a bias / mask.
  const T* bias_b = args.bias == nullptr ? nullptr : seq_ptr<T>(args.bias, sq, args.bs);
  const unsigned char* mask_b = args.mask == nullptr ? nullptr : args.mask + sq.offset(args.bs);
  auto row_of = [&](auto* base, int r, int h) -> decltype(base) {
    const int row = wrow0 + r * 16 + g + 8 * h;
    return base == nullptr || row >= Nq ? nullptr : base + static_cast<int64_t>(row) * args.bs[3];
  };
  mma_key_loop_rows<T, kDp, Tr::kThreads, kG>(
      w, qf, sQw, sK, sV, k, args.ks[3], v, args.vs[3], Nk, D, active, lane,
      [&](int r, float(&s)[kNT][4], int n0) {
        softmax_update<T, kDp>(s, w[r], n0, Nk, args.scale_log2, row_of(bias_b, r, 0), row_of(bias_b, r, 1), args.bs[4],
                               t, row_of(mask_b, r, 0), row_of(mask_b, r, 1));
      },
      [](int) {});

  T* out = static_cast<T*>(args.out) + sq.offset(args.os);
  T* out_prefix = args.out_prefix == nullptr ? nullptr : static_cast<T*>(args.out_prefix) + sq.offset(args.ops);
  if (active) {
#pragma unroll
    for (int r = 0; r < kG; ++r) {
      warp_store<T, kDp>(w[r], sQw0 + r * 16 * kStride, out, args.os[3], args.lse + sq.bgh * Nq, wrow0 + r * 16, Nq, D,
                         lane, out_prefix, out_prefix == nullptr ? nullptr : args.lse_prefix + sq.bgh);
    }
  }
#else
  __trap();  // built for an arch older than sm_80: unsupported
#endif
}

// ---------------------------------------------------------------------------------------------
// fp32 CUDA-core kernel (QuadTraits: 32 query rows per CTA, 4 threads per row, keys in blocks of 32).
// ---------------------------------------------------------------------------------------------
template <int kDp>
__global__ void __launch_bounds__(QuadTraits<kDp>::kThreads) attention_fwd_f32_kernel(const KernelArgs args) {
#if VK_SM80
  using Tr = QuadTraits<kDp>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const QuadTiles<kDp> sm(smem_raw);

  const int r = threadIdx.x >> 2;  // query row within the tile
  const int c = threadIdx.x & 3;   // lane within the row's quad
  const Sequence sq(args);
  const int Nq = args.Nq, Nk = args.Nk, D = args.D;
  const int row = sq.m_block * Tr::kBlockM + r;

  const float* bias_r = nullptr;
  if (args.bias != nullptr && row < Nq) {
    bias_r = seq_ptr<float>(args.bias, sq, args.bs) + static_cast<int64_t>(row) * args.bs[3];
  }
  const unsigned char* mask_r = nullptr;
  if (args.mask != nullptr && row < Nq) {
    mask_r = args.mask + sq.offset(args.bs) + static_cast<int64_t>(row) * args.bs[3];
  }
  const int64_t bs4 = args.bs[4];

  load_tile_async<float, Tr::kBlockM, kDp, Tr::kStride, Tr::kThreads>(sm.q, seq_ptr<float>(args.q, sq, args.qs),
                                                                      args.qs[3], sq.m_block * Tr::kBlockM, Nq, D,
                                                                      seq_ptr<float>(args.q_prefix, sq, args.qps));
  cp_async_commit();
  const float* qrow = sm.q + r * Tr::kStride;

  QuadRow<kDp> qr;
  qr.reset();
  if (args.k_prefix != nullptr) {
    // The prefix key/value starts the softmax (see attention.h): max = its score, sum = 1 (held
    // by lane c = 0 of the row's quad), o = its value. Lane c takes head dims c, c + 4, ...
    const float* kp = seq_ptr<float>(args.k_prefix, sq, args.kps);
    const float* vp = seq_ptr<float>(args.v_prefix, sq, args.vps);
    cp_async_wait_all();
    __syncthreads();  // the Q tile has landed for every thread
    float sp = 0.f;
    for (int d = c; d < D; d += 4) sp = fmaf(qrow[d], kp[d], sp);
    sp += __shfl_xor_sync(0xffffffffu, sp, 1);
    sp += __shfl_xor_sync(0xffffffffu, sp, 2);
    qr.row_max = sp * args.scale_log2;
    qr.row_sum = (c == 0) ? 1.f : 0.f;
#pragma unroll
    for (int i = 0; i < Tr::kI; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = 16 * i + 4 * c + e;
        qr.o[i][e] = d < D ? vp[d] : 0.f;
      }
    }
  }

  quad_key_loop<kDp>(
      qr, sm, qrow, seq_ptr<float>(args.k, sq, args.ks), args.ks[3], seq_ptr<float>(args.v, sq, args.vs), args.vs[3],
      Nk, D, r, c, [](int) {},
      [&](float dot, int col, int) {
        float x = dot * args.scale_log2;
        if (bias_r != nullptr && col < Nk) x = fmaf(bias_r[col * bs4], kLog2e, x);
        if (mask_r != nullptr && col < Nk && mask_r[col * bs4] == 0) x = -INFINITY;
        return x;
      });
  if (Nk == 0) cp_async_wait_all();  // no key block: retire the Q copy before exiting

  const float l = qr.total();
  const float inv = (l == 0.f) ? 0.f : 1.f / l;  // l == 0: fully masked row
  const bool prefix_row = row == Nq && args.q_prefix != nullptr;
  if (row < Nq || prefix_row) {
    const float lse_row = (l == 0.f) ? INFINITY : (qr.row_max + log2f(l)) * kLn2;
    if (c == 0) {
      if (prefix_row) {
        args.lse_prefix[sq.bgh] = lse_row;
      } else {
        args.lse[sq.bgh * Nq + row] = lse_row;
      }
    }
    float* out = prefix_row
                     ? static_cast<float*>(args.out_prefix) + sq.offset(args.ops)
                     : static_cast<float*>(args.out) + sq.offset(args.os) + static_cast<int64_t>(row) * args.os[3];
#pragma unroll
    for (int i = 0; i < Tr::kI; ++i) {
      const int d = 16 * i + 4 * c;
      if (d < D) {
        *reinterpret_cast<float4*>(out + d) =
            make_float4(qr.o[i][0] * inv, qr.o[i][1] * inv, qr.o[i][2] * inv, qr.o[i][3] * inv);
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
template <typename T, int kDp, bool kV2 = false>
cudaError_t launch_forward(const KernelArgs& base, int64_t sequences, int rows, cudaStream_t stream) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  using Tr = std::conditional_t<kF32, QuadTraits<kDp>, std::conditional_t<kV2, MmaV2Traits<kDp>, MmaTraits<kDp>>>;
  KernelArgs args = base;
  const int64_t m_blocks = (static_cast<int64_t>(rows) + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t grid = m_blocks * sequences;
  if (grid > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  args.num_m_blocks = static_cast<int>(m_blocks);
  const unsigned g = static_cast<unsigned>(grid);
  if constexpr (kF32) {
    return launch_kernel(attention_fwd_f32_kernel<kDp>, g, Tr::kThreads, Tr::kSmemBytes, stream, args);
  } else if constexpr (kV2) {
    return launch_kernel(attention_fwd_mma_v2_kernel<T, kDp>, g, Tr::kThreads, Tr::kSmemBytes, stream, args);
  } else {
    return launch_kernel(attention_fwd_mma_kernel<T, kDp>, g, Tr::kThreads, Tr::kSmemBytes, stream, args);
  }
}

#define VK_STRINGIFY_(...) #__VA_ARGS__
#define VK_STRINGIFY(...) VK_STRINGIFY_(__VA_ARGS__)

// A prefix row: its pointer (null = absent) meets the vector-load requirements, with the head dim
// contiguous and (B, G, H) strides.
bool prefix_aligned(const void* ptr, const int64_t (&s)[3], DType dtype) {
  const int64_t st[4] = {s[0], s[1], s[2], 1};
  return ptr == nullptr || vector_aligned(ptr, st, 4, dtype);
}

}  // namespace

bool attention_forward_supports(int head_dim, DType dtype) {
  return known_dtype(dtype) && head_dim_in_range(head_dim, kAttentionMaxHeadDim);
}

bool attention_forward_tensor_aligned(const void* ptr, const int64_t* stride, int ndim, DType dtype) {
  return vector_aligned(ptr, stride, ndim, dtype);
}

const char* attention_built_archs() {
#if defined(__CUDA_ARCH_LIST__)
  return VK_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

cudaError_t attention_forward(const AttentionFwdParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.G < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0 || p.D <= 0) return cudaErrorInvalidValue;
  if (!attention_forward_supports(p.D, p.dtype)) return cudaErrorInvalidValue;
  // Prefix rows come whole: key with value, query with its output and lse.
  if ((p.k_prefix == nullptr) != (p.v_prefix == nullptr)) return cudaErrorInvalidValue;
  const bool q_prefix = p.q_prefix != nullptr;
  if (q_prefix != (p.out_prefix != nullptr) || q_prefix != (p.lse_prefix != nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.Nq == INT_MAX && q_prefix) return cudaErrorInvalidValue;
  const int64_t sequences = static_cast<int64_t>(p.B) * p.G * p.H;
  const int rows = p.Nq + (q_prefix ? 1 : 0);           // query rows per sequence, the prefix query last
  if (sequences == 0 || rows == 0) return cudaSuccess;  // nothing to compute
  if (p.Nq > 0 && (p.lse == nullptr || !attention_forward_tensor_aligned(p.q, p.q_stride, 5, p.dtype) ||
                   !attention_forward_tensor_aligned(p.out, p.out_stride, 5, p.dtype))) {
    return cudaErrorInvalidValue;
  }
  if (p.Nk > 0 && (!attention_forward_tensor_aligned(p.k, p.k_stride, 5, p.dtype) ||
                   !attention_forward_tensor_aligned(p.v, p.v_stride, 5, p.dtype))) {
    return cudaErrorInvalidValue;
  }
  if (!prefix_aligned(p.k_prefix, p.kp_stride, p.dtype) || !prefix_aligned(p.v_prefix, p.vp_stride, p.dtype) ||
      !prefix_aligned(p.q_prefix, p.qp_stride, p.dtype) || !prefix_aligned(p.out_prefix, p.op_stride, p.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (p.bias != nullptr && !aligned_to(p.bias, element_size(p.dtype))) return cudaErrorInvalidValue;
  if (p.bias != nullptr && p.mask != nullptr) return cudaErrorInvalidValue;  // one or the other

  KernelArgs args{};
  copy_head_views(args, p);
  args.lse = p.lse;
  args.bias = p.bias;
  args.mask = p.mask;
  if (p.bias != nullptr || p.mask != nullptr) copy_strides(args.bs, p.bias_stride);  // else 0 (args{})
  args.k_prefix = p.k_prefix;
  args.v_prefix = p.v_prefix;
  args.q_prefix = p.q_prefix;
  args.out_prefix = p.out_prefix;
  args.lse_prefix = p.lse_prefix;
  copy_strides(args.kps, p.kp_stride);  // the prefix rows' (B, G, H) strides
  copy_strides(args.vps, p.vp_stride);
  copy_strides(args.qps, p.qp_stride);
  copy_strides(args.ops, p.op_stride);
  args.G = p.G;
  args.Nq = p.Nq;
  args.Nk = p.Nk;
  args.scale_log2 = p.scale * kLog2e;

  return dispatch_dtype(p.dtype, [&](auto tag) {
    return dispatch_padded_head_dim(p.D, [&](auto dp) {
      using T = typename decltype(tag)::type;
      constexpr int kDp = decltype(dp)::value;
      if constexpr (!std::is_same<T, float>::value && kHasMmaV2<kDp>) {
        if (p.kernel_version == 0) return launch_forward<T, kDp, true>(args, sequences, rows, stream);
      }
      return launch_forward<T, kDp>(args, sequences, rows, stream);
    });
  });
}

}  // namespace vitkernels
