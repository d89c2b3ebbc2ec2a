// vitkernels torch glue: helpers shared by the csrc/torch/<op>.cpp files.
#pragma once

#include <ATen/ATen.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

#include "../kernels/attention.h"  // attention_forward_tensor_aligned
#include "../kernels/common.h"     // DType

namespace vitkernels {

// The kernels' dtype tag of a scalar type; nullopt for a type no kernel takes.
inline std::optional<DType> kernel_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return std::nullopt;
  }
}

// The kernels' dtype tag of a float tensor; `op` prefixes the error for anything else.
inline DType kernel_dtype(at::ScalarType t, const char* op) {
  const std::optional<DType> d = kernel_dtype_of(t);
  TORCH_CHECK(d.has_value(), op, "unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  return *d;
}

// ------------------------------------------------------------------------- <op>_supports queries
// Every CUDA op registers one query of the same shape:
//   torch.ops.vitkernels_C.<op>_supports(<the op's sizes>..., ScalarType? dtype=None,
//                                        Device? device=None) -> bool
// true when the compiled kernel runs those sizes in `dtype` (None: in every dtype the kernels take,
// float32, float16 and bfloat16) on `device` (None or a non-CUDA device: the current CUDA device;
// only limits that depend on the device, such as shared memory, read it).

// A size argument as the kernels' int: nullopt when it is below `min` or past INT_MAX.
inline std::optional<int> query_int(int64_t v, int64_t min = 1) {
  if (v < min || v > std::numeric_limits<int>::max()) return std::nullopt;
  return static_cast<int>(v);
}

// supports(d) for the requested dtype, or for every kernel dtype when none is given; false for a
// dtype no kernel takes.
template <typename F>
bool supports_dtype(const std::optional<at::ScalarType>& dtype, F&& supports) {
  if (dtype.has_value()) {
    const std::optional<DType> d = kernel_dtype_of(*dtype);
    return d.has_value() && supports(*d);
  }
  for (const DType d : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    if (!supports(d)) return false;
  }
  return true;
}

// The body of an <op>_supports query: kernel_supports(int sizes..., DType) for the query's sizes
// (each >= 1 and within int) and dtype, as supports_dtype.
template <typename F, typename... Sizes>
bool query_supports(const std::optional<at::ScalarType>& dtype, F&& kernel_supports, Sizes... sizes) {
  if (!(query_int(sizes).has_value() && ...)) return false;
  return supports_dtype(dtype, [&](DType t) { return kernel_supports(static_cast<int>(sizes)..., t); });
}

// An attribute of `device` (a CUDA device), else of the current CUDA device.
inline cudaError_t query_device_attribute(const std::optional<at::Device>& device, cudaDeviceAttr attr, int* value) {
  if (device.has_value() && device->type() == c10::DeviceType::CUDA && device->has_index()) {
    return cudaDeviceGetAttribute(value, attr, device->index());
  }
  return current_device_attribute(attr, value);
}

// (B, heads, rows, D) element strides of the per-head view of a (B, rows, width) token tensor whose
// heads are consecutive D-wide channel groups (strides of size-1 dims are 0: never stepped).
inline void head_view_strides(const at::Tensor& t, int64_t D, int64_t (&s)[4]) {
  s[0] = t.size(0) == 1 ? 0 : t.stride(0);
  s[1] = D;
  s[2] = t.size(1) == 1 ? 0 : t.stride(1);
  s[3] = 1;
}

// The (B, heads, rows, D) view of token tensor t whose heads start `offset` elements into each row
// (e.g. the k part of a packed [q | k | v] at offset C): its base pointer, strides into s.
inline void* head_view(const at::Tensor& t, int64_t D, int64_t offset, int64_t (&s)[4]) {
  head_view_strides(t, D, s);
  return static_cast<char*>(t.data_ptr()) + offset * t.element_size();
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
