"""ViViT (Arnab et al. 2021): model 1 (unfactorised joint space-time attention, on `vitkernels.self_attention`)
and model 3 (factorised self-attention, on `vitkernels.space_time_attention`).

Model 1, `vivit_b_16x2_kinetics400` (class `ViViT`): the architecture of the public Hugging Face checkpoint
google/vivit-b-16x2-kinetics400 (transformers `VivitForVideoClassification`, `VivitConfig` defaults).
Tubelet embedding (Conv3d over 2 frames × 16 × 16 pixels; 32 frames at 224 px give 16·196 tokens,
frame-major: index t·S + s), a class token in front, learned position embeddings for all 1 + 16·196
tokens, then ViT blocks whose attention is one `self_attention` over every token of the clip:
    x = x + proj(self_attention(qkv(norm1(x))));  x = x + fc2(gelu_fast(fc1(norm2(x))))
LayerNorm eps 1e-6 (`layer_norm_eps`, as VivitConfig), qkv bias, MLP activation transformers'
"gelu_fast" (`FastGELU`: 0.5·x·(1 + tanh(0.7978845608·x·(1 + 0.044715·x²))), the tanh approximation
with transformers' constants; `hidden_act` selects "gelu" (exact erf) or "gelu_pytorch_tanh" instead),
the final LayerNorm, and the head on the class token. Parameter names (timm-like): `cls_token`,
`pos_embed`, `patch_embed.proj` (Conv3d), `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}`, `norm`, `head`. `convert_hf_vivit(state_dict)` maps transformers' names (both the
checkpoint / transformers 4.x layout and the transformers 5.x `state_dict()` layout) to these,
concatenating the separate query/key/value linears into `attn.qkv` ([W_q; W_k; W_v], the packed
layout of `self_attention`). Another clip size resamples the patch part of `pos_embed` (see
`ViViT._pos_embed`); transformers supports only its configured clip size there (its
`interpolate_pos_encoding` resizes a square grid, which holds a single frame's table only).
Training features: `drop_path_rate` (transformers' ViViT has none: default 0; timm-style per-clip
stochastic depth on both residual branches, rates rising linearly over the blocks),
`set_grad_checkpointing()`, `forward_features` (normalised tokens (B, 1 + T'·S, C), class token
first) and `forward_head(x, pre_logits=False)` (class token -> head).

Model 3, `vivit_base_factorized` (class `ViViTFactorized`), factorised self-attention:

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
from ._common import (
    Classifier,
    ClassTokenClassifier,
    check_clip,
    init_embeddings_and_linears,
    linear_head,
    patch_embed_holding,
)
from ._layers import DropPath, GradCheckpointMixin, drop_path_rates
from .vit import Attention, Mlp


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tubelet_embed(in_chans: int, embed_dim: int, tubelet_size: int, patch_size) -> nn.Module:
    """`patch_embed` of both ViViT models: one Conv3d (`patch_embed.proj`) over tubelets of
    tubelet_size frames × patch_size pixels, stride = kernel."""
    kernel = (tubelet_size, *_pair(patch_size))
    return patch_embed_holding(nn.Conv3d(in_chans, embed_dim, kernel, stride=kernel))


def tubelet_grid(img_size, patch_size, tubelet_size: int, num_frames: int) -> tuple[int, int, int]:
    """The token grid (T', h, w) of num_frames frames at img_size: the grid the position table is built for."""
    (ih, iw), (ph, pw) = _pair(img_size), _pair(patch_size)
    return (num_frames // tubelet_size, ih // ph, iw // pw)


def tubelet_tokens(patch_embed: nn.Module, x: torch.Tensor):
    """Clips (B, C, T, H, W) -> the tubelet tokens (B, T'·h·w, D), frame-major (index t·S + s: layout "ts"),
    and their grid (T', h, w)."""
    check_clip(x, "ViViT")
    x = patch_embed.proj(x)  # (B, D, T', h, w)
    return x.flatten(2).transpose(1, 2), x.shape[2:]


class Block(timesformer.Block):
    """TimeSformer's block parameters without temporal_fc; factorised order space → time → MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__(
            dim, num_heads, mlp_ratio, qkv_bias, temporal_fc=False, drop_path=drop_path, drop_path_style="timm"
        )

    def forward(self, x, frames: int):
        s = space_time_attention(self.attn.qkv(self.norm1(x)), frames, self.num_heads, "space", layout="ts")
        x = x + self.drop_path(self.attn.proj(s))
        t = space_time_attention(
            self.temporal_attn.qkv(self.temporal_norm1(x)), frames, self.num_heads, "time", layout="ts"
        )
        x = x + self.drop_path(self.temporal_attn.proj(t))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViViTFactorized(Classifier, GradCheckpointMixin, nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        num_frames: int = 32,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.patch_embed = tubelet_embed(in_chans, embed_dim, tubelet_size, patch_size)
        self.grid = tubelet_grid(img_size, patch_size, tubelet_size, num_frames)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = linear_head(embed_dim, num_classes)
        init_embeddings_and_linears(self, self.pos_embed)

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
        x, grid = tubelet_tokens(self.patch_embed, x)
        x = x + self._pos_embed(grid)
        for blk in self.blocks:
            x = self.run_block(blk, x, grid[0])
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=1)  # no class token: average the tokens
        return x if pre_logits else self.head(x)


@register_model
def vivit_base_factorized(**kwargs) -> ViViTFactorized:
    """ViViT-B model 3 (factorised self-attention): 32 frames at 224 px, tubelets 2×16×16 (16×14×14 tokens)."""
    return ViViTFactorized(**kwargs)


# ----------------------------------------------------------------------------- model 1: joint space-time


class FastGELU(nn.Module):
    """transformers' "gelu_fast" (`FastGELUActivation`): 0.5·x·(1 + tanh(0.7978845608·x·(1 + 0.044715·x²))),
    evaluated in that order with that (truncated) constant. F.gelu(approximate="tanh") is the same curve
    written differently (x + 0.044715·x³, √(2/π) in full): equal to ~1e-7, not bit for bit."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_ACTIVATIONS = {
    "gelu_fast": FastGELU,
    "gelu": nn.GELU,  # exact erf
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


class JointBlock(nn.Module):
    """Pre-norm ViT block with joint space-time attention over all tokens of the clip."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        hidden_act: str = "gelu_fast",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)  # qkv -> self_attention -> proj
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))
        self.mlp.act = _ACTIVATIONS[hidden_act]()  # no parameters: names unchanged
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViViT(ClassTokenClassifier, GradCheckpointMixin, nn.Module):
    """ViViT model 1 (joint space-time attention). Input clips (B, 3, T, H, W); output logits."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        tubelet_size: int = 2,
        num_frames: int = 32,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu_fast",
    ):
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"ViViT: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {hidden_act!r}")
        if embed_dim % num_heads:
            raise ValueError(f"ViViT: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.grad_checkpointing = False
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.patch_embed = tubelet_embed(in_chans, embed_dim, tubelet_size, patch_size)
        self.grid = tubelet_grid(img_size, patch_size, tubelet_size, num_frames)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1] * self.grid[2], embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                JointBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], layer_norm_eps, hidden_act)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.head = linear_head(embed_dim, num_classes)
        init_embeddings_and_linears(self, self.pos_embed, self.cls_token)

    def _pos_embed(self, grid) -> torch.Tensor:
        """pos_embed for a token grid (T', h, w). At the configured grid: the table itself. Otherwise the
        class-token entry is kept and the patch table, seen as T' frames of h0 × w0 maps, is resampled
        separably: each frame's map bicubically to h × w (align_corners=False, as timm and transformers
        resize image position tables), then each position's sequence linearly to T' frames
        (align_corners=False), computed in float32."""
        grid = tuple(int(g) for g in grid)
        if grid == self.grid:
            return self.pos_embed
        (t0, h0, w0), (t, h, w) = self.grid, grid
        d = self.pos_embed.shape[-1]
        p = self.pos_embed[0, 1:].float().reshape(t0, h0, w0, d).permute(0, 3, 1, 2)  # frames as the batch
        if (h, w) != (h0, w0):
            p = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=False)
        if t != t0:
            p = p.permute(1, 2, 3, 0).reshape(1, d * h * w, t0)  # each (channel, position) a sequence over time
            p = F.interpolate(p, size=t, mode="linear", align_corners=False).reshape(d, h, w, t).permute(3, 0, 1, 2)
        p = p.permute(0, 2, 3, 1).reshape(1, t * h * w, d).to(self.pos_embed.dtype)
        return torch.cat((self.pos_embed[:, :1], p), dim=1)

    def forward_features(self, x):
        """Clips (B, 3, T, H, W) → the normalised tokens (B, 1 + T'·S, embed_dim): the class token, then the
        tubelet tokens frame-major (index t·S + s)."""
        x, grid = tubelet_tokens(self.patch_embed, x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self._pos_embed(grid)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x)


@register_model
def vivit_b_16x2_kinetics400(**kwargs) -> ViViT:
    """ViViT-B model 1 (joint space-time attention), google/vivit-b-16x2-kinetics400: 32 frames at 224 px,
    tubelets 2×16×16 (16·196 tokens + a class token), gelu_fast, LayerNorm eps 1e-6, 400 classes."""
    return ViViT(**kwargs)


# ----------------------------------------------------------------------------- Hugging Face weights

_QKV = ("q", "k", "v")
# transformers VivitLayer submodule -> (our Block submodule, q/k/v part or None); legacy names
# (the Hub checkpoints, transformers 4.x) and transformers 5.x `state_dict()` names
_HF_VIVIT_LAYER = {
    "layernorm_before": ("norm1", None),
    "layernorm_after": ("norm2", None),
    # legacy
    "attention.attention.query": ("attn.qkv", "q"),
    "attention.attention.key": ("attn.qkv", "k"),
    "attention.attention.value": ("attn.qkv", "v"),
    "attention.output.dense": ("attn.proj", None),
    "intermediate.dense": ("mlp.fc1", None),
    "output.dense": ("mlp.fc2", None),
    # transformers >= 5
    "attention.q_proj": ("attn.qkv", "q"),
    "attention.k_proj": ("attn.qkv", "k"),
    "attention.v_proj": ("attn.qkv", "v"),
    "attention.o_proj": ("attn.proj", None),
    "mlp.fc1": ("mlp.fc1", None),
    "mlp.fc2": ("mlp.fc2", None),
}
_HF_VIVIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _hf_vivit_key(key: str):
    """-> (our key, q/k/v part or None), or None when the key is not recognised."""
    if key in ("classifier.weight", "classifier.bias"):
        return "head." + key.split(".", 1)[1], None
    k = key[len("vivit.") :] if key.startswith("vivit.") else key
    if k in _HF_VIVIT_TOP:
        return _HF_VIVIT_TOP[k], None
    for prefix in ("encoder.layer.", "layers."):
        if k.startswith(prefix):
            idx, _, rest = k[len(prefix) :].partition(".")
            module, _, param = rest.rpartition(".")
            if idx.isdigit() and param in ("weight", "bias") and module in _HF_VIVIT_LAYER:
                ours, part = _HF_VIVIT_LAYER[module]
                return f"blocks.{idx}.{ours}.{param}", part
    return None


def convert_hf_vivit(state_dict) -> dict[str, torch.Tensor]:
    """transformers `VivitForVideoClassification` state_dict (e.g. google/vivit-b-16x2-kinetics400) ->
    `vivit_b_16x2_kinetics400` names, for `load_state_dict(..., strict=True)`.

    Reads both layouts: the Hub checkpoints' / transformers 4.x (`vivit.encoder.layer.{i}.attention.attention.
    {query,key,value}`, `attention.output.dense`, `intermediate.dense`, `output.dense`) and transformers 5.x
    `state_dict()` (`vivit.layers.{i}.attention.{q,k,v,o}_proj`, `mlp.fc1`, `mlp.fc2`); `layernorm_before` /
    `layernorm_after` -> `norm1` / `norm2`, `vivit.embeddings.{cls_token, position_embeddings,
    patch_embeddings.projection}` -> `cls_token`, `pos_embed`, `patch_embed.proj`, `vivit.layernorm` -> `norm`,
    `classifier` -> `head`. Query, key and value weights (and biases) are concatenated along the output
    dimension into `attn.qkv` ([W_q; W_k; W_v]): each is split head-major by transformers, so this is the
    packed (B, N, 3C) layout `self_attention` reads. A `VivitModel` state_dict without its pooler (no
    `vivit.` prefix, no classifier) converts too: load it into a model built with `num_classes=0`.
    Raises ValueError naming unrecognised keys (e.g. VivitModel's `pooler.dense`, which this model does
    not have) and a block whose query, key and value are not all present."""
    out, parts, unknown = {}, {}, []
    for key, value in state_dict.items():
        hit = _hf_vivit_key(key)
        if hit is None:
            unknown.append(key)
            continue
        new, part = hit
        slot = parts.setdefault(new, {}) if part is not None else None
        if (part is None and new in out) or (part is not None and part in slot):
            raise ValueError(
                f"convert_hf_vivit: key {key!r} maps to {new!r} ({part or 'whole'}) which another key "
                "already filled (a state_dict mixing both key layouts?)"
            )
        if part is None:
            out[new] = value
        else:
            slot[part] = value
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        hint = (
            " (VivitModel's pooler has no counterpart: drop pooler.* or convert the classification model)"
            if any(".pooler." in "." + k for k in unknown)
            else ""
        )
        raise ValueError(
            f"convert_hf_vivit: unrecognised key(s) {unknown[:8]}{more}; expected a transformers "
            f"VivitForVideoClassification (or VivitModel) state_dict{hint}"
        )
    for new, slot in parts.items():
        missing = [p for p in _QKV if p not in slot]
        if missing:
            raise ValueError(
                f"convert_hf_vivit: {new!r} needs the query, key and value tensors; missing "
                f"{', '.join({'q': 'query', 'k': 'key', 'v': 'value'}[p] for p in missing)}"
            )
        out[new] = torch.cat([slot[p] for p in _QKV], dim=0)
    return out
