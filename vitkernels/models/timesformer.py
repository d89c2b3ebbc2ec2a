"""TimeSformer (Bertasius et al. 2021), divided space-time attention, on `vitkernels.space_time_attention`.

Parameter names follow the official TimeSformer code (facebookresearch/TimeSformer, `VisionTransformer`
with attention_type "divided_space_time") with the `model.` prefix of its checkpoints stripped:
`cls_token`, `pos_embed`, `time_embed`, `patch_embed.proj`, `blocks.{i}.{norm1, attn.qkv, attn.proj,
temporal_norm1, temporal_attn.qkv, temporal_attn.proj, temporal_fc, norm2, mlp.fc1, mlp.fc2}`,
`norm`, `head`. LayerNorm eps 1e-6 (`layer_norm_eps`), exact-erf GELU, qkv bias.

Hugging Face: `convert_hf_timesformer(state_dict)` renames a transformers
`TimesformerForVideoClassification` state_dict (e.g. facebook/timesformer-base-finetuned-k400) to
these names (strict load). transformers runs the same divided space-time block (token order "st",
time embedding added per position, the class token's spatial outputs averaged over frames, drop path
before `temporal_dense`); it takes clips (B, T, 3, H, W), this model (B, 3, T, H, W).

Token layout: the class token, then the patch tokens with index s·T + t (space outer, time
fastest): layout "st" of `space_time_attention`. A block is
    temporal attention over each position's T frames → temporal_fc → residual;
    spatial attention over each frame's S tokens with the class token prepended to every frame
    (its per-frame outputs averaged) → residual; MLP → residual.
The attention ops read the packed qkv projections in place; no rearrange copies are made.
Input: clips (B, 3, T, H, W); output: logits (B, num_classes).

Training features: `drop_path_rate` — stochastic depth exactly as the official code and transformers'
`TimesformerLayer` apply it: rates rising linearly from 0 at the first block to the rate at the last
(default 0, transformers' default; the official TimeSformer-Base recipe uses 0.1), one DropPath per
block on its three residual branches, and, as there, the temporal branch drops per (clip, spatial
position) and the spatial branch per (clip, frame) (the class token's per-frame outputs with their
frame) — the references apply it to their rearranged (B·S, T, C) and (B·T, 1+S, C) batches — while
the MLP branch drops per clip; masks are drawn as transformers draws them. `set_grad_checkpointing()`;
`forward_features` (the normalised tokens (B, 1 + S·T, C), class token first) and
`forward_head(x, pre_logits=False)` (class token -> head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import space_time_attention
from . import register_model
from ._common import (
    ClassTokenClassifier,
    build,
    check_clip,
    init_embeddings_and_linears,
    linear_head,
    patch_embed_holding,
)
from ._layers import DropPath, GradCheckpointMixin, drop_path_rates
from .vit import Mlp


class Attention(nn.Module):
    """The qkv and proj linears of one attention; the attention itself runs in the block."""

    def __init__(self, dim: int, qkv_bias: bool = True):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class Block(nn.Module):
    """Divided space-time block. Parameters: spatial norm1/attn, temporal_norm1/temporal_attn,
    temporal_fc (TimeSformer only: ViViT's block subclasses this one without it), norm2/mlp."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        temporal_fc: bool = True,
        drop_path: float = 0.0,
        drop_path_style: str = "hf",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, qkv_bias)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = Attention(dim, qkv_bias)
        if temporal_fc:
            self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path, drop_path_style)

    def forward(self, x, frames: int):
        cls, xp = x[:, :1], x[:, 1:]
        b, n, c = xp.shape
        s = n // frames
        # Temporal: every spatial position attends over its frames (a contiguous run in layout "st").
        qkv = self.temporal_attn.qkv(self.temporal_norm1(xp))
        t = self.temporal_attn.proj(space_time_attention(qkv, frames, self.num_heads, "time", layout="st"))
        m = self.drop_path.mask((b, s, 1, 1), t)  # one draw per (clip, position)
        if m is not None:
            t = (t.view(b, s, frames, c) * m).view(b, n, c)
        xt = xp + self.temporal_fc(t)
        # Spatial: every frame attends over its tokens, the class token prepended to each frame.
        qkv = self.attn.qkv(self.norm1(xt))
        cls_qkv = self.attn.qkv(self.norm1(cls[:, 0]))
        out, cls_out = space_time_attention(qkv, frames, self.num_heads, "space", cls_qkv=cls_qkv, layout="st")
        out, cls_out = self.attn.proj(out), self.attn.proj(cls_out)
        m = self.drop_path.mask((b, 1, frames, 1), out)  # one draw per (clip, frame)
        if m is not None:
            out = (out.view(b, s, frames, c) * m).view(b, n, c)
            cls_out = cls_out * m.view(b, frames, 1)
        cls_res = cls_out.mean(dim=1, keepdim=True)  # average over frames
        x = torch.cat((cls + cls_res, xt + out), dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimeSformer(ClassTokenClassifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_frames: int = 8,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.patch_embed = patch_embed_holding(nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size))
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], eps=layer_norm_eps)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.head = linear_head(embed_dim, num_classes)
        init_embeddings_and_linears(self, self.pos_embed, self.cls_token)
        for blk in list(self.blocks)[1:]:  # as the official init: temporal_fc starts at zero after block 0
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """pos_embed, its patch grid resized (nearest) to h × w when the input size differs (as the
        official code does)."""
        if h * w + 1 == self.pos_embed.shape[1]:
            return self.pos_embed
        p = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
        grid = self.pos_embed[:, 1:].transpose(1, 2).reshape(1, -1, p, p)
        grid = F.interpolate(grid, size=(h, w), mode="nearest").flatten(2).transpose(1, 2)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def _time_embed(self, frames: int) -> torch.Tensor:
        if frames == self.time_embed.shape[1]:
            return self.time_embed
        return F.interpolate(self.time_embed.transpose(1, 2), size=frames, mode="nearest").transpose(1, 2)

    def forward_features(self, x):
        """Clips (B, 3, T, H, W) → the normalised tokens (B, 1 + S·T, embed_dim): the class token, then
        the patch tokens in layout "st" (index s·T + t)."""
        check_clip(x, "TimeSformer")
        b, c, frames = x.shape[:3]
        x = self.patch_embed.proj(x.transpose(1, 2).reshape(b * frames, c, *x.shape[3:]))  # (B·T, D, h, w)
        h, w = x.shape[-2:]
        pos = self._pos_embed(h, w)
        x = x.flatten(2).transpose(1, 2) + pos[:, 1:]  # (B·T, S, D)
        d = x.shape[-1]
        x = x.reshape(b, frames, h * w, d).transpose(1, 2) + self._time_embed(frames)  # (B, S, T, D)
        cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1)
        x = torch.cat((cls, x.reshape(b, h * w * frames, d)), dim=1)  # layout "st"
        for blk in self.blocks:
            x = self.run_block(blk, x, frames)
        return self.norm(x)


@register_model
def timesformer_base_patch16_224(**kwargs) -> TimeSformer:
    """TimeSformer-Base, divided space-time attention, 8 frames at 224 px (Kinetics-400 head by default)."""
    return build(TimeSformer, {"num_frames": 8, "num_classes": 400}, kwargs)


# ----------------------------------------------------------------------------- Hugging Face weights

# transformers TimesformerLayer submodule -> our Block submodule (the same in transformers 4.x and 5.x)
_HF_TIMESFORMER_LAYER = {
    "layernorm_before": "norm1",
    "attention.attention.qkv": "attn.qkv",
    "attention.output.dense": "attn.proj",
    "temporal_layernorm": "temporal_norm1",
    "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj",
    "temporal_dense": "temporal_fc",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TIMESFORMER_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.time_embeddings": "time_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _hf_timesformer_key(key: str) -> str | None:
    if key in ("classifier.weight", "classifier.bias"):
        return "head." + key.split(".", 1)[1]
    k = key[len("timesformer.") :] if key.startswith("timesformer.") else key
    if k in _HF_TIMESFORMER_TOP:
        return _HF_TIMESFORMER_TOP[k]
    if k.startswith("encoder.layer."):
        idx, _, rest = k[len("encoder.layer.") :].partition(".")
        module, _, param = rest.rpartition(".")
        if idx.isdigit() and param in ("weight", "bias") and module in _HF_TIMESFORMER_LAYER:
            return f"blocks.{idx}.{_HF_TIMESFORMER_LAYER[module]}.{param}"
    return None


def convert_hf_timesformer(state_dict) -> dict[str, torch.Tensor]:
    """transformers `TimesformerForVideoClassification` state_dict (e.g. facebook/timesformer-base-finetuned-k400)
    -> `timesformer_base_patch16_224` names, for `load_state_dict(..., strict=True)`.

    Every key is renamed, none is dropped: `timesformer.embeddings.{cls_token, position_embeddings,
    time_embeddings, patch_embeddings.projection}` -> `cls_token`, `pos_embed`, `time_embed`,
    `patch_embed.proj`; `timesformer.encoder.layer.{i}.{layernorm_before, attention.attention.qkv,
    attention.output.dense, temporal_layernorm, temporal_attention.attention.qkv,
    temporal_attention.output.dense, temporal_dense, layernorm_after, intermediate.dense, output.dense}`
    -> `blocks.{i}.{norm1, attn.qkv, attn.proj, temporal_norm1, temporal_attn.qkv, temporal_attn.proj,
    temporal_fc, norm2, mlp.fc1, mlp.fc2}`; `timesformer.layernorm` -> `norm`; `classifier` -> `head`.
    transformers packs q, k, v in one linear exactly as this model does, so tensors are used unchanged.
    A `TimesformerModel` state_dict (no `timesformer.` prefix, no classifier) converts too: load it into
    a model built with `num_classes=0`. Raises ValueError naming any key it does not recognise. Only
    attention_type "divided_space_time" is this model: a "space_only" / "joint_space_time" state_dict
    lacks the temporal_* weights, so the strict load reports them missing."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _hf_timesformer_key(key)
        if new is None:
            unknown.append(key)
        elif new in out:
            raise ValueError(f"convert_hf_timesformer: keys {key!r} and another one both map to {new!r}")
        else:
            out[new] = value
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise ValueError(
            f"convert_hf_timesformer: unrecognised key(s) {unknown[:8]}{more}; expected a transformers "
            "TimesformerForVideoClassification (or TimesformerModel) state_dict with "
            'attention_type="divided_space_time"'
        )
    return out
