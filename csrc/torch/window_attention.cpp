// vitkernels — torch glue for the fused Swin window attention forward
// (csrc/kernels/window_attention.cu).
//
// Only compiled where a CUDA build of PyTorch exists (setup.py / JIT via vitkernels._ext /
// CMakeLists.txt). Registers (the namespace itself is defined by TORCH_LIBRARY in attention.cpp):
//   torch.ops.vitkernels_C.window_attention_fwd(qkv, hw, num_heads, window_size, shift_size,
//                                               table?, qkv_bias?, scale, logit_scale?=None,
//                                               shift_first=False, version=0) -> out (B, H·W, C)
//     version: 0 = the newest kernels (v2), 1 = v1 (vitkernels/ops/window_attention.py passes
//     VITKERNELS_WINDOW_CUDA_KERNEL's choice; the default keeps older callers on the newest).
//   torch.ops.vitkernels_C.window_attention_supports(int window, int head_dim, ScalarType? dtype=None,
//                                                    Device? device=None) -> bool
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../kernels/window_attention.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kWaOp = "vitkernels window_attention_fwd: ";

void qkv_strides(const at::Tensor& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  s[2] = 1;  // 3C >= 24: only reached when stride(2) == 1 (checked by the caller)
}

bool qkv_readable(const at::Tensor& t, DType dtype) {
  if (t.stride(2) != 1) return false;
  int64_t s[3];
  qkv_strides(t, s);
  return window_attention_tensor_aligned(t.data_ptr(), s, dtype);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void wa_check_fits_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), kWaOp, what, " = ", v, " is out of range");
}

}  // namespace

at::Tensor window_attention_fwd_cuda(const at::Tensor& qkv, at::IntArrayRef hw, int64_t num_heads, int64_t window_size,
                                     int64_t shift_size, const std::optional<at::Tensor>& table,
                                     const std::optional<at::Tensor>& qkv_bias, double scale,
                                     const std::optional<at::Tensor>& logit_scale, bool shift_first, int64_t version) {
  TORCH_CHECK(qkv.dim() == 3, kWaOp, "qkv must be 3-D (B, H*W, 3C), got shape ", qkv.sizes());
  TORCH_CHECK(qkv.is_cuda(), kWaOp, "qkv must be a CUDA tensor, got device ", qkv.device());
  const DType dtype = kernel_dtype(qkv.scalar_type(), kWaOp);
  TORCH_CHECK(hw.size() == 2, kWaOp, "hw must be (H, W), got ", hw);
  const int64_t B = qkv.size(0), L = qkv.size(1), C3 = qkv.size(2);
  const int64_t H = hw[0], W = hw[1];
  TORCH_CHECK(H >= 1 && W >= 1 && H * W == L, kWaOp, "hw = ", hw, " does not match qkv shape ", qkv.sizes(),
              " (needs H*W = tokens)");
  TORCH_CHECK(C3 % 3 == 0, kWaOp, "qkv last dim ", C3, " is not divisible by 3");
  const int64_t C = C3 / 3;
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, kWaOp, "C = ", C, " is not divisible by num_heads = ", num_heads);
  const int64_t D = C / num_heads;
  TORCH_CHECK(window_size >= 1 && shift_size >= 0 && shift_size < window_size, kWaOp,
              "need window_size >= 1 and 0 <= shift_size < window_size, got window_size = ", window_size,
              ", shift_size = ", shift_size);
  TORCH_CHECK(window_size <= std::numeric_limits<int>::max() &&
                  window_attention_forward_supports(static_cast<int>(window_size), static_cast<int>(D), dtype),
              kWaOp, "window_size = ", window_size, " with head dim D = ", D,
              " is not supported by the CUDA kernel; it needs window_size <= 16 and D % 8 == 0,"
              " 8 <= D <= 128");
  wa_check_fits_int(B, "batch size B");
  wa_check_fits_int(L, "tokens H*W");
  wa_check_fits_int(C, "channels C");
  TORCH_CHECK(version == 0 || version == 1, kWaOp, "version must be 0 (newest kernels) or 1 (v1), got ", version);

  at::Tensor table_t;
  if (table.has_value() && table->defined()) {
    table_t = *table;
    const int64_t E = (2 * window_size - 1) * (2 * window_size - 1);
    TORCH_CHECK(table_t.device() == qkv.device(), kWaOp, "rel_pos_bias_table is on ", table_t.device(),
                " but qkv is on ", qkv.device());
    TORCH_CHECK(table_t.dim() == 2 && table_t.size(0) == E && table_t.size(1) == num_heads, kWaOp,
                "rel_pos_bias_table must be ((2M-1)^2, heads) = (", E, ", ", num_heads, "), got ", table_t.sizes());
    if (table_t.scalar_type() != qkv.scalar_type()) table_t = table_t.to(qkv.scalar_type());
  }
  at::Tensor bias_t;
  if (qkv_bias.has_value() && qkv_bias->defined()) {
    bias_t = *qkv_bias;
    TORCH_CHECK(bias_t.device() == qkv.device(), kWaOp, "qkv_bias is on ", bias_t.device(), " but qkv is on ",
                qkv.device());
    TORCH_CHECK(bias_t.dim() == 1 && bias_t.size(0) == C3, kWaOp, "qkv_bias must be (3C,) = (", C3, ",), got ",
                bias_t.sizes());
    if (bias_t.scalar_type() != qkv.scalar_type()) bias_t = bias_t.to(qkv.scalar_type());
    if (!bias_t.is_contiguous() || !aligned16(bias_t)) {
      bias_t = bias_t.clone(at::MemoryFormat::Contiguous);
    }
  }

  at::Tensor ls_t;
  if (logit_scale.has_value() && logit_scale->defined()) {
    ls_t = *logit_scale;
    TORCH_CHECK(ls_t.device() == qkv.device(), kWaOp, "logit_scale is on ", ls_t.device(), " but qkv is on ",
                qkv.device());
    const bool shape_ok = (ls_t.dim() == 1 && ls_t.size(0) == num_heads) ||
                          (ls_t.dim() == 3 && ls_t.size(0) == num_heads && ls_t.size(1) == 1 && ls_t.size(2) == 1);
    TORCH_CHECK(shape_ok, kWaOp, "logit_scale must be (heads,) or (heads, 1, 1) with heads = ", num_heads, ", got ",
                ls_t.sizes());
    if (ls_t.scalar_type() != qkv.scalar_type()) ls_t = ls_t.to(qkv.scalar_type());
    ls_t = ls_t.reshape({num_heads}).contiguous();  // (heads,) values, stride 1
  }

  c10::cuda::CUDAGuard device_guard(qkv.device());

  at::Tensor out = at::empty({B, L, C}, qkv.options());
  if (B == 0) return out;

  at::Tensor qkv_c = qkv;
  if (!qkv_readable(qkv_c, dtype)) {
    qkv_c = qkv.contiguous();
    if (!qkv_readable(qkv_c, dtype)) qkv_c = qkv.clone(at::MemoryFormat::Contiguous);
  }

  WindowAttentionFwdParams p{};
  p.qkv = qkv_c.data_ptr();
  qkv_strides(qkv_c, p.qkv_stride);
  p.table = nullptr;
  p.table_stride[0] = p.table_stride[1] = 0;
  if (table_t.defined()) {
    p.table = table_t.data_ptr();
    p.table_stride[0] = table_t.stride(0);
    p.table_stride[1] = table_t.stride(1);
  }
  p.qkv_bias = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  p.logit_scale = ls_t.defined() ? ls_t.data_ptr() : nullptr;
  p.shift_first = shift_first;
  p.out = out.data_ptr();
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.C = static_cast<int>(C);
  p.heads = static_cast<int>(num_heads);
  p.head_dim = static_cast<int>(D);
  p.window = static_cast<int>(window_size);
  p.shift = static_cast<int>(shift_size);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
  p.kernel_version = static_cast<int>(version);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = window_attention_forward(p, stream);
  TORCH_CHECK(err == cudaSuccess, kWaOp, "kernel launch failed for qkv ", qkv.sizes(), " hw ", hw, " heads ", num_heads,
              " window ", window_size, " shift ", shift_size, shift_first ? " (shift first)" : "",
              ls_t.defined() ? " cosine" : "", " dtype ", qkv.scalar_type(), " version ", version, ": ",
              cudaGetErrorString(err));
  return out;
}

// Called as before as (window, head_dim): the dtype and device are optional.
bool window_attention_supports(int64_t window, int64_t head_dim, std::optional<at::ScalarType> dtype,
                               std::optional<at::Device> /*device*/) {
  return query_supports(dtype, window_attention_forward_supports, window, head_dim);
}

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def(
      "window_attention_fwd(Tensor qkv, int[2] hw, int num_heads, int window_size, "
      "int shift_size, Tensor? table, Tensor? qkv_bias, float scale, Tensor? logit_scale=None, "
      "bool shift_first=False, int version=0) -> Tensor");
  m.def("window_attention_supports(int window, int head_dim, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::window_attention_supports);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("window_attention_fwd", &vitkernels::window_attention_fwd_cuda); }
