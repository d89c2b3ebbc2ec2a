"""`vitkernels.patch_timm(model)`: swap, in place, timm attention modules for fused ones.

The swapped module keeps the original's submodules and attributes (so `state_dict()` keys and
parameters are unchanged and shared) and only replaces `forward`. Where a module is configured in
a way the fused op does not cover (q/k norm, attention dropout while training, an attention mask)
it runs timm's own forward.

Covered today:
- VisionTransformer / DeiT: timm's ViT `Attention` (`timm.layers.attention`, or
  `timm.models.vision_transformer` before timm 1.0) -> `self_attention`;
- SwinTransformer: `timm.models.swin_transformer.SwinTransformerBlock` gets a fused `_attn`
  (roll, pad, partition, mask, bias gather, attention, reverse in one `window_attention` call).
PyramidVisionTransformerV2 and XCiT modules are swapped as their fused kernels land.
"""
from __future__ import annotations

from torch import nn

from ..ops import self_attention, window_attention


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


class FusedViTAttention(nn.Module):
    """timm's ViT `Attention` on `vitkernels.self_attention` (qkv -> fused attention -> proj)."""

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "FusedViTAttention":
        new = cls.__new__(cls)
        new.__dict__.update(attn.__dict__)  # same submodules, parameters and hyper-parameters
        new._timm_forward = type(attn).forward
        return new

    def _fusable(self, attn_mask, is_causal) -> bool:
        drop = getattr(self, "attn_drop", None)
        return (attn_mask is None and not is_causal and getattr(self, "gate", None) is None
                and _is_identity(getattr(self, "q_norm", None)) and _is_identity(getattr(self, "k_norm", None))
                and not (self.training and drop is not None and getattr(drop, "p", 0.0) > 0))

    def forward(self, x, attn_mask=None, is_causal: bool = False, **kwargs):
        if kwargs or not self._fusable(attn_mask, is_causal):
            if attn_mask is not None:
                kwargs["attn_mask"] = attn_mask
            if is_causal:
                kwargs["is_causal"] = is_causal
            return self._timm_forward(self, x, **kwargs)
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
    drop = getattr(attn, "attn_drop", None)
    if (m != m2 or s != s2 or h % m or w % m or (self.training and getattr(drop, "p", 0.0) > 0)
            or attn.relative_position_bias_table.shape[0] != (2 * m - 1) ** 2):
        return self._timm_attn(x)
    qkv = attn.qkv(x.reshape(b, h * w, c))
    out = window_attention(qkv, (h, w), attn.num_heads, m, s, attn.relative_position_bias_table, attn.qkv.bias,
                           getattr(attn, "scale", None))
    return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)


_FUSED_CLASSES: dict = {}


def _swap_swin_block(block: nn.Module) -> nn.Module:
    """Same object, same parameters: only its class becomes a subclass with a fused `_attn`."""
    cls = type(block)
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type("Fused" + cls.__name__, (cls,), {"_attn": _fused_swin_attn, "_timm_attn": cls._attn})
    block.__class__ = _FUSED_CLASSES[cls]
    return block


_SWAPS = {
    ("timm.models.vision_transformer", "Attention"): FusedViTAttention.from_timm,  # timm < 1.0
    ("timm.layers.attention", "Attention"): FusedViTAttention.from_timm,
    ("timm.models.swin_transformer", "SwinTransformerBlock"): _swap_swin_block,
}


def patch_timm(model: nn.Module) -> nn.Module:
    """Replace the supported timm attention modules of `model` in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get((type(child).__module__, type(child).__name__))
            if swap is not None:
                setattr(parent, name, swap(child))
    return model
