"""XCiT (El-Nouby et al. 2021) on `vitkernels.xca` and `vitkernels.dwconv`.

Parameter names and shapes follow timm's Xcit (`patch_embed.proj.{0,2,4,6}.{0,1}` conv3×3/2 + BN
stages with GELU between, `pos_embed.token_projection`, `cls_token`, `blocks.{i}.{norm1,attn,norm3,
local_mp,norm2,mlp,gamma1,gamma3,gamma2}`, `cls_attn_blocks.{j}.{norm1,attn.{q,k,v,proj},norm2,mlp,
gamma1,gamma2}`, `norm`, `head`), so a timm `state_dict()` loads with strict=True.

Details that matter for parity (SPEC.md "Models"): LayerNorm eps 1e-6, exact-erf GELU, block order
XCA (gamma1) -> LPI (gamma3) -> MLP (gamma2). timm reshapes the qkv linear as (B, N, 3, heads, D):
channel s·C + h·D + d, exactly the packed layout `xca` takes, and its output channel h·D + d is the
op's. LPI = depthwise 3×3 conv -> GELU -> BatchNorm -> depthwise 3×3 conv: both convs run as
`dwconv` on token layout (the first with the GELU fused); in eval mode the BatchNorm is applied as a
per-channel affine on the tokens, in training mode by `nn.BatchNorm2d` on a (B, C, N, 1) view.
The Fourier positional encoding has parameters (its 1×1 `token_projection` conv); its features are
computed in float32 (float64 for float64 models) from the patch grid, so any input size runs.
The class-attention blocks follow timm's `ClassAttentionBlock` with `tokens_norm=True` (both named
models), including its residual on the patch tokens (x + norm2(x) for them). Dropout is not implemented.

Training features as in timm: `drop_path_rate` (stochastic depth, the same rate on the three residual
branches of every XCA block — timm's XCiT does not ramp it over depth — and none in the
class-attention blocks; default 0), `set_grad_checkpointing()` (XCA and class-attention blocks; as in
timm, a checkpointed block's BatchNorm updates its running statistics again when it is recomputed),
`forward_features` (normalised tokens, class token first) and `forward_head(x, pre_logits=False)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import attention, dwconv, xca
from . import register_model
from ._common import ClassTokenClassifier, build, init_linear, linear_head
from ._layers import DropPath, GradCheckpointMixin
from .vit import Mlp


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    """3×3 stride-2 conv (no bias) + BatchNorm, named `0` and `1` as in timm's conv3x3."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout))


class ConvPatchEmbed(nn.Module):
    """Four (patch 16) or three (patch 8) conv3×3/2 + BN stages with GELU between -> (B, N, C) tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size == 16:
            dims = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        elif patch_size == 8:
            dims = [in_chans, embed_dim // 4, embed_dim // 2, embed_dim]
        else:
            raise ValueError(f"XCiT ConvPatchEmbed: patch_size must be 8 or 16, got {patch_size}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            if i:
                layers.append(nn.GELU())
            layers.append(conv_bn(dims[i], dims[i + 1]))
        self.proj = nn.Sequential(*layers)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine features of the normalised (row, column) position, projected by a 1×1 conv.

    Returns (H·W, C) to be broadcast over the batch."""

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.token_projection = nn.Conv2d(2 * hidden_dim, dim, kernel_size=1)

    def features(self, h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(H·W, 2·hidden) features: [sin/cos of the row | sin/cos of the column], interleaved per pair."""
        eps, scale = 1e-6, 2 * math.pi
        rows = torch.arange(1, h + 1, dtype=dtype, device=device)
        cols = torch.arange(1, w + 1, dtype=dtype, device=device)
        rows = rows / (h + eps) * scale
        cols = cols / (w + eps) * scale
        i = torch.arange(self.hidden_dim, dtype=dtype, device=device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.hidden_dim)

        def embed(p):  # (L,) -> (L, hidden): sin on even indices, cos on odd, in pairs
            a = p[:, None] / freq
            return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=-1).flatten(1)

        fy = embed(rows)[:, None, :].expand(h, w, self.hidden_dim)
        fx = embed(cols)[None, :, :].expand(h, w, self.hidden_dim)
        return torch.cat([fy, fx], dim=-1).reshape(h * w, 2 * self.hidden_dim)

    def forward(self, hw) -> torch.Tensor:
        weight = self.token_projection.weight
        ftype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        f = self.features(int(hw[0]), int(hw[1]), ftype, weight.device).to(weight.dtype)
        return nn.functional.linear(f, weight.flatten(1), self.token_projection.bias)


class XCA(nn.Module):
    """qkv linear -> `xca` on the packed (B, N, 3C) projection with the learned per-head temperature -> proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"XCiT XCA: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(xca(self.qkv(x), self.num_heads, self.temperature))


class LPI(nn.Module):
    """Local patch interaction on token layout: dwconv3×3 + GELU (fused) -> BatchNorm -> dwconv3×3."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()  # fused into conv1's dwconv; kept for timm's module layout (no parameters)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def batch_norm(self, x):
        bn = self.bn
        if self.training or bn.running_mean is None:  # batch statistics (and running-stat updates)
            return bn(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return torch.addcmul(shift, x, scale)

    def forward(self, x, hw):
        x = dwconv(x, hw, self.conv1.weight, self.conv1.bias, activation="gelu")
        x = self.batch_norm(x).contiguous()
        return dwconv(x, hw, self.conv2.weight, self.conv2.bias)


class XCABlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eta: float = 1.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = XCA(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.local_mp = LPI(dim)
        self.drop_path3 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x, hw):
        x = x + self.drop_path1(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path3(self.gamma3 * self.local_mp(self.norm3(x), hw))
        return x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x)))


class ClassAttn(nn.Module):
    """Class attention (CaiT): the class token's query against every token's key and value."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x[:, :1]).reshape(b, 1, h, c // h).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, c // h).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, c // h).transpose(1, 2)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, 1, c))  # (B, 1, C)


class ClassAttentionBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eta: float = 1.0,
        tokens_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm
        # timm builds class-attention blocks without stochastic depth: rate 0, kept for its module layout
        self.drop_path1 = DropPath(0.0)
        self.drop_path2 = DropPath(0.0)

    def forward(self, x):
        y = self.norm1(x)
        # timm adds gamma1 * [attn(cls) | norm1(patches)]: the patch tokens get their own norm added too
        x = x + self.gamma1 * torch.cat([self.attn(y), y[:, 1:]], dim=1)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls = x[:, :1] + self.gamma2 * self.mlp(x[:, :1])
        return torch.cat([cls, 2 * x[:, 1:]], dim=1)  # timm: x_res + [gamma2·mlp(cls) | patches]


class Xcit(ClassTokenClassifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        cls_attn_layers: int = 2,
        eta: float = 1.0,
        tokens_norm: bool = True,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.grad_checkpointing = False
        # img_size is accepted for timm-style calls; the model runs on any input size (multiples of the patch size)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = PositionalEncodingFourier(embed_dim)
        self.blocks = nn.ModuleList(
            [XCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, eta, drop_path_rate) for _ in range(depth)]
        )
        self.cls_attn_blocks = nn.ModuleList(
            [
                ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, eta, tokens_norm)
                for _ in range(cls_attn_layers)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = linear_head(embed_dim, num_classes)
        self.apply(init_linear)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x):
        x, hw = self.patch_embed(x)
        x = x + self.pos_embed(hw)
        for blk in self.blocks:
            x = self.run_block(blk, x, hw)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = self.run_block(blk, x)
        return self.norm(x)


def _xcit(embed_dim: int, depth: int, num_heads: int, kwargs: dict) -> Xcit:
    size = {"patch_size": 16, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    return build(Xcit, {**size, "eta": 1.0, "tokens_norm": True}, kwargs)


@register_model
def xcit_tiny_12_p16_224(**kwargs) -> Xcit:
    return _xcit(192, 12, 4, kwargs)


@register_model
def xcit_small_12_p16_224(**kwargs) -> Xcit:
    return _xcit(384, 12, 8, kwargs)
