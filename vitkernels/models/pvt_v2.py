"""PVTv2 (Wang et al. 2021) on `vitkernels.sr_attention` and `vitkernels.mix_ffn`.

Parameter names and shapes follow timm's PyramidVisionTransformerV2 (`patch_embed`,
`stages.{i}.downsample` for stages 2-4, `stages.{i}.blocks.{j}.attn.{q,kv,sr,norm,proj}`,
`mlp.{fc1,dwconv,fc2}`, `stages.{i}.norm`, `head`), so a timm `state_dict()` loads with strict=True.

Details that matter for parity (SPEC.md "Models"): block and stage-end LayerNorms eps 1e-6, the
spatial-reduction norm and the overlapping patch-embed norms eps 1e-5, exact-erf GELU; linear SRA
(`pvt_v2_b2_li`) = AdaptiveAvgPool(7) -> 1×1 conv -> LN -> GELU and a ReLU after fc1 in Mix-FFN.
timm's kv linear is reshaped `(B, M, 2, heads, D)`: [k | v], head-major — exactly the packed
(B, M, 2C) layout `sr_attention` takes, so the weights are used as they are.

Tokens stay in (B, H·W, C) layout inside a stage and (H, W) is passed along; the overlapping patch
embeddings (7×7 stride 4, then 3×3 stride 2, zero padding k//2) take any input size. The
spatial-reduction conv (kernel = stride = sr_ratio) needs every stage map to be at least sr_ratio
on each side, as in timm (>= 32 px inputs for the default ratios 8, 4, 2, 1).

Training features as in timm: `drop_path_rate` (stochastic depth on both residual branches, rising
linearly over all blocks of all stages; default 0 as timm), `set_grad_checkpointing()`,
`forward_features` (the last stage's (B, C, H/32, W/32) map) and `forward_head(x, pre_logits=False)`
(global average pool -> head).

The encoder is reused by SegFormer's MiT (`segformer.py`) through `forward_stages`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import mix_ffn, sr_attention
from . import register_model
from ._common import Classifier, build, init_linear, linear_head
from ._layers import DropPath, GradCheckpointMixin, block_rates, drop_path_rates, split_rates


def tokens_to_map(x: torch.Tensor, hw) -> torch.Tensor:
    """(B, H·W, C) tokens -> (B, C, H, W) map."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])


class OverlapPatchEmbed(nn.Module):
    """Conv k×k, stride s, padding k//2 -> tokens -> LayerNorm (eps 1e-5)."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class Attention(nn.Module):
    """q linear on the full map; kv linear on the spatially reduced map; `sr_attention` between them."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear_attn: bool = False, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PVTv2 Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.linear_attn = linear_attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if linear_attn:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
            self.norm = nn.LayerNorm(dim, eps=1e-5)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.pool = None
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)
            self.act = None
        else:
            self.pool = self.sr = self.norm = self.act = None

    def reduce(self, x, hw):
        """The tokens keys and values are computed from: (B, M, C)."""
        if self.sr is None:
            return x
        y = tokens_to_map(x, hw)
        if self.linear_attn:
            y = self.pool(y)
        elif min(hw) < self.sr_ratio:
            raise ValueError(
                f"PVTv2 Attention: a {hw[0]}x{hw[1]} map is smaller than sr_ratio {self.sr_ratio}; use a larger input"
            )
        y = self.norm(self.sr(y).flatten(2).transpose(1, 2))
        return self.act(y) if self.act is not None else y

    def forward(self, x, hw):
        out = sr_attention(self.q(x), self.kv(self.reduce(x, hw)), self.num_heads)
        return self.proj(out)


class MlpWithDepthwiseConv(nn.Module):
    """Mix-FFN: fc1 -> [ReLU if linear] -> dwconv3×3 -> GELU -> fc2, one `mix_ffn` call."""

    def __init__(self, dim: int, hidden: int, extra_relu: bool = False):
        super().__init__()
        self.extra_relu = extra_relu
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, hw):
        return mix_ffn(
            x,
            hw,
            self.fc1.weight,
            self.fc1.bias,
            self.dwconv.weight,
            self.dwconv.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.extra_relu,
        )


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear_attn: bool = False,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
        drop_path_style: str = "timm",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, sr_ratio, linear_attn, qkv_bias)
        self.drop_path1 = DropPath(drop_path, drop_path_style)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), extra_relu=linear_attn)
        self.drop_path2 = DropPath(drop_path, drop_path_style)

    def forward(self, x, hw):
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        return x + self.drop_path2(self.mlp(self.norm2(x), hw))


class PyramidVisionTransformerStage(GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        downsample: bool,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        linear_attn: bool = False,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path=0.0,
        drop_path_style: str = "timm",
    ):
        super().__init__()
        self.grad_checkpointing = False
        dpr = block_rates(drop_path, depth)
        self.downsample = OverlapPatchEmbed(3, 2, dim, dim_out) if downsample else None
        self.blocks = nn.ModuleList(
            [
                Block(dim_out, num_heads, mlp_ratio, sr_ratio, linear_attn, qkv_bias, norm_eps, dpr[i], drop_path_style)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim_out, eps=norm_eps)

    def forward(self, x, hw):
        """x: tokens (B, H·W, C) of the previous stage (or the patch embedding when there is no downsample)."""
        if self.downsample is not None:
            x, hw = self.downsample(tokens_to_map(x, hw))
        for block in self.blocks:
            x = self.run_block(block, x, hw)
        return self.norm(x), hw


class PyramidVisionTransformerV2(Classifier, GradCheckpointMixin, nn.Module):
    """`drop_path_style` "timm" (default) or "hf": how the stochastic-depth masks are drawn (see
    `_layers.DropPath`); SegFormer uses "hf" to draw as transformers' SegFormer does."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths=(3, 4, 6, 3),
        embed_dims=(64, 128, 256, 512),
        num_heads=(1, 2, 4, 8),
        sr_ratios=(8, 4, 2, 1),
        mlp_ratios=(8.0, 8.0, 4.0, 4.0),
        qkv_bias: bool = True,
        linear: bool = False,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        drop_path_style: str = "timm",
    ):
        super().__init__()
        self.grad_checkpointing = False
        n = len(depths)
        if not all(len(t) == n for t in (embed_dims, num_heads, sr_ratios, mlp_ratios)):
            raise ValueError(
                "PyramidVisionTransformerV2: depths, embed_dims, num_heads, sr_ratios and mlp_ratios "
                "must have one entry per stage"
            )
        self.num_classes = num_classes
        self.embed_dims = tuple(embed_dims)
        self.patch_embed = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0])
        dpr = split_rates(drop_path_rates(drop_path_rate, sum(depths)), depths)
        self.stages = nn.Sequential(
            *[
                PyramidVisionTransformerStage(
                    embed_dims[max(i - 1, 0)],
                    embed_dims[i],
                    depths[i],
                    i > 0,
                    num_heads[i],
                    sr_ratios[i],
                    mlp_ratios[i],
                    linear,
                    qkv_bias,
                    norm_eps,
                    dpr[i],
                    drop_path_style,
                )
                for i in range(n)
            ]
        )
        self.num_features = embed_dims[-1]
        self.head = linear_head(self.num_features, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        init_linear(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_stages(self, x):
        """Every stage's normalised output as ((B, H·W, C) tokens, (H, W)), stride 4, 8, 16, 32."""
        x, hw = self.patch_embed(x)
        outs = []
        for stage in self.stages:
            x, hw = stage(x, hw)
            outs.append((x, hw))
        return outs

    def forward_features(self, x):
        """Last stage's map (B, C, H/32, W/32), as timm."""
        x, hw = self.forward_stages(x)[-1]
        return tokens_to_map(x, hw)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(-1, -2))
        return x if pre_logits else self.head(x)


def _pvt(defaults: dict, kwargs: dict) -> PyramidVisionTransformerV2:
    return build(PyramidVisionTransformerV2, defaults, kwargs)


_B1_5 = {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8)}


@register_model
def pvt_v2_b0(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt({"depths": (2, 2, 2, 2), "embed_dims": (32, 64, 160, 256), "num_heads": (1, 2, 5, 8)}, kwargs)


@register_model
def pvt_v2_b1(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(2, 2, 2, 2), **_B1_5), kwargs)


@register_model
def pvt_v2_b2(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(3, 4, 6, 3), **_B1_5), kwargs)


@register_model
def pvt_v2_b3(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(3, 4, 18, 3), **_B1_5), kwargs)


@register_model
def pvt_v2_b4(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(3, 8, 27, 3), **_B1_5), kwargs)


@register_model
def pvt_v2_b5(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(3, 6, 40, 3), mlp_ratios=(4.0, 4.0, 4.0, 4.0), **_B1_5), kwargs)


@register_model
def pvt_v2_b2_li(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt(dict(depths=(3, 4, 6, 3), linear=True, **_B1_5), kwargs)
