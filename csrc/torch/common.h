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

// (B, heads, rows, D) element strides of the per-head view of a (B, rows, width) token tensor whose
// heads are consecutive D-wide channel groups (strides of size-1 dims are 0: never stepped).
inline void head_view_strides(const at::Tensor& t, int64_t D, int64_t (&s)[4]) {
  s[0] = t.size(0) == 1 ? 0 : t.stride(0);
  s[1] = D;
  s[2] = t.size(1) == 1 ? 0 : t.stride(1);
  s[3] = 1;
}

// Whether the kernels' 16-byte vector loads can read the head views of token tensor t starting
// `offset` elements in (e.g. the k part of a packed [q | k | v]) in place.
inline bool head_view_readable(const at::Tensor& t, int64_t D, int64_t offset, DType dtype) {
  if (t.numel() == 0) return true;
  if (t.stride(2) != 1) return false;
  int64_t s[4];
  head_view_strides(t, D, s);
  const char* base = static_cast<const char*>(t.data_ptr()) + offset * t.element_size();
  return attention_forward_tensor_aligned(base, s, dtype);
}

// t itself when the kernels can read its head views (starting at element offsets 0 and `offset`)
// in place, else a contiguous copy in a fresh, aligned buffer.
inline at::Tensor readable_head_views(const at::Tensor& t, int64_t D, DType dtype, int64_t offset = 0) {
  if (head_view_readable(t, D, 0, dtype) && (offset == 0 || head_view_readable(t, D, offset, dtype))) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace vitkernels
