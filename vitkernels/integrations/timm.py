"""`vitkernels.patch_timm(model)`: swap, in place, timm attention modules for fused ones.

A swapped module is the same object with the same parameters (so `state_dict()` keys, hooks and
optimizer state are unchanged): only its class becomes `Fused<Name>`, a subclass of timm's class that
overrides one method and keeps timm's own as `_timm_<method>`. The Fused classes are importable from
this module by name (built on first lookup against the installed timm), so a patched model pickles
(`torch.save(model)`), deep-copies and loads in a fresh process.

Covered today:
- VisionTransformer / DeiT: timm's ViT `Attention` (`timm.layers.attention`, or
  `timm.models.vision_transformer` before timm 1.0) -> `FusedAttention`: qkv -> `self_attention`
  (q/k norm, an attention mask or `is_causal` -> timm's norms on the head views, then `attention` with
  the mask as bias) -> [scale norm, gate] -> proj;
- CaiT and XCiT class attention: `timm.models.cait.ClassAttn` -> `FusedClassAttn`: `attention` with the
  class token's one query row on head views of the model's q, k, v linears;
- BEiT: `timm.models.beit.Attention` -> `FusedBeitAttention`: `attention` with timm's relative-position
  bias (plus a shared one), `self_attention` without; `vision_transformer_relpos.RelPosAttention` ->
  `FusedRelPosAttention`: `attention` with its rel_pos module's bias;
- Twins: `timm.models.twins.GlobalSubSampleAttn` -> `FusedGlobalSubSampleAttn`: `sr_attention` after
  timm's own sub-sampling conv and norm (LocallyGroupedAttn keeps timm's forward);
- SwinTransformer: `timm.models.swin_transformer.SwinTransformerBlock` -> `FusedSwinTransformerBlock`
  whose `_attn` is one `window_attention(..., shift_first=True)` call (timm's roll, pad, partition,
  mask, bias gather, attention and reverse, as index math), at every input size;
- SwinTransformerV2: `timm.models.swin_transformer_v2.SwinTransformerV2Block` ->
  `FusedSwinTransformerV2Block`: V2's q/v biases and its continuous position bias (timm's cpb MLP,
  16·sigmoid) as the table, then one cosine `window_attention(..., logit_scale, shift_first=True)`;
  `swin_transformer_v2_cr.SwinTransformerV2CrBlock` -> `FusedSwinTransformerV2CrBlock` likewise, its
  meta MLP evaluated once per relative offset as the table;
- PyramidVisionTransformerV2: `timm.models.pvt_v2.Attention` -> `FusedPvtV2Attention`: timm's own
  spatial reduction, then `sr_attention`; `MlpWithDepthwiseConv` -> `FusedMlpWithDepthwiseConv`: one
  `mix_ffn` call;
- XCiT: `timm.models.xcit.XCA` -> `FusedXCA`: qkv -> `xca` -> proj;
- MViTv2: `timm.models.mvitv2.MultiScaleAttention` -> `FusedMultiScaleAttention`: qkv, timm's own pooling
  convs and norms of q, k, v, then one `pool_attention` (softmax with the decomposed relative-position
  terms, residual pooling, token layout) -> proj (`MultiScaleAttentionPoolFirst` keeps timm's forward).

What is decided when:
- at patch time (static configuration): a module the op does not cover keeps its class and timm's
  forward, and the log says why (q/k norm, a non-square Swin window, a non-erf Mix-FFN activation,
  Mix-FFN linears/conv that are not plain `nn.Linear`/`nn.Conv2d` such as LoRA wrappers, ...);
- at run time, only `self.training` and dropout p: attention dropout while training runs timm's own
  forward (the fused ops have no dropout) and warns once per reason (`FusedFallbackWarning`).

The fused forwards are TorchScript-able (typed signatures, they call `torch.ops.vitkernels.*` through
the small typed functions below) and fx-traceable: those functions are `torch.fx.wrap`-ped leaves, so
`torch.fx.symbolic_trace`, timm's `features_only=True, feature_cls='fx'` and torchvision's
`create_feature_extractor` record one call per fused op and never branch on traced values.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._patching import FusedFallbackWarning, FusedSpec, lazy_fused_classes, patch_modules, warn_fallback

# The Fused classes (FusedAttention, FusedSwinTransformerBlock, FusedPvtV2Attention,
# FusedMlpWithDepthwiseConv, FusedXCA) are importable from here too; they need timm, so `import *` skips them.
__all__ = ["patch_timm", "FusedFallbackWarning"]

_ORIG = "_timm_"


# ----------------------------------------------------------------------------- ops, as the fused forwards call them
# Typed, scriptable wrappers of the public ops (the Python functions of vitkernels.ops validate with
# Python-only code); hf.py's fused forwards call them too. Tests count fused calls by replacing these
# module attributes.


def self_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    return torch.ops.vitkernels.self_attention(qkv, num_heads, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    return torch.ops.vitkernels.attention(q, k, v, bias, scale)


def window_attention(
    qkv: Tensor,
    hw: Tuple[int, int],
    num_heads: int,
    window_size: int,
    shift_size: int,
    table: Optional[Tensor],
    qkv_bias: Optional[Tensor],
    scale: Optional[float],
    logit_scale: Optional[Tensor],
    shift_first: bool,
) -> Tensor:
    return torch.ops.vitkernels.window_attention(
        qkv, [hw[0], hw[1]], num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale, shift_first
    )


def sr_attention(q: Tensor, kv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    return torch.ops.vitkernels.sr_attention(q, kv, num_heads, scale)


def xca(qkv: Tensor, num_heads: int, temperature: Tensor) -> Tensor:
    return torch.ops.vitkernels.xca(qkv, num_heads, temperature)


def pool_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_hw: List[int],
    k_hw: List[int],
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    has_cls_token: bool,
    residual: bool,
    scale: Optional[float] = None,
) -> Tensor:
    return torch.ops.vitkernels.pool_attention(
        q, k, v, [q_hw[0], q_hw[1]], [k_hw[0], k_hw[1]], rel_pos_h, rel_pos_w, has_cls_token, residual, scale
    )


def mix_ffn(
    x: Tensor,
    hw: List[int],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    dw_weight: Tensor,
    dw_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    extra_relu: bool,
) -> Tensor:
    return torch.ops.vitkernels.mix_ffn(
        x, [hw[0], hw[1]], fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, extra_relu
    )


# ----------------------------------------------------------------------------- fx leaves
# Each fused forward calls exactly one of these with its tensors and static config; torch.fx records
# them as single call_function nodes (torch.fx.wrap below), so shape-dependent choices made inside run
# at run time on real shapes, in eager, TorchScript, fx and torch.compile alike.


def _vit_attention(qkv: Tensor, num_heads: int, scale: float, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """(B, N, 3C) -> (B, N, C). timm's mask semantics: `is_causal` wins over `attn_mask`; a boolean mask
    marks the keys that take part (SDPA's convention), a float mask is added to the scores."""
    if attn_mask is None and not is_causal:
        return self_attention(qkv, num_heads, scale)
    b, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    # The op reads a boolean mask as it is (bytes, no float copy), as SDPA does.
    if is_causal:
        bias = torch.ones((n, n), dtype=torch.bool, device=qkv.device).tril()
    else:
        bias = attn_mask
    return attention(q, k, v, bias, scale).transpose(1, 2).reshape(b, n, c)


def _heads_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor], is_causal: bool) -> Tensor:
    """Head views q (B, H, Nq, D), k, v (B, H, Nk, D) -> token layout (B, Nq, H·D). `bias`: None, a float
    bias or a boolean keep-mask broadcastable to (B, H, Nq, Nk); `is_causal` wins over it (timm's rule).
    The op stores its output (B, Nq, H, D), so the reshape to tokens is free."""
    b, h, n, d = q.shape
    if is_causal:
        bias = torch.ones((n, k.shape[2]), dtype=torch.bool, device=q.device).tril()
    return attention(q, k, v, bias, scale).transpose(1, 2).reshape(b, n, h * d)


def _timm_window_attention(
    qkv: Tensor,
    h: int,
    w: int,
    num_heads: int,
    window: int,
    shift: int,
    table: Tensor,
    qkv_bias: Optional[Tensor],
    scale: Optional[float],
    logit_scale: Optional[Tensor],
) -> Tensor:
    """timm's `SwinTransformerBlock._attn` / `SwinTransformerV2Block._attn` core on qkv (B, H·W, 3C) ->
    (B, H·W, C), for every H, W: timm shifts the unpadded map, then pads (`shift_first=True`); a padded
    token's qkv is `qkv_bias` (timm pads the block's input with zeros before its qkv linear).
    `logit_scale` selects V2's cosine attention (then `scale` is unused)."""
    return window_attention(qkv, (h, w), num_heads, window, shift, table, qkv_bias, scale, logit_scale, True)


torch.fx.wrap("_vit_attention")
torch.fx.wrap("_heads_attention")
torch.fx.wrap("_timm_window_attention")
torch.fx.wrap("sr_attention")
torch.fx.wrap("xca")
torch.fx.wrap("mix_ffn")
torch.fx.wrap("pool_attention")


# ----------------------------------------------------------------------------- fused forwards
# Methods of the Fused classes. TorchScript compiles them (and timm's own `_timm_*` methods they fall
# back to); `warn_fallback` is Python-only, hence under `not torch.jit.is_scripting()`.


def _fused_vit_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm ViT Attention: qkv -> fused attention -> [scale norm] [gate] -> proj."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        if is_causal:
            return self._timm_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None:
            return self._timm_forward(x, attn_mask=attn_mask)
        return self._timm_forward(x)
    qkv = self.qkv(x)
    if self._vk_qk_norm:  # timm's norms on the head views of q and k, then the fused core
        b, n, c3 = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        out = _heads_attention(self.q_norm(q), self.k_norm(k), v, self.scale, attn_mask, is_causal)
    else:
        out = _vit_attention(qkv, self.num_heads, self.scale, attn_mask, is_causal)
    if hasattr(self, "norm"):  # timm's optional scale_norm (absent before timm 1.0)
        out = self.norm(out)
    if hasattr(self, "gate"):  # timm's optional sigmoid gate on the attention output
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
    return self.proj_drop(self.proj(out))


def _fused_swin_attn(self, x: Tensor) -> Tensor:
    """timm SwinTransformerBlock._attn on (B, H, W, C) with one fused window_attention call."""
    attn = self.attn
    if attn.training and attn.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_attn(x)
    if self.window_size[0] != self.window_size[1] or self.shift_size[0] != self.shift_size[1]:
        if not torch.jit.is_scripting():  # set_input_size() may have made the window non-square
            warn_fallback(self, "a non-square window or shift (the op takes square windows)")
        return self._timm_attn(x)
    b, h, w, c = x.shape
    qkv = attn.qkv(x.reshape(b, h * w, c))
    out = _timm_window_attention(
        qkv,
        h,
        w,
        attn.num_heads,
        self.window_size[0],
        self.shift_size[0],
        attn.relative_position_bias_table,
        attn.qkv.bias,
        attn.scale,
        None,
    )
    return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)


def _fused_swinv2_attn(self, x: Tensor) -> Tensor:
    """timm SwinTransformerV2Block._attn on (B, H, W, C): qkv with V2's q/v biases, the continuous
    position bias (timm's cpb MLP, 16·sigmoid) as the table, then one cosine `window_attention` with the
    block's logit_scale in timm's shift-then-pad order."""
    attn = self.attn
    if attn.training and attn.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_attn(x)
    if self.window_size[0] != self.window_size[1] or self.shift_size[0] != self.shift_size[1]:
        if not torch.jit.is_scripting():
            warn_fallback(self, "a non-square window or shift (the op takes square windows)")
        return self._timm_attn(x)
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    qkv_bias: Optional[Tensor] = attn.qkv.bias
    if attn.q_bias is None:
        qkv = attn.qkv(tokens)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(tokens) + qkv_bias
        else:
            qkv = F.linear(tokens, weight=attn.qkv.weight, bias=qkv_bias)
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
    out = _timm_window_attention(
        qkv, h, w, attn.num_heads, self.window_size[0], self.shift_size[0], table, qkv_bias, None, attn.logit_scale
    )
    return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)


def _log_spaced_offsets(m: int, like: Tensor) -> Tensor:
    """((2M-1)², 2) relative offsets (dy, dx), dy outer (the table order of SPEC op 3), log-spaced as
    timm's `swin_transformer_v2_cr` spaces its pairwise ones: sign(c)·log(1 + |c|)."""
    r = torch.arange(-(m - 1), m, device=like.device, dtype=torch.float32)
    c = torch.stack([r.repeat_interleave(2 * m - 1), r.repeat(2 * m - 1)], 1)
    return (torch.sign(c) * torch.log(1.0 + c.abs())).to(like.dtype)


def _fused_swinv2cr_attn(self, x: Tensor) -> Tensor:
    """timm SwinTransformerV2CrBlock._shifted_window_attn on (B, H, W, C): its meta MLP evaluated once per
    relative offset gives the ((2M-1)², heads) table (timm evaluates it per pair of tokens: the same
    values, gathered), then one cosine `window_attention` in timm's shift-then-pad order."""
    attn = self.attn
    if attn.training and attn.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_shifted_window_attn(x)
    if attn.training and self._vk_meta_dropout:
        if not torch.jit.is_scripting():
            warn_fallback(
                self,
                "the meta MLP's dropout while training (timm draws it per pair of tokens, the fused "
                "table has one entry per relative offset)",
            )
        return self._timm_shifted_window_attn(x)
    if self.window_size[0] != self.window_size[1] or self.shift_size[0] != self.shift_size[1]:
        if not torch.jit.is_scripting():
            warn_fallback(self, "a non-square window or shift (the op takes square windows)")
        return self._timm_shifted_window_attn(x)
    b, h, w, c = x.shape
    m = self.window_size[0]
    qkv = attn.qkv(x.reshape(b, h * w, c))
    table = attn.meta_mlp(_log_spaced_offsets(m, attn.relative_coordinates_log))
    out = _timm_window_attention(
        qkv, h, w, attn.num_heads, m, self.shift_size[0], table, attn.qkv.bias, None, attn.logit_scale
    )
    return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)


def _fused_pvt_forward(self, x: Tensor, feat_size: List[int]) -> Tensor:
    """timm PVTv2 Attention: the spatial reduction stays timm's code, the attention core is fused."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x, feat_size)
    b, n, c = x.shape
    q = self.q(x)
    if self.pool is not None:
        y = x.permute(0, 2, 1).reshape(b, c, feat_size[0], feat_size[1])
        y = self.sr(self.pool(y)).reshape(b, c, -1).permute(0, 2, 1)
        y = self.norm(y)
        y = self.act(y)
        kv = self.kv(y)
    elif self.sr is not None:
        y = x.permute(0, 2, 1).reshape(b, c, feat_size[0], feat_size[1])
        y = self.sr(y).reshape(b, c, -1).permute(0, 2, 1)
        y = self.norm(y)
        kv = self.kv(y)
    else:
        kv = self.kv(x)
    return self.proj_drop(self.proj(sr_attention(q, kv, self.num_heads, self.scale)))


def _fused_pvt_mlp_forward(self, x: Tensor, feat_size: List[int]) -> Tensor:
    """timm MlpWithDepthwiseConv: fc1 -> [ReLU] -> dwconv3x3 -> GELU -> fc2 as one mix_ffn call."""
    if self.training and self.drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "dropout while training (the fused op has no dropout)")
        return self._timm_forward(x, feat_size)
    fc1, dw, fc2 = self.fc1, self.dwconv, self.fc2
    return mix_ffn(x, feat_size, fc1.weight, fc1.bias, dw.weight, dw.bias, fc2.weight, fc2.bias, self._vk_extra_relu)


def _fused_xca_forward(self, x: Tensor) -> Tensor:
    """timm XCiT XCA: qkv -> `xca` (normalise, temperature, channel softmax, apply to v) -> proj."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x)
    return self.proj_drop(self.proj(xca(self.qkv(x), self.num_heads, self.temperature)))


def _fused_class_attn_forward(self, x: Tensor) -> Tensor:
    """CaiT / XCiT `ClassAttn`: the class token's query against every token: `attention` with one query
    row on head views of the model's own q, k, v linears (no copies) -> proj. Returns (B, 1, C)."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x)
    b, n, c = x.shape
    h = self.num_heads
    q = self.q(x[:, 0:1]).reshape(b, 1, h, c // h).transpose(1, 2)
    k = self.k(x).reshape(b, n, h, c // h).transpose(1, 2)
    v = self.v(x).reshape(b, n, h, c // h).transpose(1, 2)
    return self.proj_drop(self.proj(_heads_attention(q, k, v, self.scale, None, False)))


def _fused_beit_forward(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
    """timm BEiT Attention: qkv (with its q/v biases) -> `attention` with the relative-position bias
    (timm's gather of its table, plus a shared bias) -> proj; no bias at all -> `self_attention`."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x, shared_rel_pos_bias)
    b, n, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    bias: Optional[Tensor] = shared_rel_pos_bias
    if self.relative_position_bias_table is not None:
        bias = self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = bias + shared_rel_pos_bias
    if bias is None:
        out = self_attention(qkv, self.num_heads, self.scale)
    else:
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = _heads_attention(q, k, v, self.scale, bias, False)
    return self.proj_drop(self.proj(out))


def _fused_relpos_forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
    """timm `vision_transformer_relpos.RelPosAttention`: qkv -> [q/k norm] -> `attention` with the
    bias of its rel_pos module (or the shared one) -> proj, as timm's fused path."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x, shared_rel_pos)
    b, n, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    bias: Optional[Tensor] = shared_rel_pos
    if self.rel_pos is not None:
        bias = self.rel_pos.get_bias()
    return self.proj_drop(self.proj(_heads_attention(q, k, v, self.scale, bias, False)))


def _fused_twins_gsa_forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
    """timm Twins `GlobalSubSampleAttn`: q(x) against kv of the sub-sampled map (timm's own sr conv and
    norm) -> `sr_attention` on the packed token-layout projections (no head permutes) -> proj."""
    if self.training and self.attn_drop.p > 0.0:
        if not torch.jit.is_scripting():
            warn_fallback(self, "attention dropout while training (the fused op has no dropout)")
        return self._timm_forward(x, size)
    b, n, c = x.shape
    q = self.q(x)
    if self.sr is not None:
        y = x.permute(0, 2, 1).reshape(b, c, size[0], size[1])
        x = self.norm(self.sr(y).reshape(b, c, -1).permute(0, 2, 1))
    return self.proj_drop(self.proj(sr_attention(q, self.kv(x), self.num_heads, self.scale)))


def _mvit_pre_pool(x: Tensor, feat_size: List[int], has_cls_token: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Head views (B, heads, [1 +] H·W, D) -> (B·heads, D, H, W) maps for timm's pooling module, and the class
    token (B, heads, 1, D) that passes by (timm's `reshape_pre_pool`)."""
    cls_tok: Optional[Tensor] = None
    if has_cls_token:
        cls_tok = x[:, :, :1, :]
        x = x[:, :, 1:, :]
    return x.reshape(-1, feat_size[0], feat_size[1], x.shape[-1]).permute(0, 3, 1, 2).contiguous(), cls_tok


def _mvit_post_pool(x: Tensor, num_heads: int, cls_tok: Optional[Tensor]) -> Tuple[Tensor, List[int]]:
    """Pooled maps (B·heads, D, h, w) -> head views (B, heads, [1 +] h·w, D) and [h, w] (timm's
    `reshape_post_pool`)."""
    size = [x.shape[2], x.shape[3]]
    x = x.reshape(-1, num_heads, x.shape[1], size[0] * size[1]).transpose(2, 3)
    if cls_tok is not None:
        x = torch.cat((cls_tok, x), dim=2)
    return x, size


def _fused_mvit_forward(self, x: Tensor, feat_size: List[int]) -> Tuple[Tensor, List[int]]:
    """timm MViTv2 MultiScaleAttention: qkv -> timm's pooling modules and norms on the head views of q, k, v
    -> one `pool_attention` (scaled scores + decomposed relative-position terms, softmax, @ v, + q when
    residual pooling, straight to token layout) -> proj. Returns (tokens, q's [h, w]) as timm."""
    b, n, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q_size = feat_size
    k_size = feat_size
    if self.pool_q is not None:
        q, q_tok = _mvit_pre_pool(q, feat_size, self.has_cls_token)
        q, q_size = _mvit_post_pool(self.pool_q(q), self.num_heads, q_tok)
    if self.norm_q is not None:
        q = self.norm_q(q)
    if self.pool_k is not None:
        k, k_tok = _mvit_pre_pool(k, feat_size, self.has_cls_token)
        k, k_size = _mvit_post_pool(self.pool_k(k), self.num_heads, k_tok)
    if self.norm_k is not None:
        k = self.norm_k(k)
    if self.pool_v is not None:
        v, v_tok = _mvit_pre_pool(v, feat_size, self.has_cls_token)
        v, _ = _mvit_post_pool(self.pool_v(v), self.num_heads, v_tok)
    if self.norm_v is not None:
        v = self.norm_v(v)
    rel_h: Optional[Tensor] = None
    rel_w: Optional[Tensor] = None
    if hasattr(self, "rel_pos_h"):  # timm creates the tables only for rel_pos_type "spatial"
        rel_h = self.rel_pos_h
        rel_w = self.rel_pos_w
    out = pool_attention(q, k, v, q_size, k_size, rel_h, rel_w, self.has_cls_token, self.residual_pooling, self.scale)
    return self.proj(out), q_size


# ----------------------------------------------------------------------------- patch-time checks


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _vit_reason(m: nn.Module) -> Optional[str]:
    for name in ("qkv", "proj", "attn_drop", "proj_drop"):
        if not hasattr(m, name):
            return f"no `{name}` submodule (an unknown variant of the class)"
    return None


def _vit_prepare(m: nn.Module) -> None:
    # static: a plain bool attribute (TorchScript sees a constant), so the q/k norms are only applied
    # where the model has them
    m._vk_qk_norm = not (_is_identity(getattr(m, "q_norm", None)) and _is_identity(getattr(m, "k_norm", None)))


def _needs(*names: str):
    """A patch-time reason: the first attribute of `names` the module lacks (an unknown variant)."""

    def reason(m: nn.Module) -> Optional[str]:
        for name in names:
            if not hasattr(m, name):
                return f"no `{name}` attribute (an unknown variant of the class)"
        return None

    return reason


def _swin_reason(m: nn.Module) -> Optional[str]:
    attn = getattr(m, "attn", None)
    for name in ("qkv", "proj", "relative_position_bias_table", "attn_drop", "proj_drop"):
        if not hasattr(attn, name):
            return f"no `attn.{name}` (an unknown variant of the class)"
    (m0, m1), (s0, s1) = tuple(m.window_size), tuple(m.shift_size)
    if m0 != m1 or s0 != s1:
        return f"non-square window {tuple(m.window_size)} / shift {tuple(m.shift_size)} (the op takes square windows)"
    if tuple(attn.relative_position_bias_table.shape[:1]) != ((2 * m0 - 1) ** 2,):
        return (
            f"relative position bias table of shape {tuple(attn.relative_position_bias_table.shape)} "
            f"does not fit window {m0}"
        )
    if not isinstance(attn.qkv, nn.Linear):
        return f"attn.qkv is a {type(attn.qkv).__name__}, not nn.Linear (padded tokens need its bias)"
    return None


def _swinv2cr_reason(m: nn.Module) -> Optional[str]:
    attn = getattr(m, "attn", None)
    for name in ("qkv", "proj", "meta_mlp", "relative_coordinates_log", "logit_scale", "attn_drop", "proj_drop"):
        if not hasattr(attn, name):
            return f"no `attn.{name}` (an unknown variant of the class)"
    (m0, m1), (s0, s1) = tuple(m.window_size), tuple(m.shift_size)
    if m0 != m1 or s0 != s1:
        return f"non-square window {tuple(m.window_size)} / shift {tuple(m.shift_size)} (the op takes square windows)"
    if not isinstance(attn.qkv, nn.Linear):
        return f"attn.qkv is a {type(attn.qkv).__name__}, not nn.Linear (padded tokens need its bias)"
    return None


def _swinv2cr_prepare(m: nn.Module) -> None:
    # static: whether timm's meta MLP drops out while training (v2_cr's default: 0.125 after fc1)
    m._vk_meta_dropout = any(isinstance(d, nn.Dropout) and d.p > 0 for d in m.attn.meta_mlp.modules())


def _swinv2_reason(m: nn.Module) -> Optional[str]:
    attn = getattr(m, "attn", None)
    for name in (
        "qkv",
        "proj",
        "cpb_mlp",
        "relative_coords_table",
        "logit_scale",
        "q_bias",
        "qkv_bias_separate",
        "attn_drop",
        "proj_drop",
    ):
        if not hasattr(attn, name):
            return f"no `attn.{name}` (an unknown variant of the class)"
    (m0, m1), (s0, s1) = tuple(m.window_size), tuple(m.shift_size)
    if m0 != m1 or s0 != s1:
        return f"non-square window {tuple(m.window_size)} / shift {tuple(m.shift_size)} (the op takes square windows)"
    if tuple(attn.relative_coords_table.shape[1:3]) != (2 * m0 - 1, 2 * m0 - 1):
        return f"coordinate table of shape {tuple(attn.relative_coords_table.shape)} does not fit window {m0}"
    if not isinstance(attn.qkv, nn.Linear):
        return f"attn.qkv is a {type(attn.qkv).__name__}, not nn.Linear (padded tokens need its bias)"
    return None


def _pvt_reason(m: nn.Module) -> Optional[str]:
    for name in ("q", "kv", "proj", "pool", "sr", "norm", "act", "attn_drop", "proj_drop"):
        if not hasattr(m, name):
            return f"no `{name}` attribute (an unknown variant of the class)"
    return None


def _pvt_mlp_reason(m: nn.Module) -> Optional[str]:
    act = getattr(m, "act", None)
    if not (type(act) is nn.GELU and act.approximate == "none"):
        return f"activation {act!r} (the op fuses exact-erf GELU)"
    if not isinstance(getattr(m, "relu", None), (nn.ReLU, nn.Identity)):
        return f"extra activation {getattr(m, 'relu', None)!r} (the op fuses ReLU or none)"
    for name in ("fc1", "fc2"):
        if type(getattr(m, name, None)) is not nn.Linear:
            return (
                f"{name} is a {type(getattr(m, name, None)).__name__}, not a plain nn.Linear "
                f"(the op reads its weights; a wrapped linear, e.g. LoRA, keeps timm's forward)"
            )
    dw = getattr(m, "dwconv", None)
    if not (
        type(dw) is nn.Conv2d
        and dw.kernel_size == (3, 3)
        and dw.stride == (1, 1)
        and dw.padding == (1, 1)
        and dw.dilation == (1, 1)
        and dw.groups == dw.in_channels == dw.out_channels
        and dw.padding_mode == "zeros"
    ):
        return f"dwconv {dw!r} is not a plain depthwise 3x3 conv"
    return None


def _pvt_mlp_prepare(m: nn.Module) -> None:
    m._vk_extra_relu = isinstance(m.relu, nn.ReLU)  # static: a plain bool attribute, scripted as a constant


def _xca_reason(m: nn.Module) -> Optional[str]:
    for name in ("qkv", "proj", "temperature", "attn_drop", "proj_drop"):
        if not hasattr(m, name):
            return f"no `{name}` attribute (an unknown variant of the class)"
    return None


def _mvit_reason(m: nn.Module) -> Optional[str]:
    for name in ("qkv", "proj", "num_heads", "scale", "has_cls_token", "residual_pooling", "pool_q", "norm_q"):
        if not hasattr(m, name):
            return f"no `{name}` attribute (an unknown variant of the class)"
    if getattr(m, "rel_pos_type", "spatial") == "spatial" and not hasattr(m, "rel_pos_h"):
        return "rel_pos_type 'spatial' without `rel_pos_h` (an unknown variant of the class)"
    return None


def _spec(
    name: str, target: str, fn: Callable, ops: str, reason: Callable, prepare=None, method: str = "forward"
) -> FusedSpec:
    """The spec of `name`, fusing `method` of the timm class `target` ("timm.<module>.<Class>")."""
    module, cls_name = target.rsplit(".", 1)
    return FusedSpec(name, [(module, cls_name)], method, fn, ops, reason, prepare)


_WINDOW_V2 = "vitkernels.window_attention (logit_scale, shift_first)"

_SPECS = [
    FusedSpec(
        "FusedAttention",
        [("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")],
        "forward",
        _fused_vit_forward,
        "vitkernels.self_attention; with q/k norm or a mask: vitkernels.attention",
        _vit_reason,
        _vit_prepare,
    ),
    _spec(
        "FusedSwinTransformerBlock",
        "timm.models.swin_transformer.SwinTransformerBlock",
        _fused_swin_attn,
        "vitkernels.window_attention (shift_first)",
        _swin_reason,
        method="_attn",
    ),
    _spec(
        "FusedSwinTransformerV2Block",
        "timm.models.swin_transformer_v2.SwinTransformerV2Block",
        _fused_swinv2_attn,
        _WINDOW_V2,
        _swinv2_reason,
        method="_attn",
    ),
    _spec(
        "FusedSwinTransformerV2CrBlock",
        "timm.models.swin_transformer_v2_cr.SwinTransformerV2CrBlock",
        _fused_swinv2cr_attn,
        _WINDOW_V2,
        _swinv2cr_reason,
        _swinv2cr_prepare,
        method="_shifted_window_attn",
    ),
    _spec(
        "FusedPvtV2Attention",
        "timm.models.pvt_v2.Attention",
        _fused_pvt_forward,
        "vitkernels.sr_attention",
        _pvt_reason,
    ),
    _spec(
        "FusedMlpWithDepthwiseConv",
        "timm.models.pvt_v2.MlpWithDepthwiseConv",
        _fused_pvt_mlp_forward,
        "vitkernels.mix_ffn",
        _pvt_mlp_reason,
        _pvt_mlp_prepare,
    ),
    _spec("FusedXCA", "timm.models.xcit.XCA", _fused_xca_forward, "vitkernels.xca", _xca_reason),
    _spec(
        "FusedClassAttn",
        "timm.models.cait.ClassAttn",
        _fused_class_attn_forward,
        "vitkernels.attention (one query)",
        _needs("q", "k", "v", "proj", "attn_drop", "proj_drop"),
    ),
    _spec(
        "FusedBeitAttention",
        "timm.models.beit.Attention",
        _fused_beit_forward,
        "vitkernels.attention with the relative-position bias; without one vitkernels.self_attention",
        _needs("qkv", "q_bias", "qkv_bias_separate", "relative_position_bias_table", "proj", "attn_drop"),
    ),
    _spec(
        "FusedRelPosAttention",
        "timm.models.vision_transformer_relpos.RelPosAttention",
        _fused_relpos_forward,
        "vitkernels.attention with the relative-position bias",
        _needs("qkv", "q_norm", "k_norm", "rel_pos", "head_dim", "proj", "attn_drop"),
    ),
    _spec(
        "FusedGlobalSubSampleAttn",
        "timm.models.twins.GlobalSubSampleAttn",
        _fused_twins_gsa_forward,
        "vitkernels.sr_attention",
        _needs("q", "kv", "sr", "norm", "proj", "attn_drop"),
    ),
    _spec(
        "FusedMultiScaleAttention",
        "timm.models.mvitv2.MultiScaleAttention",
        _fused_mvit_forward,
        "vitkernels.pool_attention",
        _mvit_reason,
    ),
]
# `Fused<Name>` classes are importable from this module by name (pickle looks them up this way)
__getattr__, __dir__ = lazy_fused_classes(globals(), _SPECS, _ORIG, "timm")


def patch_timm(model: nn.Module) -> nn.Module:
    """Swap, in place, the supported timm attention / Mix-FFN modules of `model` for fused ones and
    return `model`. Logs (logger "vitkernels", INFO) what was fused and what keeps timm's forward and why."""
    return patch_modules(model, _SPECS, __name__, _ORIG, "timm", "patch_timm")
