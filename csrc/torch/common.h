// vitkernels torch glue: helpers shared by the csrc/torch/<op>.cpp files.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/attention.h"  // DType

namespace vitkernels {

// The kernels' dtype tag of a float tensor; `op` prefixes the error for anything else.
inline DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, "unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
  return DType::kFloat32;  // unreachable
}

}  // namespace vitkernels
