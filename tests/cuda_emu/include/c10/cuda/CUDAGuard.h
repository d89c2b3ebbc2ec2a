// vkemu shim of <c10/cuda/CUDAGuard.h> (and C10_CUDA_CHECK) for the torch glue compiled against a
// CPU build of torch: one emulated device, nothing to switch.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr)                                                                \
  do {                                                                                      \
    const cudaError_t vkemu_err_ = (expr);                                                  \
    TORCH_CHECK(vkemu_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(vkemu_err_)); \
  } while (0)
