// vitkernels — what the .cu files share: float conversions of the element types, the base-2
// softmax constants, the launch with dynamic shared memory, and the dtype / head-dim dispatch
// switches that turn runtime sizes into template instantiations. Header-only, no torch headers;
// host-visible types and checks are in common.h.
#pragma once

#include "common.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <type_traits>
#include <utility>

namespace vitkernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Explicit conversions (torch's extension builds define __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Launches kernel<<<grid, threads, smem_bytes, stream>>>(args...) and returns its status. Above
// the 48 KiB every kernel gets by default, the kernel's dynamic shared memory limit is raised
// first (cudaFuncSetAttribute: no allocation, allowed during CUDA-graph capture).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned grid, int threads, size_t smem_bytes, cudaStream_t stream,
                          const Args&... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

// A type as a value, for the generic lambdas of dispatch_dtype: `using T = typename decltype(tag)::type;`.
template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) with T the element type of `dtype` (float, __half or __nv_bfloat16).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, kDp>{}) with kDp the first of kDims (ascending) that is >= D: the
// padded head dim a kernel is compiled for. cudaErrorInvalidValue when D exceeds them all.
template <int kFirst, int... kRest, typename F>
cudaError_t dispatch_head_dim(int D, F&& f) {
  if (D <= kFirst) return f(std::integral_constant<int, kFirst>{});
  if constexpr (sizeof...(kRest) > 0) {
    return dispatch_head_dim<kRest...>(D, std::forward<F>(f));
  } else {
    return cudaErrorInvalidValue;
  }
}

}  // namespace vitkernels
