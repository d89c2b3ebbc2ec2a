// vkemu shim of <ATen/cuda/CUDAContext.h> for the torch glue compiled against a CPU build of
// torch: the emulated kernels run synchronously on the calling thread, so there is one stream.
#pragma once

#include <cuda_runtime.h>

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream(int device = -1) {
  (void)device;
  return nullptr;
}
}  // namespace cuda
}  // namespace at
