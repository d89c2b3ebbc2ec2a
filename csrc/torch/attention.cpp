// vitkernels — torch glue for the fused attention forward (csrc/kernels/attention.cu).
//
// Only compiled where a CUDA build of PyTorch exists (setup.py / JIT via vitkernels._ext /
// CMakeLists.txt). Defines the vitkernels_C library and registers:
//   torch.ops.vitkernels_C.attention_fwd(q, k, v, bias?, scale, version=0) -> (out, lse)
//     version: 0 = the newest fp16 / bf16 kernel (v2 where the head dim allows), 1 = v1
//     (vitkernels/ops/attention.py passes 1 under VITKERNELS_ATTN_CUDA_KERNEL=v1)
//   torch.ops.vitkernels_C.attention_supports(int head_dim, ScalarType? dtype=None,
//                                             Device? device=None) -> bool
//   torch.ops.vitkernels_C.attention_supports_head_dim(int head_dim) -> bool  (older name)
//   torch.ops.vitkernels_C.built_archs() -> str
// out is (B, H, Nq, D) with memory layout (B, Nq, H, D) (so out.transpose(1, 2).reshape(B, Nq, C)
// is free); lse is float32 contiguous (B, H, Nq), natural log, +inf for fully masked rows.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../kernels/attention.h"
#include "common.h"

namespace vitkernels {
namespace {

constexpr const char* kOp = "vitkernels attention_fwd: ";

// The kernel's (B, G, H, N, D) strides of a (B, H, N, D) tensor (one group, G stride 0), with the
// strides of size-1 dims replaced by 0 (they are never used to step, and may be arbitrary in a
// view).
void fill_strides(const at::Tensor& t, int64_t (&out)[5]) {
  int64_t bhnd[4];
  for (int i = 0; i < 4; ++i) bhnd[i] = t.size(i) == 1 ? 0 : t.stride(i);
  attention_one_group_strides(bhnd, out);
}

bool kernel_can_read(const at::Tensor& t, DType dtype) {
  if (t.numel() == 0) return true;
  int64_t s[5];
  fill_strides(t, s);
  if (t.size(3) == 1) s[4] = 1;
  return attention_forward_tensor_aligned(t.data_ptr(), s, 5, dtype);
}

// Returns t itself when the kernel can read it in place (last-dim stride 1, 16-byte aligned
// base and strides), else an aligned contiguous copy.
at::Tensor readable(const at::Tensor& t, DType dtype) {
  if (kernel_can_read(t, dtype)) return t;
  at::Tensor c = t.contiguous();
  // A contiguous view can still have a misaligned storage offset: clone into a fresh buffer.
  if (!kernel_can_read(c, dtype)) c = t.clone(at::MemoryFormat::Contiguous);
  return c;
}

void check_fits_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), kOp, what, " = ", v, " is too large");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& bias, double scale,
                                                      int64_t version) {
  TORCH_CHECK(version == 0 || version == 1, kOp, "version must be 0 (newest kernel) or 1 (v1), got ", version);
  TORCH_CHECK(q.dim() == 4, kOp, "q must be 4-D (B, H, Nq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, kOp, "k must be 4-D (B, H, Nk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, kOp, "v must be 4-D (B, H, Nk, D), got shape ", v.sizes());
  TORCH_CHECK(q.is_cuda(), kOp, "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(k.device() == q.device(), kOp, "k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(v.device() == q.device(), kOp, "v is on ", v.device(), " but q is on ", q.device());
  const DType dtype = kernel_dtype(q.scalar_type(), kOp);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, "k has dtype ", k.scalar_type(), " but q has dtype ",
              q.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), kOp, "v has dtype ", v.scalar_type(), " but q has dtype ",
              q.scalar_type());

  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, kOp, "k shape ", k.sizes(),
              " does not match q shape ", q.sizes(), " (expected (B, H, Nk, D) = (", B, ", ", H, ", Nk, ", D, "))");
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, "v shape ", v.sizes(), " must equal k shape ", k.sizes());
  TORCH_CHECK(attention_forward_supports(static_cast<int>(D), dtype), kOp, "head dim D = ", D, " (q shape ", q.sizes(),
              ") is not supported by the CUDA kernel; it needs D % 8 == 0 and 8 <= D <= 128");
  check_fits_int(B, "batch size B");
  check_fits_int(H, "number of heads H");
  check_fits_int(Nq, "query length Nq");
  check_fits_int(Nk, "key length Nk");
  check_fits_int(B * H, "B * H");

  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == q.device(), kOp, "bias is on ", b.device(), " but q is on ", q.device());
    TORCH_CHECK(at::isFloatingType(b.scalar_type()) || b.scalar_type() == at::kBool, kOp,
                "bias must be a floating tensor or a boolean mask, got ", b.scalar_type());
    TORCH_CHECK(b.dim() <= 4, kOp,
                "bias must have at most 4 dims (broadcastable to (B, H, Nq, Nk)"
                " = (",
                B, ", ", H, ", ", Nq, ", ", Nk, ")), got shape ", b.sizes());
    const int64_t target[4] = {B, H, Nq, Nk};
    const int64_t off = 4 - b.dim();
    for (int64_t i = 0; i < b.dim(); ++i) {
      TORCH_CHECK(b.size(i) == 1 || b.size(i) == target[i + off], kOp, "bias shape ", b.sizes(),
                  " is not broadcastable to (B, H, Nq, Nk) = (", B, ", ", H, ", ", Nq, ", ", Nk, ")");
    }
    // The kernel reads a float bias in the input dtype (as SDPA requires of attn_mask), and a
    // boolean mask as it is (one byte per element, broadcast dims at stride 0: no expanded copy).
    const bool is_mask = b.scalar_type() == at::kBool;
    bias_t = (is_mask || b.scalar_type() == q.scalar_type()) ? b : b.to(q.scalar_type());
    bias_t = bias_t.expand({B, H, Nq, Nk});
  }

  c10::cuda::CUDAGuard device_guard(q.device());

  // Output memory layout (B, Nq, H, D), returned as the (B, H, Nq, D) view.
  at::Tensor out = at::empty({B, Nq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || Nq == 0) return {out, lse};

  const at::Tensor qc = readable(q, dtype);
  const at::Tensor kc = readable(k, dtype);
  const at::Tensor vc = readable(v, dtype);

  AttentionFwdParams p{};
  p.q = qc.data_ptr();
  p.k = kc.numel() > 0 ? kc.data_ptr() : nullptr;
  p.v = vc.numel() > 0 ? vc.data_ptr() : nullptr;
  p.bias = nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  fill_strides(qc, p.q_stride);
  fill_strides(kc, p.k_stride);
  fill_strides(vc, p.v_stride);
  fill_strides(out, p.out_stride);
  p.q_stride[4] = p.k_stride[4] = p.v_stride[4] = p.out_stride[4] = 1;  // D >= 8
  for (int i = 0; i < 5; ++i) p.bias_stride[i] = 0;
  if (bias_t.defined() && Nk > 0) {
    if (bias_t.scalar_type() == at::kBool) {
      p.mask = static_cast<const unsigned char*>(bias_t.data_ptr());
    } else {
      p.bias = bias_t.data_ptr();
    }
    fill_strides(bias_t, p.bias_stride);
  }
  p.B = static_cast<int>(B);
  p.G = 1;
  p.H = static_cast<int>(H);
  p.Nq = static_cast<int>(Nq);
  p.Nk = static_cast<int>(Nk);
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
  p.kernel_version = static_cast<int>(version);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = attention_forward(p, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed for q ", q.sizes(), " k ", k.sizes(), " dtype ",
              q.scalar_type(), ": ", cudaGetErrorString(err));
  return {out, lse};
}

std::string built_archs() { return std::string(attention_built_archs()); }

bool attention_supports(int64_t head_dim, std::optional<at::ScalarType> dtype, std::optional<at::Device> /*device*/) {
  return query_supports(dtype, attention_forward_supports, head_dim);
}

bool attention_supports_head_dim(int64_t head_dim) { return attention_supports(head_dim, std::nullopt, std::nullopt); }

}  // namespace vitkernels

TORCH_LIBRARY(vitkernels_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, int version=0) -> (Tensor, Tensor)");
  m.def("attention_supports(int head_dim, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::attention_supports);
  m.def("attention_supports_head_dim(int head_dim) -> bool", &vitkernels::attention_supports_head_dim);
  m.def("built_archs() -> str", &vitkernels::built_archs);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) { m.impl("attention_fwd", &vitkernels::attention_fwd_cuda); }
