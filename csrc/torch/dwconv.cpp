// vitkernels — torch glue for the depthwise conv forward (csrc/kernels/dwconv.cu).
//
// Only compiled where a CUDA build of PyTorch exists. Registers (as a fragment of the
// vitkernels_C library defined in attention.cpp):
//   torch.ops.vitkernels_C.dwconv_fwd(x, hw, weight, bias?, activation) -> out
//   torch.ops.vitkernels_C.dwconv_supports(int kernel_size, ScalarType? dtype=None,
//                                          Device? device=None) -> bool
// x (B, H·W, C) float32/float16/bfloat16, weight (C, 1, k, k) with k ∈ {1, 3, 5, 7}, bias (C,) or
// None, all one dtype and device; activation 0 none, 1 gelu (exact erf), 2 relu. out is a new
// contiguous (B, H·W, C) tensor of x's dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../kernels/dwconv.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kDwOp = "vitkernels dwconv_fwd: ";

}  // namespace

at::Tensor dwconv_fwd_cuda(const at::Tensor& x, at::IntArrayRef hw, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(x.dim() == 3, kDwOp, "x must be 3-D (B, H*W, C), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), kDwOp, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(hw.size() == 2, kDwOp, "hw must be (H, W), got ", hw);
  const int64_t H = hw[0], W = hw[1];
  TORCH_CHECK(H >= 1 && W >= 1, kDwOp, "hw must be (H, W) with H, W >= 1, got ", hw);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(H * W == N, kDwOp, "x has ", N, " tokens but hw = (", H, ", ", W, ") needs H*W = ", H * W, " (x shape ",
              x.sizes(), ")");
  const DType dtype = kernel_dtype(x.scalar_type(), kDwOp);

  TORCH_CHECK(weight.dim() == 4, kDwOp, "weight must be 4-D (C, 1, k, k), got shape ", weight.sizes());
  const int64_t k = weight.size(3);
  TORCH_CHECK(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k, kDwOp,
              "weight must be (C, 1, k, k) with C = ", C, ", got shape ", weight.sizes());
  TORCH_CHECK(k <= 7 && dwconv_forward_supports(static_cast<int>(k), dtype), kDwOp, "kernel size k = ", k,
              " is not supported (built for k = 1, 3, 5, 7)");
  TORCH_CHECK(weight.device() == x.device(), kDwOp, "weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kDwOp, "weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(activation >= 0 && activation <= 2, kDwOp, "activation must be 0 (none), 1 (gelu) or 2 (relu), got ",
              activation);

  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == C, kDwOp, "bias must be (C,) = (", C, ",), got shape ", b.sizes());
    TORCH_CHECK(b.device() == x.device(), kDwOp, "bias is on ", b.device(), " but x is on ", x.device());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), kDwOp, "bias has dtype ", b.scalar_type(), " but x has dtype ",
                x.scalar_type());
    bias_c = b.contiguous();
  }

  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(B <= kIntMax && C <= kIntMax && N <= kIntMax, kDwOp, "x shape ", x.sizes(),
              " is too large (B, H*W and C must each fit in int32)");

  c10::cuda::CUDAGuard device_guard(x.device());

  at::Tensor out = at::empty({B, N, C}, x.options());
  if (out.numel() == 0) return out;

  // The kernel needs channel stride 1; batch/token strides may be anything (a channel slice of a
  // wider tensor is read in place). Size-1 batch dims get stride 0 (never stepped).
  at::Tensor xc = (C == 1 || x.stride(2) == 1) ? x : x.contiguous();
  at::Tensor wc = weight.contiguous();

  DwconvFwdParams p{};
  p.x = xc.data_ptr();
  p.weight = wc.data_ptr();
  p.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x_stride_b = B == 1 ? 0 : xc.stride(0);
  p.x_stride_n = N == 1 ? 0 : xc.stride(1);
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.C = static_cast<int>(C);
  p.k = static_cast<int>(k);
  p.activation = static_cast<int>(activation);
  p.dtype = dtype;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = dwconv_forward(p, stream);
  TORCH_CHECK(err == cudaSuccess, kDwOp, "kernel launch failed for x ", x.sizes(), " k = ", k, " dtype ",
              x.scalar_type(), ": ", cudaGetErrorString(err));
  return out;
}

bool dwconv_supports(int64_t kernel_size, std::optional<at::ScalarType> dtype, std::optional<at::Device> /*device*/) {
  return query_supports(dtype, dwconv_forward_supports, kernel_size);
}

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def("dwconv_fwd(Tensor x, int[2] hw, Tensor weight, Tensor? bias, int activation) -> Tensor");
  m.def("dwconv_supports(int kernel_size, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::dwconv_supports);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("dwconv_fwd", &vitkernels::dwconv_fwd_cuda); }
