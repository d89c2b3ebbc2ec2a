"""`vitkernels.patch_timm(model)`: swap, in place, timm attention modules for fused ones.

A swapped module is the same object with the same parameters (so `state_dict()` keys are unchanged):
only its class becomes a subclass `Fused<Name>` that overrides one method. Where a module is configured in
a way the fused op does not cover (q/k norm, attention dropout while training, an attention mask)
it runs timm's own forward.

Covered today:
- VisionTransformer / DeiT: timm's ViT `Attention` (`timm.layers.attention`, or
  `timm.models.vision_transformer` before timm 1.0) -> `self_attention`;
- SwinTransformer: `timm.models.swin_transformer.SwinTransformerBlock` gets a fused `_attn`
  (roll, pad, partition, mask, bias gather, attention, reverse in one `window_attention` call).
- PyramidVisionTransformerV2: `timm.models.pvt_v2.Attention` -> `sr_attention` after timm's own
  spatial reduction, and `MlpWithDepthwiseConv` -> one `mix_ffn` call.
- XCiT: `timm.models.xcit.XCA` -> `xca` (cross-covariance attention on the packed qkv).
"""
from __future__ import annotations

from torch import nn

from ..ops import mix_ffn, self_attention, sr_attention, window_attention, xca


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _fused_vit_attention(self, x, attn_mask=None, is_causal: bool = False, **kwargs):
    """timm ViT Attention: qkv -> fused self_attention -> [scale norm] -> proj."""
    if (kwargs or attn_mask is not None or is_causal or getattr(self, "gate", None) is not None
            or not _is_identity(getattr(self, "q_norm", None)) or not _is_identity(getattr(self, "k_norm", None))
            or _dropping(self, "attn_drop")):
        if attn_mask is not None:
            kwargs["attn_mask"] = attn_mask
        if is_causal:
            kwargs["is_causal"] = is_causal
        return self._timm_forward(x, **kwargs)
    out = self_attention(self.qkv(x), self.num_heads, getattr(self, "scale", None))
    norm = getattr(self, "norm", None)  # timm's optional scale_norm after attention
    if not _is_identity(norm):
        out = norm(out)
    return self.proj_drop(self.proj(out))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fused_swin_attn(self, x):
    """timm SwinTransformerBlock._attn on (B, H, W, C) with one fused window_attention call.

    timm shifts before padding while the op pads first (SPEC.md); the two agree when H and W are
    multiples of the window, so other shapes (and non-square windows/shifts, attention dropout while
    training) keep timm's own path."""
    b, h, w, c = x.shape
    attn = self.attn
    (m, m2), (s, s2) = _pair(self.window_size), _pair(self.shift_size)
    if (m != m2 or s != s2 or h % m or w % m or _dropping(attn, "attn_drop")
            or attn.relative_position_bias_table.shape[0] != (2 * m - 1) ** 2):
        return self._timm_attn(x)
    qkv = attn.qkv(x.reshape(b, h * w, c))
    out = window_attention(qkv, (h, w), attn.num_heads, m, s, attn.relative_position_bias_table, attn.qkv.bias,
                           getattr(attn, "scale", None))
    return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)


def _dropping(module: nn.Module, *names: str) -> bool:
    """True while training with a non-zero dropout among `names` (the fused paths have none)."""
    return module.training and any(getattr(getattr(module, n, None), "p", 0.0) > 0 for n in names)


def _fused_pvt_attention(self, x, feat_size):
    """timm PVTv2 Attention: the spatial reduction stays timm's code, the attention core is fused."""
    if _dropping(self, "attn_drop"):
        return self._timm_forward(x, feat_size)
    b, n, c = x.shape
    h, w = feat_size
    q = self.q(x)
    if self.pool is not None or self.sr is not None:
        y = x.transpose(1, 2).reshape(b, c, h, w)
        y = self.sr(self.pool(y) if self.pool is not None else y).flatten(2).transpose(1, 2)
        x = self.norm(y)
        if self.act is not None:
            x = self.act(x)
    return self.proj_drop(self.proj(sr_attention(q, self.kv(x), self.num_heads, self.scale)))


def _fused_pvt_mlp(self, x, feat_size):
    """timm MlpWithDepthwiseConv: fc1 -> [ReLU] -> dwconv3x3 -> GELU -> fc2 as one mix_ffn call."""
    act = self.act
    if _dropping(self, "drop") or not (type(act) is nn.GELU and act.approximate == "none"):
        return self._timm_forward(x, feat_size)
    return mix_ffn(x, feat_size, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                   self.fc2.weight, self.fc2.bias, isinstance(self.relu, nn.ReLU))


def _fused_xca(self, x):
    """timm XCiT XCA: qkv -> `xca` (normalise, temperature, channel softmax, apply to v) -> proj."""
    if _dropping(self, "attn_drop"):
        return self._timm_forward(x)
    return self.proj_drop(self.proj(xca(self.qkv(x), self.num_heads, self.temperature)))


_FUSED_CLASSES: dict = {}


def _swap_class(module: nn.Module, method: str, fused) -> nn.Module:
    """Same object, same parameters: only its class becomes a subclass whose `method` is `fused`
    (timm's own stays reachable as `_timm_<method>` for the configurations the fused path skips)."""
    cls = type(module)
    if cls not in _FUSED_CLASSES:
        timm_name = "_timm_" + method.lstrip("_")
        _FUSED_CLASSES[cls] = type("Fused" + cls.__name__, (cls,), {method: fused, timm_name: getattr(cls, method)})
    module.__class__ = _FUSED_CLASSES[cls]
    return module


_SWAPS = {
    ("timm.models.vision_transformer", "Attention"): lambda m: _swap_class(m, "forward", _fused_vit_attention),
    ("timm.layers.attention", "Attention"): lambda m: _swap_class(m, "forward", _fused_vit_attention),  # timm >= 1.0
    ("timm.models.swin_transformer", "SwinTransformerBlock"): lambda m: _swap_class(m, "_attn", _fused_swin_attn),
    ("timm.models.pvt_v2", "Attention"): lambda m: _swap_class(m, "forward", _fused_pvt_attention),
    ("timm.models.pvt_v2", "MlpWithDepthwiseConv"): lambda m: _swap_class(m, "forward", _fused_pvt_mlp),
    ("timm.models.xcit", "XCA"): lambda m: _swap_class(m, "forward", _fused_xca),
}


def patch_timm(model: nn.Module) -> nn.Module:
    """Replace the supported timm attention modules of `model` in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get((type(child).__module__, type(child).__name__))
            if swap is not None:
                setattr(parent, name, swap(child))
    return model
