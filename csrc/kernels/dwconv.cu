// vitkernels — depthwise k×k conv forward on token layout. Math and layout: dwconv.h; design and
// cost: docs/dwconv.md.
#include "dwconv.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

namespace vitkernels {
namespace {

constexpr int kThreads = 256;

// VEC elements of T moved as one aligned access (16 B on the vector path).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Tile geometry for one (k, VEC) instantiation.
template <int K, int VEC>
struct Geom {
  static constexpr int CV = VEC > 1 ? 8 : 16;      // threads across the channel chunk
  static constexpr int CH = CV * VEC;              // channels per CTA
  static constexpr int RW = 4;                     // output columns per thread
  static constexpr int RH = K <= 3 ? 2 : 1;        // output rows per thread
  static constexpr int GW = 4;                     // thread groups across W
  static constexpr int GH = kThreads / (CV * GW);  // thread groups across H
  static constexpr int TW = GW * RW;               // tile width (pixels)
  static constexpr int TH = GH * RH;               // tile height (pixels)
  static constexpr int P = K / 2;
  static constexpr int HW_ = TW + K - 1;  // halo tile width
  static constexpr int HH = TH + K - 1;   // halo tile height
  static_assert(CV * GW * GH == kThreads, "thread layout must cover the CTA");
};

// The kernel's arguments: the params as given and the grid's tile counts.
struct Args {
  DwconvFwdParams p;
  int n_tw, n_cb, n_th;
};

template <typename T, int K, int VEC>
__global__ void __launch_bounds__(kThreads, 2) dwconv_fwd_kernel(const Args a) {
  using G = Geom<K, VEC>;
  using PackT = Pack<T, VEC>;
  constexpr int CV = G::CV, CH = G::CH, RW = G::RW, RH = G::RH, GW = G::GW;
  constexpr int HH = G::HH, HWD = G::HW_, P = G::P;

  __shared__ PackT s_x[HH * HWD * CV];
  __shared__ PackT s_w[K * K * CV];
  const DwconvFwdParams& p = a.p;

  // blockIdx.x = ((b·nTH + th)·nTW + tw)·nCB + cb
  int r = static_cast<int>(blockIdx.x);
  const int cb = r % a.n_cb;
  r /= a.n_cb;
  const int tw = r % a.n_tw;
  r /= a.n_tw;
  const int th = r % a.n_th;
  const int b = r / a.n_th;

  const int h0 = th * G::TH;
  const int w0 = tw * G::TW;
  const int c0 = cb * CH;
  const int tid = static_cast<int>(threadIdx.x);

  const T* __restrict__ x = static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.x_stride_b;
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);

  T zero_t = from_float<T>(0.0f);
  PackT zero;
#pragma unroll
  for (int v = 0; v < VEC; ++v) zero.v[v] = zero_t;

  // ---- stage the halo tile (zero outside the map / past C) ----
  for (int idx = tid; idx < HH * HWD * CV; idx += kThreads) {
    const int cv = idx % CV;
    const int pix = idx / CV;  // halo pixel
    const int hc = pix % HWD;
    const int hr = pix / HWD;
    const int gh = h0 + hr - P;
    const int gw = w0 + hc - P;
    const int c = c0 + cv * VEC;
    PackT val = zero;
    if (gh >= 0 && gh < p.H && gw >= 0 && gw < p.W) {
      const T* src = x + (static_cast<int64_t>(gh) * p.W + gw) * p.x_stride_n + c;
      if (VEC > 1) {
        if (c < p.C) val = *reinterpret_cast<const PackT*>(src);  // C % VEC == 0 on this path
      } else {
        if (c < p.C) val.v[0] = src[0];
      }
    }
    s_x[idx] = val;
  }
  // ---- stage the weights of the chunk: s_w[tap][cv] (element v = channel c0 + cv·VEC + v) ----
  for (int idx = tid; idx < K * K * CH; idx += kThreads) {
    const int cc = idx % CH;
    const int tap = idx / CH;
    const int c = c0 + cc;
    T val = zero_t;
    if (c < p.C) val = wgt[static_cast<int64_t>(c) * (K * K) + tap];
    s_w[tap * CV + cc / VEC].v[cc % VEC] = val;
  }
  __syncthreads();

  // ---- thread → (channel vector, column group, row group) ----
  const int cv = tid % CV;
  const int gx = (tid / CV) % GW;
  const int gy = tid / (CV * GW);
  const int c = c0 + cv * VEC;

  float acc[RH][RW][VEC];
  {
    float bias_v[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) bias_v[v] = 0.0f;
    if (p.bias != nullptr && c < p.C) {
      const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
      for (int v = 0; v < VEC; ++v) bias_v[v] = to_float(bias[c + v]);  // C % VEC == 0
    }
#pragma unroll
    for (int rr = 0; rr < RH; ++rr)
#pragma unroll
      for (int o = 0; o < RW; ++o)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[rr][o][v] = bias_v[v];
  }

#pragma unroll
  for (int i = 0; i < K; ++i) {
    float wr[K][VEC];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const PackT wp = s_w[(i * K + j) * CV + cv];
#pragma unroll
      for (int v = 0; v < VEC; ++v) wr[j][v] = to_float(wp.v[v]);
    }
#pragma unroll
    for (int rr = 0; rr < RH; ++rr) {
      // Output row gy·RH + rr uses halo row gy·RH + rr + i; halo col = output col + j.
      const PackT* row = s_x + ((gy * RH + rr + i) * HWD + gx * RW) * CV + cv;
#pragma unroll
      for (int m = 0; m < RW + K - 1; ++m) {
        const PackT xp = row[m * CV];
        float xv[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[v] = to_float(xp.v[v]);
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int o = m - j;
          if (o >= 0 && o < RW) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[rr][o][v] = fmaf(wr[j][v], xv[v], acc[rr][o][v]);
          }
        }
      }
    }
  }

  // ---- epilogue: activation, round, store ----
  if (c >= p.C) return;
  T* __restrict__ out = static_cast<T*>(p.out);
#pragma unroll
  for (int rr = 0; rr < RH; ++rr) {
    const int h = h0 + gy * RH + rr;
    if (h >= p.H) break;
#pragma unroll
    for (int o = 0; o < RW; ++o) {
      const int w = w0 + gx * RW + o;
      if (w >= p.W) break;
      PackT res;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float y = acc[rr][o][v];
        if (p.activation == 1) {
          y = 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));
        } else if (p.activation == 2) {
          y = fmaxf(y, 0.0f);
        }
        res.v[v] = from_float<T>(y);
      }
      const int64_t off = ((static_cast<int64_t>(b) * p.H + h) * p.W + w) * static_cast<int64_t>(p.C) + c;
      if (VEC > 1) {
        *reinterpret_cast<PackT*>(out + off) = res;
      } else {
        out[off] = res.v[0];
      }
    }
  }
}

template <typename T, int K, int VEC>
cudaError_t launch(const DwconvFwdParams& p, cudaStream_t stream) {
  using G = Geom<K, VEC>;
  Args a{};
  a.p = p;
  a.n_th = (p.H + G::TH - 1) / G::TH;
  a.n_tw = (p.W + G::TW - 1) / G::TW;
  a.n_cb = (p.C + G::CH - 1) / G::CH;
  const int64_t blocks = static_cast<int64_t>(p.B) * a.n_th * a.n_tw * a.n_cb;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  return launch_kernel(dwconv_fwd_kernel<T, K, VEC>, static_cast<unsigned>(blocks), kThreads, 0, stream, a);
}

template <typename T>
bool vector_ok(const DwconvFwdParams& p) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  return p.C % VEC == 0 && aligned_to(p.x, 16) && aligned_to(p.out, 16) && p.x_stride_n % VEC == 0 &&
         p.x_stride_b % VEC == 0;
}

template <typename T, int K>
cudaError_t launch_k(const DwconvFwdParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if (vector_ok<T>(p)) return launch<T, K, VEC>(p, stream);
  return launch<T, K, 1>(p, stream);
}

template <typename T>
cudaError_t launch_dtype(const DwconvFwdParams& p, cudaStream_t stream) {
  switch (p.k) {
    case 1:
      return launch_k<T, 1>(p, stream);
    case 3:
      return launch_k<T, 3>(p, stream);
    case 5:
      return launch_k<T, 5>(p, stream);
    case 7:
      return launch_k<T, 7>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool dwconv_forward_supports(int kernel_size, DType dtype) {
  return known_dtype(dtype) && (kernel_size == 1 || kernel_size == 3 || kernel_size == 5 || kernel_size == 7);
}

cudaError_t dwconv_forward(const DwconvFwdParams& p, cudaStream_t stream) {
  if (!dwconv_forward_supports(p.k, p.dtype)) return cudaErrorInvalidValue;
  if (p.activation < 0 || p.activation > 2) return cudaErrorInvalidValue;
  if (p.B < 0 || p.H < 1 || p.W < 1 || p.C < 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.H) * p.W > INT_MAX) return cudaErrorInvalidValue;
  if (p.B == 0 || p.C == 0) return cudaSuccess;
  if (p.x == nullptr || p.weight == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) { return launch_dtype<typename decltype(tag)::type>(p, stream); });
}

}  // namespace vitkernels
