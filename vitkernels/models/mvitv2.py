"""MViTv2 (Li et al. 2022) on `vitkernels.pool_attention`.

Parameter names and shapes follow timm's MultiScaleVit (`patch_embed.proj`, `stages.{i}.blocks.{j}.{norm1,
shortcut_proj_attn, attn.{qkv, pool_q/k/v, norm_q/k/v, rel_pos_h, rel_pos_w, proj}, norm2, mlp.{fc1, fc2},
shortcut_proj_mlp}`, `norm`, `head.fc`; `cls_token`, `pos_embed` where configured), so a timm `state_dict()` loads
with strict=True. Tokens stay (B, [1 +] H·W, C) and (H, W) is passed along, read off the pooled maps.

Pooling attention: qkv linear -> per head, q, k and v pooled on the (H, W) map (depthwise 3×3 conv shared by the
heads, q strided 2 in a stage's first block, k/v by the adaptive strides 4, 2, 1, 1) and layer-normed (eps 1e-6),
all in PyTorch; then one `pool_attention` call: softmax(scale·q·kᵀ + decomposed relative-position terms)·v + q
(residual pooling), returned in token layout (B, Nq, heads·D) -> proj. The block's shortcut is max-pooled (kernel
stride + 1) where q is strided and projected where the width grows (after norm1, or after norm2 without expand_attn).

Sizes as timm: each block's (2·max(q, k) − 1, D) tables are sized at construction from `img_size` (an (H, W) size
uses the longer side; timm takes square sizes only); an input runs when its maps fit those tables (timm: multiples
of 32 px, or smaller; timm and the op raise otherwise). Modes "conv" (all timm models), "max" and "avg".

Training features as in timm: `drop_path_rate` (stochastic depth on both residual branches, rising linearly over all
blocks; default 0), `set_grad_checkpointing()`, `forward_features` (the normalised tokens, class token first when
there is one) and `forward_head(x, pre_logits=False)` (mean of the spatial tokens, or the class token, -> head.fc).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from ..ops import pool_attention
from . import register_model
from ._common import Classifier, build, init_linear, linear_head
from ._layers import DropPath, GradCheckpointMixin, block_rates, drop_path_rates, split_rates


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _adaptive_kv_strides(stride_q, stride_kv_adaptive) -> tuple:
    """timm's k/v pooling strides: start at `stride_kv_adaptive`, divided by q's stride at every stage that
    strides q (4, 2, 1, 1 for the default (4, 4) and q strides 1, 2, 2, 2)."""
    cur, out = list(stride_kv_adaptive), []
    for s in stride_q:
        if min(s) > 1:
            cur = [max(c // sd, 1) for c, sd in zip(cur, s)]
        out.append(tuple(cur))
    return tuple(out)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, kernel, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def pool_heads(x: torch.Tensor, hw, pool, norm, has_cls_token: bool):
    """Head views (B, heads, [1 +] H·W, D) -> pooled (B, heads, [1 +] h·w, D) and (h, w): each head's map
    through `pool` (the class token passes by), then `norm` over D."""
    if pool is not None:
        b, heads, _, d = x.shape
        cls_tok = x[:, :, :1] if has_cls_token else None
        spatial = x[:, :, 1:] if has_cls_token else x
        m = pool(spatial.reshape(b * heads, hw[0], hw[1], d).permute(0, 3, 1, 2).contiguous())
        hw = (m.shape[-2], m.shape[-1])
        x = m.reshape(b, heads, d, hw[0] * hw[1]).transpose(2, 3)
        if cls_tok is not None:
            x = torch.cat((cls_tok, x), dim=2)
    if norm is not None:
        x = norm(x)
    return x, hw


class MultiScaleAttention(nn.Module):
    """qkv linear -> pool and norm q, k, v (PyTorch) -> `pool_attention` -> proj. Returns (tokens, q's (h, w))."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        feat_size,
        num_heads: int,
        qkv_bias: bool = True,
        mode: str = "conv",
        kernel_q=(3, 3),
        kernel_kv=(3, 3),
        stride_q=(1, 1),
        stride_kv=(1, 1),
        has_cls_token: bool = False,
        rel_pos_type: str = "spatial",
        residual_pooling: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"MViTv2 attention: dim_out {dim_out} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // num_heads
        self.scale = self.head_dim**-0.5
        self.has_cls_token = has_cls_token
        self.residual_pooling = residual_pooling
        self.mode = mode
        self.qkv = nn.Linear(dim, dim_out * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        # as timm: a 1×1 kernel with stride 1 means no pooling at all
        if math.prod(kernel_q) == 1 and math.prod(stride_q) == 1:
            kernel_q = None
        if math.prod(kernel_kv) == 1 and math.prod(stride_kv) == 1:
            kernel_kv = None
        self.pool_q = self.pool_k = self.pool_v = None
        self.norm_q = self.norm_k = self.norm_v = None
        if mode in ("avg", "max"):
            pool = nn.MaxPool2d if mode == "max" else nn.AvgPool2d
            if kernel_q:
                self.pool_q = pool(kernel_q, stride_q, [k // 2 for k in kernel_q])
            if kernel_kv:
                self.pool_k = pool(kernel_kv, stride_kv, [k // 2 for k in kernel_kv])
                self.pool_v = pool(kernel_kv, stride_kv, [k // 2 for k in kernel_kv])
        elif mode == "conv":
            d = self.head_dim  # one depthwise conv shared by the heads

            def conv(kernel, stride):
                return nn.Conv2d(d, d, kernel, stride=stride, padding=[k // 2 for k in kernel], groups=d, bias=False)

            if kernel_q:
                self.pool_q = conv(kernel_q, stride_q)
                self.norm_q = nn.LayerNorm(d, eps=norm_eps)
            if kernel_kv:
                self.pool_k = conv(kernel_kv, stride_kv)
                self.norm_k = nn.LayerNorm(d, eps=norm_eps)
                self.pool_v = conv(kernel_kv, stride_kv)
                self.norm_v = nn.LayerNorm(d, eps=norm_eps)
        else:
            raise ValueError(
                f"MViTv2 attention: mode {mode!r} is not supported (use 'conv', 'max' or 'avg'; timm's "
                "'conv_unshared' forward does not run with more than one head)"
            )
        if rel_pos_type == "spatial":
            # timm's size: 2·max(q, k) − 1 of the map at img_size (the longer side of an (H, W) map)
            q_side = max(s // st for s, st in zip(feat_size, stride_q))
            kv_side = max(s // st for s, st in zip(feat_size, stride_kv))
            length = 2 * max(q_side, kv_side) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(length, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(length, self.head_dim))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02, a=-0.04, b=0.04)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02, a=-0.04, b=0.04)
        elif rel_pos_type in ("", "none", None):
            self.rel_pos_h = self.rel_pos_w = None
        else:
            raise ValueError(f"MViTv2 attention: rel_pos_type {rel_pos_type!r} (use 'spatial' or 'none')")

    def forward(self, x, hw):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_hw = pool_heads(q, hw, self.pool_q, self.norm_q, self.has_cls_token)
        k, k_hw = pool_heads(k, hw, self.pool_k, self.norm_k, self.has_cls_token)
        v, _ = pool_heads(v, hw, self.pool_v, self.norm_v, self.has_cls_token)
        out = pool_attention(
            q, k, v, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w, self.has_cls_token, self.residual_pooling, self.scale
        )
        return self.proj(out), q_hw


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        feat_size,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        kernel_q=(3, 3),
        kernel_kv=(3, 3),
        stride_q=(1, 1),
        stride_kv=(1, 1),
        mode: str = "conv",
        has_cls_token: bool = False,
        expand_attn: bool = True,
        rel_pos_type: str = "spatial",
        residual_pooling: bool = True,
    ):
        super().__init__()
        widen = dim != dim_out
        self.has_cls_token = has_cls_token
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.shortcut_proj_attn = nn.Linear(dim, dim_out) if widen and expand_attn else None
        if math.prod(stride_q) > 1:
            kernel = [s + 1 if s > 1 else s for s in stride_q]
            self.shortcut_pool_attn = nn.MaxPool2d(kernel, list(stride_q), [k // 2 for k in kernel])
        else:
            self.shortcut_pool_attn = None
        att_dim = dim_out if expand_attn else dim
        self.attn = MultiScaleAttention(
            dim,
            att_dim,
            feat_size,
            num_heads,
            qkv_bias,
            mode,
            kernel_q,
            kernel_kv,
            stride_q,
            stride_kv,
            has_cls_token,
            rel_pos_type,
            residual_pooling,
            norm_eps,
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(att_dim, eps=norm_eps)
        self.shortcut_proj_mlp = nn.Linear(dim, dim_out) if widen and not expand_attn else None
        self.mlp = Mlp(att_dim, int(att_dim * mlp_ratio), dim_out)
        self.drop_path2 = DropPath(drop_path)

    def _shortcut_pool(self, x, hw):
        if self.shortcut_pool_attn is None:
            return x
        cls_tok = x[:, :1] if self.has_cls_token else None
        spatial = x[:, 1:] if self.has_cls_token else x
        b, _, c = spatial.shape
        m = self.shortcut_pool_attn(spatial.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2))
        x = m.flatten(2).transpose(1, 2)
        return x if cls_tok is None else torch.cat((cls_tok, x), dim=1)

    def forward(self, x, hw):
        x_norm = self.norm1(x)
        # as timm (and the original): the shortcut is the un-normalised input unless it is projected
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        y, hw_out = self.attn(x_norm, hw)
        x = self._shortcut_pool(shortcut, hw) + self.drop_path1(y)
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm)), hw_out


class MultiScaleVitStage(GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        num_heads: int,
        feat_size,
        stride_q,
        stride_kv,
        drop_path=0.0,
        expand_attn: bool = True,
        **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        dpr = block_rates(drop_path, depth)
        out_dims = (dim_out,) * depth if expand_attn else (dim,) * (depth - 1) + (dim_out,)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                MultiScaleBlock(
                    dim,
                    out_dims[i],
                    num_heads,
                    feat_size,
                    drop_path=dpr[i],
                    stride_q=stride_q if i == 0 else (1, 1),
                    stride_kv=stride_kv,
                    expand_attn=expand_attn,
                    **block_kwargs,
                )
            )
            dim = out_dims[i]
            if i == 0:
                feat_size = tuple(s // st for s, st in zip(feat_size, stride_q))
        self.feat_size = feat_size

    def forward(self, x, hw):
        for block in self.blocks:
            x, hw = self.run_block(block, x, hw)
        return x, hw


class MultiScaleVit(Classifier, GradCheckpointMixin, nn.Module):
    """timm's MultiScaleVitCfg fields are keyword arguments (`depths`, `embed_dim`, `num_heads`, `expand_attn`,
    `use_cls_token`, `mode`, `stride_q`, ...), next to `img_size`, `num_classes`, `global_pool` ("avg" or
    "token"; default "token" with a class token, else "avg"), `drop_path_rate` and `drop_rate` (head dropout)."""

    def __init__(
        self,
        depths=(2, 3, 16, 3),
        embed_dim=96,
        num_heads=1,
        mlp_ratio: float = 4.0,
        pool_first: bool = False,
        expand_attn: bool = True,
        qkv_bias: bool = True,
        use_cls_token: bool = False,
        use_abs_pos: bool = False,
        residual_pooling: bool = True,
        mode: str = "conv",
        kernel_qkv=(3, 3),
        stride_q=((1, 1), (2, 2), (2, 2), (2, 2)),
        stride_kv=None,
        stride_kv_adaptive=(4, 4),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        rel_pos_type: str = "spatial",
        norm_eps: float = 1e-6,
        img_size=224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if pool_first:
            raise ValueError(
                "MultiScaleVit: pool_first=True is not supported (timm's MultiScaleAttentionPoolFirst forward "
                "does not run: its key is not transposed)"
            )
        n = len(depths)
        embed_dims = (
            tuple(embed_dim) if isinstance(embed_dim, (tuple, list)) else tuple(embed_dim * 2**i for i in range(n))
        )
        heads = tuple(num_heads) if isinstance(num_heads, (tuple, list)) else tuple(num_heads * 2**i for i in range(n))
        stride_q = tuple(tuple(s) for s in stride_q)
        if stride_kv is None:
            stride_kv = _adaptive_kv_strides(stride_q, stride_kv_adaptive)
        if not all(len(t) == n for t in (embed_dims, heads, stride_q, stride_kv)):
            raise ValueError("MultiScaleVit: embed_dim, num_heads, stride_q and stride_kv need one entry per stage")
        if global_pool is None:
            global_pool = "token" if use_cls_token else "avg"
        if global_pool not in ("", "avg", "token") or (global_pool == "token" and not use_cls_token):
            raise ValueError(f"MultiScaleVit: global_pool {global_pool!r} (use 'avg', or 'token' with a class token)")
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.num_prefix_tokens = int(use_cls_token)
        img_size = _pair(img_size)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_kernel, patch_stride, patch_padding)
        feat_size = (img_size[0] // patch_stride[0], img_size[1] // patch_stride[1])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[0])) if use_cls_token else None
        n_pos = feat_size[0] * feat_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dims[0])) if use_abs_pos else None
        dpr = split_rates(drop_path_rates(drop_path_rate, sum(depths)), depths)
        self.stages = nn.ModuleList()
        dim = embed_dims[0]
        for i in range(n):
            dim_out = embed_dims[i] if expand_attn else embed_dims[min(i + 1, n - 1)]
            stage = MultiScaleVitStage(
                dim,
                dim_out,
                depths[i],
                heads[i],
                feat_size,
                stride_q[i],
                stride_kv[i],
                drop_path=dpr[i],
                expand_attn=expand_attn,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                kernel_q=_pair(kernel_qkv),
                kernel_kv=_pair(kernel_qkv),
                mode=mode,
                has_cls_token=use_cls_token,
                rel_pos_type=rel_pos_type,
                residual_pooling=residual_pooling,
            )
            dim, feat_size = dim_out, stage.feat_size
            self.stages.append(stage)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Sequential(
            OrderedDict(
                [
                    ("drop", nn.Dropout(drop_rate)),
                    ("fc", linear_head(dim, num_classes)),
                ]
            )
        )
        for p in (self.pos_embed, self.cls_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        self.apply(init_linear)

    def forward_features(self, x):
        """Images (B, 3, H, W) -> normalised tokens (B, [1 +] H/32·W/32, C), as timm."""
        x, hw = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for stage in self.stages:
            x, hw = stage(x, hw)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)


def _mvit(defaults: dict, kwargs: dict) -> MultiScaleVit:
    return build(MultiScaleVit, defaults, kwargs)


@register_model
def mvitv2_tiny(**kwargs) -> MultiScaleVit:
    return _mvit(dict(depths=(1, 2, 5, 2)), kwargs)


@register_model
def mvitv2_small(**kwargs) -> MultiScaleVit:
    return _mvit(dict(depths=(1, 2, 11, 2)), kwargs)


@register_model
def mvitv2_base(**kwargs) -> MultiScaleVit:
    return _mvit(dict(depths=(2, 3, 16, 3)), kwargs)


@register_model
def mvitv2_small_cls(**kwargs) -> MultiScaleVit:
    return _mvit(dict(depths=(1, 2, 11, 2), use_cls_token=True), kwargs)


@register_model
def mvitv2_base_cls(**kwargs) -> MultiScaleVit:
    # timm's default head is that of its only checkpoint (ImageNet-21k winter 2021: 19168 classes)
    return _mvit(dict(depths=(2, 3, 16, 3), use_cls_token=True, num_classes=19168), kwargs)
