// vitkernels — host-side types and checks shared by every kernel's header and launcher: the dtype
// tag, element sizes, the head-dim rule, pointer/stride alignment, params-to-arguments copies and
// device queries. Plain C++ over cuda_runtime.h, no torch headers; the torch glue (csrc/torch) sees it
// through the kernel headers. Device-side helpers (conversions, launch, dispatch switches) are in
// common.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vitkernels {

// Element type of a kernel's tensors (the torch glue maps at::ScalarType onto it).
enum class DType { kFloat32, kFloat16, kBFloat16 };

inline bool known_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

inline int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The head dims of the attention-family kernels: multiples of 8 from 8 to max_head_dim (the
// kernels pad them to a compiled tile width; 16-byte rows need D % 8 == 0 at 2-byte types).
inline bool head_dim_in_range(int head_dim, int max_head_dim) {
  return head_dim >= 8 && head_dim <= max_head_dim && head_dim % 8 == 0;
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Whether `ptr` with these `ndim` element strides suits 16-byte vector loads of rows along the
// last dim: a 16-byte aligned base, stride[ndim - 1] == 1, the other strides multiples of 16 bytes.
inline bool vector_aligned(const void* ptr, const int64_t* stride, int ndim, DType dtype) {
  if (ptr == nullptr || ndim < 1) return false;
  if (!aligned_to(ptr, 16)) return false;
  if (stride[ndim - 1] != 1) return false;
  const int64_t per16 = 16 / element_size(dtype);
  for (int i = 0; i < ndim - 1; ++i) {
    if (stride[i] % per16 != 0) return false;
  }
  return true;
}

// dst = src, element by element (a params struct's strides into a kernel's arguments).
template <int N>
inline void copy_strides(int64_t (&dst)[N], const int64_t (&src)[N]) {
  for (int i = 0; i < N; ++i) dst[i] = src[i];
}

// Whether the q, k, v and out views of a forward's params (fields q, k, v, out, q_stride, k_stride,
// v_stride, out_stride: (B, H, N, D) views, and dtype) suit 16-byte vector loads (vector_aligned).
template <typename Params>
bool qkv_out_vector_aligned(const Params& p) {
  return vector_aligned(p.q, p.q_stride, 4, p.dtype) && vector_aligned(p.k, p.k_stride, 4, p.dtype) &&
         vector_aligned(p.v, p.v_stride, 4, p.dtype) && vector_aligned(p.out, p.out_stride, 4, p.dtype);
}

// What an attention-family forward's kernel arguments (fields q, k, v, out, qs, ks, vs, os, H, D) take
// from its params as they are: the q, k, v and out pointers and strides (as qkv_out_vector_aligned reads
// them), the head count H and the head dim D.
template <typename Args, typename Params>
void copy_head_views(Args& a, const Params& p) {
  a.q = p.q;
  copy_strides(a.qs, p.q_stride);
  a.k = p.k;
  copy_strides(a.ks, p.k_stride);
  a.v = p.v;
  copy_strides(a.vs, p.v_stride);
  a.out = p.out;
  copy_strides(a.os, p.out_stride);
  a.H = p.H;
  a.D = p.D;
}

// An attribute of the current device (SM count, opt-in shared memory per block, ...).
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int* value) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(value, attr, device);
}

}  // namespace vitkernels
