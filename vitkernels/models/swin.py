"""Swin Transformer (Liu et al. 2021) on `vitkernels.window_attention`.

Parameter names and shapes follow timm's SwinTransformer (>= 0.9: `layers.{i}.downsample` at the
start of stages 2-4, `head.fc`), so a timm `state_dict()` loads with strict=True. Tokens stay in
(B, H·W, C) layout between blocks; padding, cyclic shift, window partition, shift mask and the
relative-position-bias gather all happen inside the op (SPEC.md op 3: pad, then shift — the
original Swin / HF order; timm shifts before padding, identical when H and W are multiples of M).
Any input size works: the image is zero-padded to a multiple of the patch size, odd maps are padded
before patch merging, and a stage whose map is not larger than the window uses one window of
min(H, W) with no shift (as timm and the original do). As in timm, `img_size` fixes each block's
window at construction: a stage whose map at img_size is no larger than the window is built with a
window (and a relative-position-bias table) of that map's size, unshifted.

Training features as in timm: `drop_path_rate` (stochastic depth on both residual branches, rising
linearly over all blocks of all stages; default 0.1 as timm's SwinTransformer),
`set_grad_checkpointing()`, `forward_features` (the normalised last-stage map, (B, H, W, C) as timm)
and `forward_head(x, pre_logits=False)` (global average pool -> head.fc).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import window_attention
from . import register_model
from ._common import Classifier, build, init_linear
from ._layers import DropPath, GradCheckpointMixin, block_rates, drop_path_rates, split_rates
from .vit import Mlp


def effective_window(hw, window_size: int, shift_size: int):
    """Window and shift used on an H×W map: one window of min(H, W), unshifted, when the map is no
    larger than the window."""
    m = min(hw)
    return (m, 0) if m <= window_size else (window_size, shift_size)


def crop_bias_table(table: torch.Tensor, window_size: int, m: int) -> torch.Tensor:
    """The ((2m-1)², heads) table of a smaller window m: the same relative offsets, taken from the
    centre of the ((2M-1)², heads) table of window M."""
    if m == window_size:
        return table
    side = 2 * window_size - 1
    lo, hi = window_size - m, window_size + m - 1
    return table.reshape(side, side, -1)[lo:hi, lo:hi].reshape((2 * m - 1) ** 2, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw, shift_size: int):
        m, s = effective_window(hw, self.window_size, shift_size)
        table = crop_bias_table(self.relative_position_bias_table, self.window_size, m)
        out = window_attention(self.qkv(x), hw, self.num_heads, m, s, table, self.qkv.bias)
        return self.proj(out)


class SwinBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        resolution: int | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if resolution is not None and resolution <= window_size:
            # As timm (and the original Swin) build it: a block whose map at the model's img_size is
            # no larger than the window gets a window of that size, unshifted, and a bias table sized
            # to it, so a timm model built at the same img_size loads with strict=True.
            window_size, shift_size = max(resolution, 1), 0
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x, hw):
        x = x + self.drop_path1(self.attn(self.norm1(x), hw, self.shift_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def merge_2x2(x: torch.Tensor, hw):
    """(B, H·W, C) tokens -> (B, H'·W', 4C) and (H', W') = (⌈H/2⌉, ⌈W/2⌉): each 2×2 neighbourhood's channels
    concatenated in timm's order ((h, w) offsets (0,0), (1,0), (0,1), (1,1)), an odd map zero-padded
    bottom/right first."""
    b, _, c = x.shape
    h, w = hw
    x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    return x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c), (h2, w2)


class PatchMerging(nn.Module):
    """2×2 neighbourhood -> 4C channels (`merge_2x2`) -> LN -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, hw):
        x, hw = merge_2x2(x, hw)
        return self.reduction(self.norm(x)), hw


class PatchMergingStage(GradCheckpointMixin, nn.Module):
    """The forward of a Swin (V1 and V2) stage on (B, H·W, C) tokens and their (H, W): patch merging where the
    stage has one (`downsample`, else an Identity), then the blocks (checkpointed when enabled)."""

    def forward(self, x, hw):
        if not isinstance(self.downsample, nn.Identity):
            x, hw = self.downsample(x, hw)
        for block in self.blocks:
            x = self.run_block(block, x, hw)
        return x, hw


class SwinStage(PatchMergingStage):
    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        resolution: int | None = None,
        drop_path=0.0,
    ):
        super().__init__()
        self.grad_checkpointing = False
        dpr = block_rates(drop_path, depth)
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            [
                SwinBlock(
                    out_dim,
                    num_heads,
                    window_size,
                    0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio,
                    resolution,
                    dpr[i],
                )
                for i in range(depth)
            ]
        )


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x):
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, pre_logits: bool = False):
        # global average pool: over the (H, W) of an NHWC map (timm's forward_features output) or over tokens
        x = x.mean(dim=(1, 2)) if x.dim() == 4 else x.mean(dim=1)
        return x if pre_logits else self.fc(x)


class SwinClassifier(Classifier):
    """forward_features and forward_head of Swin V1 and V2: patch embedding, the stages, the final norm on an
    NHWC map; `head` (a `ClassifierHead`) pools it."""

    def forward_features(self, x):
        """Images (B, 3, H, W) -> the normalised last-stage map (B, H/32, W/32, C), NHWC as timm."""
        x, hw = self.patch_embed(x)
        for stage in self.layers:
            x, hw = stage(x, hw)
        return self.norm(x).reshape(x.shape[0], hw[0], hw[1], -1)

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits)


class SwinTransformer(SwinClassifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.img_size = img_size
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        # The map of each stage at img_size (the shorter side for an (H, W) size): the patch grid,
        # halved (rounding up, as the padded patch merging does) at every stage after the first.
        res = [(min(img_size) if isinstance(img_size, (tuple, list)) else img_size) // patch_size]
        for _ in depths[1:]:
            res.append((res[-1] + 1) // 2)
        dpr = split_rates(drop_path_rates(drop_path_rate, sum(depths)), depths)
        self.layers = nn.Sequential(
            *[
                SwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    window_size,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    resolution=res[i],
                    drop_path=dpr[i],
                )
                for i in range(len(depths))
            ]
        )
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head = ClassifierHead(self.num_features, num_classes)
        self.apply(init_linear)


def _swin(defaults: dict, kwargs: dict) -> SwinTransformer:
    return build(SwinTransformer, defaults, kwargs)


@register_model
def swin_tiny_patch4_window7_224(**kwargs) -> SwinTransformer:
    return _swin(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7), kwargs)


@register_model
def swin_small_patch4_window7_224(**kwargs) -> SwinTransformer:
    return _swin(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7), kwargs)


@register_model
def swin_base_patch4_window7_224(**kwargs) -> SwinTransformer:
    return _swin(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7), kwargs)


@register_model
def swin_base_patch4_window12_384(**kwargs) -> SwinTransformer:
    return _swin(
        dict(img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12), kwargs
    )
