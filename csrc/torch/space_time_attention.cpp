// vitkernels — torch glue for divided space-time attention (TimeSformer / ViViT) on the grouped
// attention forward of csrc/kernels/attention.cu.
//
// Registers:
//   torch.ops.vitkernels_C.space_time_attention_fwd(qkv, frames, num_heads, axis, cls_qkv?, layout,
//                                                   scale) -> (out, cls_out, lse, cls_lse)
//     qkv (B, S·T, 3C) in token layout, token s·T + t (layout "st") or t·S + s ("ts"); axis "time"
//     (every spatial position attends over its T frames) or "space" (every frame over its S
//     tokens, with the class token cls_qkv (B, 3C) as a prefix key of every frame and a prefix
//     query whose output per frame is cls_out (B, T, C)). out (B, S·T, C) contiguous; lse float32
//     (B, groups, heads, length); cls_lse float32 (B, T, heads, 1); without a class token cls_out
//     is (B, 0, C) and cls_lse (B, 0, heads, 1).
// Every sequence is a (batch, group, head) of the kernel, read and written with strides straight
// from the token-layout buffers: no rearrange, no copy unless qkv's last dim is strided or its
// base or row stride are not 16-byte aligned.
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

constexpr const char* kOp = "vitkernels space_time_attention_fwd: ";

// (B, G, H, L, D) element strides of the sequences of a token buffer t (B, S·T, width) whose rows
// are `row` elements apart: groups are spatial positions (time axis) or frames (space axis).
void sequence_strides(int64_t batch_stride, int64_t row, int64_t S, int64_t T, bool time_axis, bool layout_st,
                      int64_t D, int64_t (&s)[5]) {
  // Token index of (spatial s, frame t): s·T + t ("st") or t·S + s ("ts").
  const int64_t spatial = layout_st ? T * row : row;
  const int64_t frame = layout_st ? row : S * row;
  s[0] = batch_stride;
  s[1] = time_axis ? spatial : frame;
  s[2] = D;
  s[3] = time_axis ? frame : spatial;
  s[4] = 1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> space_time_attention_fwd_cuda(
    const at::Tensor& qkv_in, int64_t frames, int64_t num_heads, const std::string& axis,
    const std::optional<at::Tensor>& cls_in, const std::string& layout, double scale) {
  TORCH_CHECK(qkv_in.dim() == 3, kOp, "qkv must be (B, S*T, 3C), got shape ", qkv_in.sizes());
  TORCH_CHECK(qkv_in.is_cuda(), kOp, "qkv must be a CUDA tensor, got device ", qkv_in.device());
  TORCH_CHECK(axis == "time" || axis == "space", kOp, "axis must be 'time' or 'space', got '", axis, "'");
  TORCH_CHECK(layout == "st" || layout == "ts", kOp, "layout must be 'st' or 'ts', got '", layout, "'");
  const DType dtype = kernel_dtype(qkv_in.scalar_type(), kOp);
  const int64_t B = qkv_in.size(0), N = qkv_in.size(1), C3 = qkv_in.size(2);
  TORCH_CHECK(num_heads > 0 && C3 % (3 * num_heads) == 0, kOp, "qkv width ", C3,
              " is not 3 * num_heads * D for num_heads = ", num_heads);
  TORCH_CHECK(frames > 0 && N % frames == 0, kOp, "frames = ", frames, " does not divide the token count ", N);
  const int64_t C = C3 / 3, H = num_heads, D = C / H, T = frames, S = N / frames;
  TORCH_CHECK(D <= 128 && attention_forward_supports(static_cast<int>(D), dtype), kOp, "head dim D = ", D,
              " is not supported by the CUDA kernel; it needs D % 8 == 0 and 8 <= D <= 128");
  const bool time_axis = axis == "time";
  const bool has_cls = cls_in.has_value() && cls_in->defined();
  TORCH_CHECK(!has_cls || !time_axis, kOp, "cls_qkv is only valid with axis 'space'");
  const int64_t G = time_axis ? S : T, L = time_axis ? T : S;
  for (const int64_t v : {B, G, H, L, B * G * H}) {
    TORCH_CHECK(v <= std::numeric_limits<int>::max(), kOp, "qkv shape ", qkv_in.sizes(), " is too large");
  }

  at::Tensor cls;
  if (has_cls) {
    cls = *cls_in;
    TORCH_CHECK(cls.device() == qkv_in.device(), kOp, "cls_qkv is on ", cls.device(), " but qkv is on ",
                qkv_in.device());
    TORCH_CHECK(cls.scalar_type() == qkv_in.scalar_type(), kOp, "cls_qkv has dtype ", cls.scalar_type(),
                " but qkv has dtype ", qkv_in.scalar_type());
    TORCH_CHECK(cls.dim() == 2 && cls.size(0) == B && cls.size(1) == C3, kOp, "cls_qkv must be (B, 3C) = (", B, ", ",
                C3, "), got shape ", cls.sizes());
  }

  c10::cuda::CUDAGuard device_guard(qkv_in.device());
  const auto opts = qkv_in.options();
  at::Tensor out = at::empty({B, N, C}, opts);
  at::Tensor cls_out = at::empty({B, has_cls ? T : 0, C}, opts);
  at::Tensor lse = at::empty({B, G, H, L}, opts.dtype(at::kFloat));
  at::Tensor cls_lse = at::empty({B, has_cls ? T : 0, H, 1}, opts.dtype(at::kFloat));
  // Nothing to compute without batch or heads, or without tokens and class token (with a class
  // token and no patch tokens, cls_out is the class value of every frame: the kernel computes it).
  if (B == 0 || C == 0 || (N == 0 && !has_cls)) return {out, cls_out, lse, cls_lse};

  const at::Tensor qkv = readable_head_views(qkv_in, D, dtype);
  const int64_t row = N == 1 ? 0 : qkv.stride(1);
  const char* base = static_cast<const char*>(qkv.data_ptr());
  const int64_t esize = qkv.element_size();

  AttentionFwdParams p{};
  p.q = base;
  p.k = base + C * esize;
  p.v = base + 2 * C * esize;
  p.bias = nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  sequence_strides(B == 1 ? 0 : qkv.stride(0), row, S, T, time_axis, layout == "st", D, p.q_stride);
  for (int i = 0; i < 5; ++i) {
    p.k_stride[i] = p.v_stride[i] = p.q_stride[i];
    p.bias_stride[i] = 0;
  }
  sequence_strides(N * C, C, S, T, time_axis, layout == "st", D, p.out_stride);

  at::Tensor cls_r;
  if (has_cls) {
    // The class token is the same row for every frame (group stride 0): a prefix key/value of
    // every frame's sequence, and a prefix query whose output row per frame is cls_out[b, t].
    cls_r = readable_head_views(cls.unsqueeze(1), D, dtype);  // as (B, 1, 3C)
    const char* cbase = static_cast<const char*>(cls_r.data_ptr());
    const int64_t cls_strides[3] = {B == 1 ? 0 : cls_r.stride(0), 0, D};
    p.q_prefix = cbase;
    p.k_prefix = cbase + C * esize;
    p.v_prefix = cbase + 2 * C * esize;
    p.out_prefix = cls_out.data_ptr();
    p.lse_prefix = cls_lse.data_ptr<float>();
    for (int i = 0; i < 3; ++i) p.qp_stride[i] = p.kp_stride[i] = p.vp_stride[i] = cls_strides[i];
    p.op_stride[0] = T * C;
    p.op_stride[1] = C;
    p.op_stride[2] = D;
  }
  p.B = static_cast<int>(B);
  p.G = static_cast<int>(G);
  p.H = static_cast<int>(H);
  p.Nq = static_cast<int>(L);
  p.Nk = static_cast<int>(L);
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;

  const cudaError_t err = attention_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed for qkv ", qkv_in.sizes(), " (frames ", frames, ", heads ",
              num_heads, ", axis ", axis, ", layout ", layout, ") dtype ", qkv_in.scalar_type(), ": ",
              cudaGetErrorString(err));
  return {out, cls_out, lse, cls_lse};
}

// The grouped attention kernel's limits (attention_forward_supports).
bool space_time_attention_supports(int64_t head_dim, std::optional<at::ScalarType> dtype,
                                   std::optional<at::Device> /*device*/) {
  return query_supports(dtype, attention_forward_supports, head_dim);
}

}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def(
      "space_time_attention_fwd(Tensor qkv, int frames, int num_heads, str axis, Tensor? cls_qkv, str layout, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("space_time_attention_supports(int head_dim, ScalarType? dtype=None, Device? device=None) -> bool",
        &vitkernels::space_time_attention_supports);
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("space_time_attention_fwd", &vitkernels::space_time_attention_fwd_cuda);
}
