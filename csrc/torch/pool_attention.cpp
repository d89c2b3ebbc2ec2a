// vitkernels — torch glue for the MViTv2 pooling-attention forward (csrc/kernels/pool_attention.cu).
//
// Registers:
//   torch.ops.vitkernels_C.pool_attention_fwd(q, k, v, q_hw, k_hw, rel_pos_h?, rel_pos_w?,
//       has_cls_token, residual, scale) -> (out, lse)
//     q (B, heads, Nq, D), k, v (B, heads, Nk, D) at any strides; rel_pos_h (Lh, D), rel_pos_w
//     (Lw, D) or both None; out (B, Nq, heads·D) contiguous in q's dtype; lse float32
//     (B, heads, Nq), natural log.
//   torch.ops.vitkernels_C.pool_attention_supports(int head_dim, ScalarType? dtype=None,
//                                                  Device? device=None) -> bool
// q, k, v are read in place when their last dim is contiguous and their base and strides are
// 16-byte aligned, else copied; the tables are made contiguous in q's dtype (a float32 table
// kept under autocast is rounded to q's dtype, as timm's einsum would).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "../kernels/pool_attention.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kOp = "vitkernels pool_attention_fwd: ";

// (B, H, N, D) element strides with size-1 dims at 0 (never stepped, arbitrary in a view).
void fill_strides(const at::Tensor& t, int64_t (&s)[4]) {
  for (int i = 0; i < 4; ++i) s[i] = t.size(i) == 1 ? 0 : t.stride(i);
}

bool kernel_can_read(const at::Tensor& t, DType dtype) {
  int64_t s[4];
  fill_strides(t, s);
  return vector_aligned(t.data_ptr(), s, 4, dtype);
}

// t when the kernel reads it in place, else a contiguous copy in a fresh (aligned) buffer.
at::Tensor readable(const at::Tensor& t, DType dtype) {
  if (t.numel() == 0 || kernel_can_read(t, dtype)) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// A (L, D) table as the kernel reads it: q's dtype, contiguous, 16-byte aligned.
at::Tensor table(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor c = t.to(dtype).contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// (h, w) of an int[] argument; both positive.
std::pair<int64_t, int64_t> hw_arg(at::IntArrayRef hw, const char* name) {
  TORCH_CHECK(hw.size() == 2, kOp, name, " must have 2 elements (h, w), got ", hw);
  TORCH_CHECK(hw[0] >= 1 && hw[1] >= 1, kOp, name, " must be positive, got ", hw);
  TORCH_CHECK(hw[0] <= std::numeric_limits<int>::max() && hw[1] <= std::numeric_limits<int>::max() &&
                  hw[0] * hw[1] < std::numeric_limits<int>::max(),
              kOp, name, " = ", hw, " is too large");
  return {hw[0], hw[1]};
}

void check_table(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t D, int64_t q_size,
                 int64_t k_size) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == D, kOp, name, " must be (L, D) with D = ", D, ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), kOp, name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(kernel_dtype_of(t.scalar_type()).has_value(), kOp, name, " has dtype ", t.scalar_type(),
              " (expected float32, float16 or bfloat16)");
  const int need =
      pool_attention_rel_index(static_cast<int>(q_size) - 1, 0, static_cast<int>(q_size), static_cast<int>(k_size)) + 1;
  TORCH_CHECK(t.size(0) >= need && t.size(0) <= std::numeric_limits<int>::max(), kOp, name, " has ", t.size(0),
              " rows but query size ", q_size, " and key size ", k_size, " index up to row ", need - 1,
              " (timm: 2 * max(q, k) - 1 = ", 2 * std::max(q_size, k_size) - 1, " rows)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, at::IntArrayRef q_hw,
                                                           at::IntArrayRef k_hw,
                                                           const std::optional<at::Tensor>& rel_pos_h,
                                                           const std::optional<at::Tensor>& rel_pos_w,
                                                           bool has_cls_token, bool residual, double scale) {
  TORCH_CHECK(q_in.dim() == 4, kOp, "q must be (B, heads, Nq, D), got shape ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 4, kOp, "k must be (B, heads, Nk, D), got shape ", k_in.sizes());
  TORCH_CHECK(v_in.dim() == 4, kOp, "v must be (B, heads, Nk, D), got shape ", v_in.sizes());
  TORCH_CHECK(q_in.is_cuda(), kOp, "q must be a CUDA tensor, got device ", q_in.device());
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(), kOp, "k (", k_in.device(), ") and v (",
              v_in.device(), ") must be on q's device ", q_in.device());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), kOp,
              "q, k and v must share one dtype, got ", q_in.scalar_type(), ", ", k_in.scalar_type(), " and ",
              v_in.scalar_type());
  const DType dtype = kernel_dtype(q_in.scalar_type(), kOp);
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3), Nk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D, kOp, "k must be (B, heads, Nk, D) = (", B,
              ", ", H, ", Nk, ", D, ") for q ", q_in.sizes(), ", got ", k_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), kOp, "v must have k's shape ", k_in.sizes(), ", got ", v_in.sizes());
  const auto [q_h, q_w] = hw_arg(q_hw, "q_hw");
  const auto [k_h, k_w] = hw_arg(k_hw, "k_hw");
  const int64_t cls = has_cls_token ? 1 : 0;
  TORCH_CHECK(Nq == q_h * q_w + cls, kOp, "q has Nq = ", Nq, " tokens but q_hw = ", q_hw,
              has_cls_token ? " and the class token give " : " gives ", q_h * q_w + cls);
  TORCH_CHECK(Nk == k_h * k_w + cls, kOp, "k has Nk = ", Nk, " tokens but k_hw = ", k_hw,
              has_cls_token ? " and the class token give " : " gives ", k_h * k_w + cls);
  TORCH_CHECK(D <= kPoolAttentionMaxHeadDim && pool_attention_forward_supports(static_cast<int>(D), dtype), kOp,
              "head dim D = ", D,
              " is not supported by the CUDA kernel; it needs D % 8 == 0 and 8 <= D <= ", kPoolAttentionMaxHeadDim);
  TORCH_CHECK(rel_pos_h.has_value() == rel_pos_w.has_value(), kOp,
              "rel_pos_h and rel_pos_w must both be given or both be None");
  const bool rel = rel_pos_h.has_value();
  if (rel) {
    check_table(*rel_pos_h, "rel_pos_h", q_in, D, q_h, k_h);
    check_table(*rel_pos_w, "rel_pos_w", q_in, D, q_w, k_w);
  }
  TORCH_CHECK(B <= std::numeric_limits<int>::max() && H <= std::numeric_limits<int>::max() &&
                  B * H <= std::numeric_limits<int>::max(),
              kOp, "q shape ", q_in.sizes(), " is too large");

  c10::cuda::CUDAGuard device_guard(q_in.device());
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, q_in.get_device()));
  TORCH_CHECK(
      pool_attention_forward_supports(static_cast<int>(D), dtype, static_cast<int>(k_h), static_cast<int>(k_w), rel,
                                      max_smem),
      kOp, "k_hw = ", k_hw,
      " with relative-position tables is not supported: it needs k_h, k_w <= ", kPoolAttentionMaxKeySide, " and ",
      pool_attention_forward_smem_bytes(static_cast<int>(D), dtype, static_cast<int>(k_h), static_cast<int>(k_w), rel),
      " bytes of shared memory (this device allows ", max_smem, ")");

  at::Tensor out = at::empty({B, Nq, H * D}, q_in.options());
  at::Tensor lse = at::empty({B, H, Nq}, q_in.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {out, lse};

  const at::Tensor q = readable(q_in, dtype);
  const at::Tensor k = readable(k_in, dtype);
  const at::Tensor v = readable(v_in, dtype);
  at::Tensor th, tw;
  PoolAttentionFwdParams p{};
  if (rel) {
    th = table(*rel_pos_h, q_in.scalar_type());
    tw = table(*rel_pos_w, q_in.scalar_type());
    p.rel_h = th.data_ptr();
    p.rel_w = tw.data_ptr();
    p.Lh = static_cast<int>(th.size(0));
    p.Lw = static_cast<int>(tw.size(0));
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  fill_strides(q, p.q_stride);
  fill_strides(k, p.k_stride);
  fill_strides(v, p.v_stride);
  // out (B, Nq, H·D) seen as (B, H, Nq, D)
  p.out_stride[0] = B == 1 ? 0 : Nq * H * D;
  p.out_stride[1] = D;
  p.out_stride[2] = H * D;
  p.out_stride[3] = 1;
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.q_h = static_cast<int>(q_h);
  p.q_w = static_cast<int>(q_w);
  p.k_h = static_cast<int>(k_h);
  p.k_w = static_cast<int>(k_w);
  p.has_cls_token = has_cls_token;
  p.residual = residual;
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
  const cudaError_t err = pool_attention_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed for q ", q_in.sizes(), " k ", k_in.sizes(), " dtype ",
              q_in.scalar_type(), ": ", cudaGetErrorString(err));
  return {out, lse};
}

bool pool_attention_supports(int64_t head_dim, std::optional<at::ScalarType> dtype,
                             std::optional<at::Device> /*device*/) {
  // Shared memory at k_h, k_w <= 64 fits every sm_80+ device; larger pooled key maps are checked
  // per call by pool_attention_fwd.
  return query_supports(dtype, [](int d, DType t) { return pool_attention_forward_supports(d, t); }, head_dim);
}

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def(
      "pool_attention_fwd(Tensor q, Tensor k, Tensor v, int[] q_hw, int[] k_hw, Tensor? rel_pos_h, "
      "Tensor? rel_pos_w, bool has_cls_token, bool residual, float scale) -> (Tensor, Tensor)");
  m.def("pool_attention_supports(int head_dim, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::pool_attention_supports);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("pool_attention_fwd", &vitkernels::pool_attention_fwd_cuda); }
