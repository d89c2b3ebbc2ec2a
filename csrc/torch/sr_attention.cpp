// vitkernels — torch glue for the spatial-reduction attention forward (csrc/kernels/sr_attention.cu).
//
// Registers:
//   torch.ops.vitkernels_C.sr_attention_fwd(q, kv, num_heads, scale) -> (out, lse)
//     q (B, N, C) and kv (B, M, 2C) in token layout ([k | v], head-major channels, as timm's
//     kv.reshape(B, M, 2, heads, D)); out (B, N, C) contiguous; lse float32 (B, heads, N).
//   torch.ops.vitkernels_C.sr_attention_supports(int m, int head_dim, ScalarType? dtype=None,
//                                                Device? device=None) -> bool
//     (the 16-bit kernels need the keys and values in the device's shared memory)
// The per-head (B, heads, rows, D) views are strides over the token-layout tensors: no copies
// unless a tensor's last dim is strided or its strides/base are not 16-byte aligned.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../kernels/sr_attention.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kOp = "vitkernels sr_attention_fwd: ";

}  // namespace

std::tuple<at::Tensor, at::Tensor> sr_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                         double scale) {
  TORCH_CHECK(q.dim() == 3, kOp, "q must be (B, N, C), got shape ", q.sizes());
  TORCH_CHECK(kv.dim() == 3, kOp, "kv must be (B, M, 2C), got shape ", kv.sizes());
  TORCH_CHECK(q.is_cuda(), kOp, "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(kv.device() == q.device(), kOp, "kv is on ", kv.device(), " but q is on ", q.device());
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), kOp, "kv has dtype ", kv.scalar_type(), " but q has dtype ",
              q.scalar_type());
  const DType dtype = kernel_dtype(q.scalar_type(), kOp);
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2), M = kv.size(1);
  TORCH_CHECK(num_heads > 0 && C % num_heads == 0, kOp, "C = ", C, " is not divisible by num_heads = ", num_heads);
  TORCH_CHECK(kv.size(0) == B && kv.size(2) == 2 * C, kOp, "kv must be (B, M, 2C) = (", B, ", M, ", 2 * C, ") for q ",
              q.sizes(), ", got ", kv.sizes());
  const int64_t D = C / num_heads;
  TORCH_CHECK(M >= 1 && M <= std::numeric_limits<int>::max(), kOp, "needs 1 <= M, got M = ", M);
  TORCH_CHECK(B <= std::numeric_limits<int>::max() && N <= std::numeric_limits<int>::max() &&
                  B * num_heads <= std::numeric_limits<int>::max(),
              kOp, "sizes too large: q ", q.sizes());

  c10::cuda::CUDAGuard device_guard(q.device());
  int device = q.get_device(), max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(sr_attention_forward_supports(static_cast<int>(M), static_cast<int>(D), dtype, max_smem), kOp, "M = ", M,
              ", head dim D = ", D, " (", q.scalar_type(),
              ") is not supported: it needs 1 <= M <= 256, D % 8 == 0, 8 <= D <= 128 and the keys and "
              "values in shared memory (",
              sr_attention_forward_smem_bytes(static_cast<int>(M), static_cast<int>(D)), " bytes; this device allows ",
              max_smem, ")");

  at::Tensor out = at::empty({B, N, C}, q.options());
  at::Tensor lse = at::empty({B, num_heads, N}, q.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {out, lse};

  const at::Tensor qc = readable_head_views(q, D, dtype);
  const at::Tensor kvc = readable_head_views(kv, D, dtype, C);
  SrAttentionFwdParams p{};
  p.q = head_view(qc, D, 0, p.q_stride);
  p.k = head_view(kvc, D, 0, p.k_stride);
  p.v = head_view(kvc, D, C, p.v_stride);
  p.out = head_view(out, D, 0, p.out_stride);
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(num_heads);
  p.N = static_cast<int>(N);
  p.M = static_cast<int>(M);
  p.D = static_cast<int>(D);
  p.rows_per_cta = 0;
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
  const cudaError_t err = sr_attention_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed for q ", q.sizes(), " kv ", kv.sizes(), " dtype ",
              q.scalar_type(), ": ", cudaGetErrorString(err));
  return {out, lse};
}

// Called as before as (m, head_dim, dtype): the device is optional.
bool sr_attention_supports(int64_t m, int64_t head_dim, std::optional<at::ScalarType> dtype,
                           std::optional<at::Device> device) {
  int max_smem = 0;
  if (query_device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin, &max_smem) != cudaSuccess) {
    return false;
  }
  return query_supports(
      dtype, [&](int keys, int d, DType t) { return sr_attention_forward_supports(keys, d, t, max_smem); }, m,
      head_dim);
}

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def("sr_attention_fwd(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor, Tensor)");
  m.def("sr_attention_supports(int m, int head_dim, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::sr_attention_supports);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("sr_attention_fwd", &vitkernels::sr_attention_fwd_cuda); }
