// vitkernels — host-side types and checks shared by every kernel's header and launcher: the dtype
// tag, element sizes, the head-dim rule, pointer/stride alignment and device queries. Plain C++
// over cuda_runtime.h, no torch headers; the torch glue (csrc/torch) sees it through the kernel
// headers. Device-side helpers (conversions, launch, dispatch switches) are in common.cuh.
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

// An attribute of the current device (SM count, opt-in shared memory per block, ...).
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int* value) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(value, attr, device);
}

}  // namespace vitkernels
