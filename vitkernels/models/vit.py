"""ViT / DeiT (Dosovitskiy et al. 2020; Touvron et al. 2021) on `vitkernels.self_attention`.

Parameter names and shapes follow timm's VisionTransformer (class token, global_pool="token",
qkv_bias, LayerNorm eps 1e-6, exact-erf GELU), so a timm `state_dict()` loads with strict=True.

Training features as in timm: `drop_path_rate` (stochastic depth on both residual branches of every
block, rising linearly from 0 at the first block to the rate at the last; default 0 as timm),
`set_grad_checkpointing()`, `forward_features` (normalised tokens, class token first) and
`forward_head(x, pre_logits=False)` (class token -> head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import self_attention
from . import register_model
from ._common import ClassTokenClassifier, build, init_linear, linear_head
from ._layers import DropPath, GradCheckpointMixin, drop_path_rates


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2), x.shape[-2:]


class Attention(nn.Module):
    """qkv linear -> fused attention on the packed (B, N, 3C) projection -> proj. No layout copies."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self_attention(self.qkv(x), self.num_heads))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid, num_prefix: int = 1) -> torch.Tensor:
    """Bicubic resampling of the patch part of an absolute position embedding (as timm does for a
    different input size); the class-token part is kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, c)], dim=1)


class VisionTransformer(ClassTokenClassifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.grad_checkpointing = False
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = linear_head(embed_dim, num_classes)
        self.apply(init_linear)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x):
        x, grid = self.patch_embed(x)
        pos = resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x)


def _vit(embed_dim: int, depth: int, num_heads: int, kwargs: dict) -> VisionTransformer:
    size = {"patch_size": 16, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    return build(VisionTransformer, size, kwargs)


@register_model
def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    return _vit(192, 12, 3, kwargs)


@register_model
def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    return _vit(384, 12, 6, kwargs)


@register_model
def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    return _vit(768, 12, 12, kwargs)
