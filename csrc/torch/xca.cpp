// vitkernels — torch glue for the XCiT cross-covariance attention forward (csrc/kernels/xca.cu).
//
// Registers:
//   torch.ops.vitkernels_C.xca_fwd(qkv, num_heads, temperature) -> out
//     qkv (B, N, 3C) in token layout ([q | k | v], head-major channels, as timm's
//     qkv.reshape(B, N, 3, heads, D)); temperature with heads elements ((heads, 1, 1) or (heads,));
//     out (B, N, C) contiguous.
//   torch.ops.vitkernels_C.xca_supports(int head_dim, ScalarType? dtype=None, Device? device=None) -> bool
//   torch.ops.vitkernels_C.xca_supports_head_dim(int head_dim) -> bool  (older name)
// The per-head (B, heads, N, D) views are strides over the token-layout tensors: no copies unless
// qkv's last dim is strided or its base or row stride are not 16-byte aligned.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../kernels/xca.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kOp = "vitkernels xca_fwd: ";

}  // namespace

at::Tensor xca_fwd_cuda(const at::Tensor& qkv_in, int64_t num_heads, const at::Tensor& temperature) {
  TORCH_CHECK(qkv_in.dim() == 3, kOp, "qkv must be (B, N, 3C), got shape ", qkv_in.sizes());
  TORCH_CHECK(qkv_in.is_cuda(), kOp, "qkv must be a CUDA tensor, got device ", qkv_in.device());
  TORCH_CHECK(temperature.device() == qkv_in.device(), kOp, "temperature is on ", temperature.device(),
              " but qkv is on ", qkv_in.device());
  const DType dtype = kernel_dtype(qkv_in.scalar_type(), kOp);
  const int64_t B = qkv_in.size(0), N = qkv_in.size(1), C3 = qkv_in.size(2);
  TORCH_CHECK(num_heads > 0 && C3 % (3 * num_heads) == 0, kOp, "qkv width ", C3,
              " is not 3 * num_heads * D for num_heads = ", num_heads);
  const int64_t C = C3 / 3, H = num_heads, D = C / H;
  TORCH_CHECK(D <= 64 && xca_forward_supports(static_cast<int>(D), dtype), kOp, "head dim D = ", D,
              " is not supported by the CUDA kernel; it needs D % 8 == 0 and 8 <= D <= 64");
  TORCH_CHECK(temperature.numel() == H, kOp, "temperature must have num_heads = ", H, " elements, got shape ",
              temperature.sizes());
  TORCH_CHECK(at::isFloatingType(temperature.scalar_type()), kOp, "temperature must be a floating tensor, got ",
              temperature.scalar_type());
  for (const int64_t v : {B, N, H, B * H}) {
    TORCH_CHECK(v <= std::numeric_limits<int>::max(), kOp, "qkv shape ", qkv_in.sizes(), " is too large");
  }

  c10::cuda::CUDAGuard device_guard(qkv_in.device());
  at::Tensor out = at::empty({B, N, C}, qkv_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor qkv = readable_head_views(qkv_in, D, dtype);
  const at::Tensor tau = temperature.reshape({H}).to(at::kFloat).contiguous();

  XcaFwdParams p{};
  p.q = head_view(qkv, D, 0, p.q_stride);
  p.k = head_view(qkv, D, C, p.k_stride);
  p.v = head_view(qkv, D, 2 * C, p.v_stride);
  p.out = head_view(out, D, 0, p.out_stride);
  p.temperature = tau.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.N = static_cast<int>(N);
  p.D = static_cast<int>(D);
  p.dtype = dtype;

  const int64_t ws_floats = xca_forward_workspace_floats(p);
  TORCH_CHECK(ws_floats >= 0, kOp, "could not query the device: ", cudaGetErrorString(cudaGetLastError()));
  at::Tensor workspace;
  if (ws_floats > 0) {
    workspace = at::empty({ws_floats}, qkv.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t err = xca_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed for qkv ", qkv_in.sizes(), " (heads ", num_heads,
              ") dtype ", qkv_in.scalar_type(), ": ", cudaGetErrorString(err));
  return out;
}

bool xca_supports(int64_t head_dim, std::optional<at::ScalarType> dtype, std::optional<at::Device> /*device*/) {
  return query_supports(dtype, xca_forward_supports, head_dim);
}

bool xca_supports_head_dim(int64_t head_dim) { return xca_supports(head_dim, std::nullopt, std::nullopt); }

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def("xca_fwd(Tensor qkv, int num_heads, Tensor temperature) -> Tensor");
  m.def("xca_supports(int head_dim, ScalarType? dtype=None, Device? device=None) -> bool", &vitkernels::xca_supports);
  m.def("xca_supports_head_dim(int head_dim) -> bool", &vitkernels::xca_supports_head_dim);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("xca_fwd", &vitkernels::xca_fwd_cuda); }
