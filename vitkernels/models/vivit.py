"""ViViT model 3, factorised self-attention (Arnab et al. 2021), on `vitkernels.space_time_attention`.

Each block attends spatially (each frame's S tokens), then temporally (each position's T tokens),
then runs the MLP, each step pre-LayerNorm with a residual:
    x = x + proj(space_attn(norm1(x)));  x = x + proj(time_attn(temporal_norm1(x)));  x = x + mlp(norm2(x))
Tubelet embedding (Conv3d, 2 frames × 16 × 16 pixels), learned spatio-temporal position embedding, no
class token (model 3 has none): the head reads the mean of the final normalised tokens.
Tokens are frame-major (index t·S + s): layout "ts" of `space_time_attention`, so the op reads every
frame's or position's tokens from the packed qkv projection without rearranging.

There is no official PyTorch checkpoint (the paper's code is JAX/Scenic); parameter names follow the
timm/TimeSformer conventions: `patch_embed.proj`, `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj,
temporal_norm1, temporal_attn.qkv, temporal_attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`.
LayerNorm eps 1e-6, exact-erf GELU, qkv bias. Input: clips (B, 3, T, H, W); output: logits.

Training features: `drop_path_rate` (stochastic depth per clip on the three residual branches of every
block, rising linearly from 0 at the first block to the rate at the last, timm-style masks; default
0), `set_grad_checkpointing()`, `forward_features` (the normalised tokens (B, T'·S, C), frame-major)
and `forward_head(x, pre_logits=False)` (mean over tokens -> head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import space_time_attention
from . import register_model, timesformer
from ._layers import GradCheckpointMixin, drop_path_rates
from .vit import init_linear


class Block(timesformer.Block):
    """TimeSformer's block parameters without temporal_fc; factorised order space → time → MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, temporal_fc=False, drop_path=drop_path,
                         drop_path_style="timm")

    def forward(self, x, frames: int):
        s = space_time_attention(self.attn.qkv(self.norm1(x)), frames, self.num_heads, "space", layout="ts")
        x = x + self.drop_path(self.attn.proj(s))
        t = space_time_attention(self.temporal_attn.qkv(self.temporal_norm1(x)), frames, self.num_heads, "time",
                                 layout="ts")
        x = x + self.drop_path(self.temporal_attn.proj(t))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViViTFactorized(GradCheckpointMixin, nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, tubelet_size: int = 2, num_frames: int = 32,
                 in_chans: int = 3, num_classes: int = 400, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size),
                                          stride=(tubelet_size, patch_size, patch_size))
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_linear)

    def _pos_embed(self, grid) -> torch.Tensor:
        """pos_embed (frame-major), trilinearly resized when the clip's token grid differs."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        d = self.pos_embed.shape[-1]
        p = self.pos_embed.reshape(1, *self.grid, d).permute(0, 4, 1, 2, 3)
        p = F.interpolate(p, size=tuple(grid), mode="trilinear", align_corners=False)
        return p.permute(0, 2, 3, 4, 1).reshape(1, -1, d)

    def forward_features(self, x):
        """Clips (B, 3, T, H, W) → the normalised tokens (B, T'·S, embed_dim), frame-major (layout "ts")."""
        if x.dim() != 5:
            raise ValueError(f"ViViT expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        x = self.patch_embed.proj(x)                      # (B, D, T', h, w)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2) + self._pos_embed(grid)  # index t·S + s: layout "ts"
        for blk in self.blocks:
            x = self.run_block(blk, x, grid[0])
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=1)  # no class token: average the tokens
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model
def vivit_base_factorized(**kwargs) -> ViViTFactorized:
    """ViViT-B model 3 (factorised self-attention): 32 frames at 224 px, tubelets 2×16×16 (16×14×14 tokens)."""
    return ViViTFactorized(**kwargs)
