"""`vitkernels.patch_timm(model)`: swap, in place, timm attention modules for fused ones.

The swapped module keeps the original's submodules and attributes (so `state_dict()` keys and
parameters are unchanged and shared) and only replaces `forward`. Where a module is configured in
a way the fused op does not cover (q/k norm, attention dropout while training, an attention mask)
it runs timm's own forward.

Covered today: VisionTransformer / DeiT attention (`timm.models.vision_transformer.Attention`).
Swin, PyramidVisionTransformerV2 and XCiT modules are swapped as their fused kernels land.
"""
from __future__ import annotations

from torch import nn

from ..ops import self_attention


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

    def _fusable(self, attn_mask) -> bool:
        drop = getattr(self, "attn_drop", None)
        return (attn_mask is None and _is_identity(getattr(self, "q_norm", None))
                and _is_identity(getattr(self, "k_norm", None))
                and not (self.training and drop is not None and getattr(drop, "p", 0.0) > 0))

    def forward(self, x, attn_mask=None, **kwargs):
        if kwargs or not self._fusable(attn_mask):
            if attn_mask is not None:
                kwargs["attn_mask"] = attn_mask
            return self._timm_forward(self, x, **kwargs)
        out = self_attention(self.qkv(x), self.num_heads, getattr(self, "scale", None))
        norm = getattr(self, "norm", None)  # timm's optional scale_norm after attention
        if not _is_identity(norm):
            out = norm(out)
        return self.proj_drop(self.proj(out))


_SWAPS = {
    ("timm.models.vision_transformer", "Attention"): FusedViTAttention.from_timm,
}


def patch_timm(model: nn.Module) -> nn.Module:
    """Replace the supported timm attention modules of `model` in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get((type(child).__module__, type(child).__name__))
            if swap is not None:
                setattr(parent, name, swap(child))
    return model
