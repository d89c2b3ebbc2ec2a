"""Swin Transformer V2 (Liu et al. 2022) on `vitkernels.window_attention` with `logit_scale`.

Parameter names, shapes and semantics follow timm's `swin_transformer_v2.SwinTransformerV2`
(timm >= 0.9 layout: `layers.{i}.downsample` opens stages 2-4, `head.fc`), so a timm `state_dict()`
loads with strict=True and the outputs equal timm's. What V2 changes against V1 (`swin.py`):

- cosine attention: scores (q̂·k̂ᵀ)·exp(min(logit_scale, ln 100)) — the op's `logit_scale` argument;
- continuous position bias: `cpb_mlp` (Linear(2, 512) -> ReLU -> Linear(512, heads)) on a fixed
  log-spaced table of relative coordinates, then 16·sigmoid; this stays in PyTorch (a (2M-1)²×2
  input: tiny) and its ((2M-1)², heads) result is passed as the op's `rel_pos_bias_table`. The
  coordinate table is normalised by the block's window - 1, or by `pretrained_window_size` - 1
  when that is set (windows transferred from pre-training, e.g. 12 -> 16);
- qkv bias = [q_bias | 0 | v_bias] (keys have no bias; timm's non-persistent `k_bias` buffer);
  a padded token's qkv is that bias (timm pads the block input with zeros before the qkv linear);
- res-post-norm blocks: x + drop_path(norm1(attn(x))), then x + drop_path(norm2(mlp(x)));
  timm initialises these norms to zero (each block starts as the identity);
- patch merging: 2×2 neighbours -> 4C -> Linear(4C, 2C, no bias) -> LayerNorm(2C) (V1 normalises 4C
  first).

Windows follow timm exactly. Each block's window and shift are fixed when the model is built, from
its stage's map at `img_size` (the patch grid, halved with rounding up at every merge): per axis the
window is min(map, window) and the shift is 0 where the map is no larger than the window
(`always_partition=True` keeps the configured window and shift everywhere). At run time they do
not change; timm shifts the unpadded map first and then pads to a multiple of the window (the op's
`shift_first=True`). The op takes square windows, so a configuration where timm would use a
non-square window or shift (a non-square `img_size` whose maps straddle the window) is refused with
a clear error when the model is built.

Input size: as timm, `strict_img_size=True` (default) requires images of exactly `img_size`;
`strict_img_size=False` (or `dynamic_img_size=True`, timm's synonym) accepts any size, with the
windows and shifts fixed at build time (timm then builds the shift mask from the padded map each
forward, which the op does from indices). timm requires such sizes to be multiples of the patch size;
this model also zero-pads other sizes to the next multiple.

Training features as in timm: `drop_path_rate` (stochastic depth on both residual branches, linear
over all blocks of all stages; default 0.1 as timm), `set_grad_checkpointing()`, `forward_features`
(the normalised last-stage map, (B, H, W, C) as timm) and `forward_head(x, pre_logits=False)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import window_attention
from . import register_model
from ._common import build, init_linear
from ._layers import DropPath, GradCheckpointMixin, block_rates, drop_path_rates, split_rates
from .swin import ClassifierHead, PatchEmbed, PatchMergingStage, SwinClassifier, merge_2x2
from .vit import Mlp


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def block_window_shift(resolution, window_size, shift_size, always_partition: bool = False):
    """timm's `SwinTransformerV2Block._calc_window_shift`: per axis, the window is the map side when
    the map is no larger than the window (then no shift), else the window and the shift; with
    `always_partition` the configured window and shift. Returns ((Mh, Mw), (sh, sw))."""
    window, shift = _pair(window_size), _pair(shift_size)
    if always_partition:
        return window, shift
    res = _pair(resolution)
    window = tuple(r if r <= w else w for r, w in zip(res, window))
    shift = tuple(0 if r <= w else s for r, w, s in zip(res, window, shift))
    return window, shift


def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates, (1, 2M-1, 2M-1, 2) float32, as timm builds them:
    (dh, dw) / (M' - 1) · 8 with M' the pretrained window if set (else M; at least 1 for M = 1),
    then sign(t)·log2(|t| + 1) / log2(8)."""
    m = window_size
    ax = torch.arange(-(m - 1), m, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(ax, ax, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    norm = pretrained_window_size if pretrained_window_size > 0 else m
    table /= max(norm - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


class WindowAttentionV2(nn.Module):
    """Swin V2 window attention: cosine attention with a learned per-head logit scale and the
    continuous position bias, on one `window_attention(..., logit_scale=..., shift_first=True)` call."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, pretrained_window_size: int = 0
    ):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.register_buffer(
            "relative_coords_table", relative_coords_table(window_size, pretrained_window_size), persistent=False
        )

    def bias_table(self) -> torch.Tensor:
        """The ((2M-1)², heads) bias table: 16·sigmoid(cpb_mlp(coordinates)), row (dh+M-1)·(2M-1) + dw+M-1."""
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))

    def forward(self, x: torch.Tensor, hw, shift_size: int) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        out = window_attention(
            qkv,
            hw,
            self.num_heads,
            self.window_size,
            shift_size,
            self.bias_table(),
            bias,
            logit_scale=self.logit_scale,
            shift_first=True,
        )
        return self.proj(out)


class SwinV2Block(nn.Module):
    """Res-post-norm Swin V2 block on (B, H·W, C) tokens. `window_size` / `shift_size` are the block's
    (already resolved for its map, square) window and shift."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        pretrained_window_size: int = 0,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn = WindowAttentionV2(dim, num_heads, window_size, qkv_bias, pretrained_window_size)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x, hw):
        x = x + self.drop_path1(self.norm1(self.attn(x, hw, self.shift_size)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class PatchMergingV2(nn.Module):
    """2×2 neighbourhood -> 4C channels (`swin.merge_2x2`) -> Linear -> LN."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)

    def forward(self, x, hw):
        x, hw = merge_2x2(x, hw)
        return self.norm(self.reduction(x)), hw


class SwinV2Stage(PatchMergingStage):
    """[patch merging] + blocks; `resolution` is the stage's (H, W) map at img_size (after merging),
    from which every block's window and shift are fixed as timm fixes them."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        resolution,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path=0.0,
        pretrained_window_size: int = 0,
        always_partition: bool = False,
        stage_index: int = 0,
    ):
        super().__init__()
        self.grad_checkpointing = False
        dpr = block_rates(drop_path, depth)
        self.downsample = PatchMergingV2(dim, out_dim) if downsample else nn.Identity()
        blocks = []
        for i in range(depth):
            target_shift = 0 if i % 2 == 0 else window_size // 2
            (mh, mw), (sh, sw) = block_window_shift(resolution, window_size, target_shift, always_partition)
            if mh != mw or sh != sw:
                raise ValueError(
                    f"SwinTransformerV2: stage {stage_index} block {i} on a {resolution[0]}x{resolution[1]} map "
                    f"(at img_size) would use timm's window ({mh}, {mw}) and shift ({sh}, {sw}) (timm clamps "
                    f"each side of the window to a map side no larger than it, unshifted); "
                    f"vitkernels.window_attention takes a square window and one shift: choose an img_size whose "
                    f"stage maps are square or larger than the window on both sides (or always_partition=True)"
                )
            blocks.append(SwinV2Block(out_dim, num_heads, mh, sh, mlp_ratio, qkv_bias, dpr[i], pretrained_window_size))
        self.blocks = nn.ModuleList(blocks)


class SwinTransformerV2(SwinClassifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        img_size=256,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        pretrained_window_sizes=(0, 0, 0, 0),
        always_partition: bool = False,
        strict_img_size: bool = True,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.img_size = _pair(img_size)
        self.strict_img_size = bool(strict_img_size) and not dynamic_img_size
        self.num_classes = num_classes
        n = len(depths)
        windows = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size] * n
        if len(windows) != n or any(not isinstance(w, int) or w < 1 for w in windows):
            raise ValueError(
                f"SwinTransformerV2: window_size must be a positive int or one int per stage "
                f"({n} stages), got {window_size!r} (square windows only)"
            )
        pretrained = list(pretrained_window_sizes)
        if len(pretrained) < n:
            raise ValueError(
                f"SwinTransformerV2: pretrained_window_sizes needs one entry per stage ({n}), "
                f"got {pretrained_window_sizes!r}"
            )
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dims = [embed_dim * 2**i for i in range(n)]
        # each stage's map at img_size: the patch grid, halved with rounding up at every merge
        res = [tuple(s // patch_size for s in self.img_size)]
        for _ in depths[1:]:
            res.append(tuple((r + 1) // 2 for r in res[-1]))
        dpr = split_rates(drop_path_rates(drop_path_rate, sum(depths)), depths)
        self.layers = nn.Sequential(
            *[
                SwinV2Stage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    windows[i],
                    downsample=i > 0,
                    resolution=res[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    pretrained_window_size=int(pretrained[i]),
                    always_partition=always_partition,
                    stage_index=i,
                )
                for i in range(n)
            ]
        )
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head = ClassifierHead(self.num_features, num_classes)
        self.apply(init_linear)  # timm: every Linear (cpb_mlp included) trunc_normal(0.02), zero bias
        for stage in self.layers:  # res-post-norm: each block starts as the identity (timm's _init_respostnorm)
            for block in stage.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm excludes from weight decay (the cpb MLPs and the logit scales)."""
        return {n for n, _ in self.named_parameters() if "cpb_mlp" in n or "logit_scale" in n}

    def forward_features(self, x):
        """Images (B, 3, H, W) -> the normalised last-stage map (B, H/32, W/32, C), NHWC as timm."""
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"SwinTransformerV2: input {tuple(x.shape[-2:])} does not match img_size "
                f"{self.img_size} (as timm, strict_img_size=True); build the model with "
                f"strict_img_size=False (timm: dynamic_img_size=True) to run other sizes"
            )
        return super().forward_features(x)


def _swinv2(defaults: dict, kwargs: dict) -> SwinTransformerV2:
    return build(SwinTransformerV2, defaults, kwargs)


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@register_model
def swinv2_tiny_window8_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=8, **_TINY), kwargs)


@register_model
def swinv2_small_window8_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=8, **_SMALL), kwargs)


@register_model
def swinv2_base_window8_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=8, **_BASE), kwargs)


@register_model
def swinv2_tiny_window16_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=16, **_TINY), kwargs)


@register_model
def swinv2_small_window16_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=16, **_SMALL), kwargs)


@register_model
def swinv2_base_window16_256(**kwargs) -> SwinTransformerV2:
    return _swinv2(dict(img_size=256, window_size=16, **_BASE), kwargs)
