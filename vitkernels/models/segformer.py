"""SegFormer (Xie et al. 2021): MiT encoder + all-MLP decode head, on `sr_attention` and `mix_ffn`.

The MiT encoder is the PVTv2 encoder (`pvt_v2.py`: overlapping patch embeddings 7/4 then 3/2,
spatial-reduction attention, Mix-FFN) with mlp ratio 4 in every stage and, as in Hugging Face's
`SegformerForSemanticSegmentation`, every LayerNorm at PyTorch's default eps 1e-5 (HF builds all of
them with `nn.LayerNorm(hidden_size)`; its config's `layer_norm_eps` is not used by these layers).
The decode head follows HF: per stage a linear to `decoder_hidden_size`, bilinear upsampling
(align_corners=False) to the stage-1 map (1/4 resolution), concatenation in reverse stage order,
a 1×1 conv without bias + BatchNorm + ReLU, dropout, a 1×1 classifier. Logits come out at 1/4 of
the input resolution: (B, num_classes, ceil(H/4), ceil(W/4)).

Parameter names: `encoder.*` are the timm PVTv2 names, `decode_head.*` are HF's. Load a Hugging Face
checkpoint with `model.load_state_dict(convert_hf_segformer(hf_state_dict), strict=True)`; the
converter packs HF's separate key and value linears into the [k | v] head-major kv linear that
`sr_attention` reads.

Training features as in transformers' SegFormer: `drop_path_rate` (stochastic depth on both residual
branches of every encoder block, rising linearly over all blocks of all stages; default 0.1, the
default of `SegformerConfig` and of the released nvidia/mit-b* and segformer-b* configs; masks drawn
as transformers draws them, so a seeded training step matches it), `set_grad_checkpointing()` (the
encoder blocks), `forward_features` (the four stage maps (B, C_i, H_i, W_i), strides 4, 8, 16, 32, as
transformers' `hidden_states`) and `forward_head(features)` (the decode head's logits).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model
from ._common import Classifier, build
from ._layers import GradCheckpointMixin
from .pvt_v2 import PyramidVisionTransformerV2, tokens_to_map


class MLP(nn.Module):
    """HF `SegformerMLP`: a linear on a stage map's pixels, (B, C, H, W) -> (B, C', H, W) (views, no copies)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, output_dim)

    def forward(self, x):
        hw = x.shape[-2:]
        return tokens_to_map(self.proj(x.flatten(2).transpose(1, 2)), hw)


class DecodeHead(nn.Module):
    def __init__(self, in_dims, decoder_hidden_size: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.linear_c = nn.ModuleList([MLP(d, decoder_hidden_size) for d in in_dims])
        self.linear_fuse = nn.Conv2d(decoder_hidden_size * len(in_dims), decoder_hidden_size, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(decoder_hidden_size)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_hidden_size, num_classes, 1)

    def forward(self, features, pre_logits: bool = False):
        """features: the stage maps (B, C_i, H_i, W_i), stride 4 first."""
        size = tuple(features[0].shape[-2:])
        maps = []
        for x, mlp in zip(features, self.linear_c):
            y = mlp(x)
            if tuple(y.shape[-2:]) != size:  # resizing to the same size is the identity
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            maps.append(y)
        y = self.activation(self.batch_norm(self.linear_fuse(torch.cat(maps[::-1], dim=1))))
        return y if pre_logits else self.classifier(self.dropout(y))


class SegFormer(Classifier, GradCheckpointMixin, nn.Module):
    """Images (B, 3, H, W) -> logits (B, num_classes, H', W') at the stride-4 resolution."""

    def __init__(
        self,
        num_classes: int = 150,
        in_chans: int = 3,
        embed_dims=(32, 64, 160, 256),
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 5, 8),
        sr_ratios=(8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        decoder_hidden_size: int = 256,
        classifier_dropout: float = 0.1,
        norm_eps: float = 1e-5,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = num_classes
        # The sizes, as a Hugging Face SegformerConfig spells them out (the benchmark builds one).
        self.config = dict(
            num_classes=num_classes,
            in_chans=in_chans,
            embed_dims=tuple(embed_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            sr_ratios=tuple(sr_ratios),
            mlp_ratio=mlp_ratio,
            decoder_hidden_size=decoder_hidden_size,
            drop_path_rate=drop_path_rate,
            classifier_dropout=classifier_dropout,
        )
        self.encoder = PyramidVisionTransformerV2(
            in_chans=in_chans,
            num_classes=0,
            depths=depths,
            embed_dims=embed_dims,
            num_heads=num_heads,
            sr_ratios=sr_ratios,
            mlp_ratios=(mlp_ratio,) * len(depths),
            norm_eps=norm_eps,
            drop_path_rate=drop_path_rate,
            drop_path_style="hf",
        )
        self.decode_head = DecodeHead(embed_dims, decoder_hidden_size, num_classes, classifier_dropout)
        for m in self.decode_head.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x):
        """Images (B, 3, H, W) -> the MiT encoder's four normalised stage maps (B, C_i, H_i, W_i), stride
        4, 8, 16, 32 (views of its token-layout outputs)."""
        return [tokens_to_map(t, hw) for t, hw in self.encoder.forward_stages(x)]

    def forward_head(self, features, pre_logits: bool = False):
        """Stage maps -> logits (B, num_classes, H_1, W_1); with pre_logits the fused decoder features
        (B, decoder_hidden_size, H_1, W_1) before the dropout and the classifier."""
        return self.decode_head(features, pre_logits)


# ----------------------------------------------------------------------------- HF key conversion

_HF_BLOCK = {
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.dense2": "mlp.fc2",
}
# transformers >= 5 names the same modules differently (its state_dict(); Hub checkpoints keep
# the names above): segformer.stages.{i}.blocks.{j}.<module>.
_HF5_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "attn.q",
    "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.norm",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.fc2": "mlp.fc2",
}
_HF_KV = {
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.k_proj": "key",
    "attention.v_proj": "value",
}
_HF_HEAD = ("linear_c.", "linear_fuse.", "batch_norm.", "classifier.")


def convert_hf_segformer(state_dict: dict) -> dict:
    """Map a Hugging Face `SegformerForSemanticSegmentation` state_dict to `SegFormer` keys.

    Both key layouts are accepted: the one of the Hub checkpoints and transformers < 5
    (`segformer.encoder.block.{i}.{j}.attention.self.query`, ...), and the one of transformers >= 5
    (`segformer.stages.{i}.blocks.{j}.attention.q_proj`, ...). The separate key and value linears become
    one `attn.kv` linear, weight [W_k; W_v] and bias [b_k; b_v]: the [k | v] head-major packing of
    `sr_attention`. Every key must be recognised and every key/value pair complete; anything else raises.
    """
    out: dict = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        k = key
        m = re.fullmatch(r"decode_head\.linear_projections\.(\d+)\.(.+)", k)  # transformers >= 5
        if m:
            k = f"decode_head.linear_c.{m.group(1)}.{m.group(2)}"
        if k.startswith("decode_head.") and k[len("decode_head.") :].startswith(_HF_HEAD):
            out[k] = value
            continue
        m = re.fullmatch(r"segformer\.encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(\w+)", k) or re.fullmatch(
            r"segformer\.stages\.(\d+)\.patch_embeddings\.(proj|layer_norm)\.(\w+)", k
        )
        if m:
            i, mod, p = int(m.group(1)), m.group(2), m.group(3)
            prefix = "encoder.patch_embed." if i == 0 else f"encoder.stages.{i}.downsample."
            out[prefix + ("proj" if mod == "proj" else "norm") + "." + p] = value
            continue
        m = re.fullmatch(r"segformer\.encoder\.layer_norm\.(\d+)\.(\w+)", k) or re.fullmatch(
            r"segformer\.stages\.(\d+)\.layer_norm\.(\w+)", k
        )
        if m:
            out[f"encoder.stages.{m.group(1)}.norm.{m.group(2)}"] = value
            continue
        m, names = re.fullmatch(r"segformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)\.(\w+)", k), _HF_BLOCK
        if m is None:
            m, names = re.fullmatch(r"segformer\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)", k), _HF5_BLOCK
        if m:
            prefix = f"encoder.stages.{m.group(1)}.blocks.{m.group(2)}."
            mod, p = m.group(3), m.group(4)
            if mod in _HF_KV:
                pending.setdefault(prefix + "attn.kv." + p, {})[_HF_KV[mod]] = value
                continue
            if mod in names:
                out[prefix + names[mod] + "." + p] = value
                continue
        unknown.append(key)
    if unknown:
        raise KeyError(
            f"convert_hf_segformer: unrecognised keys (not a SegformerForSemanticSegmentation "
            f"state_dict?): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    for name, parts in pending.items():
        if set(parts) != {"key", "value"}:
            raise KeyError(
                f"convert_hf_segformer: {name} needs both the key and the value linear, got only {sorted(parts)}"
            )
        out[name] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


# ----------------------------------------------------------------------------- named sizes


def _segformer(defaults: dict, kwargs: dict) -> SegFormer:
    return build(SegFormer, defaults, kwargs)


_B1_5 = {"embed_dims": (64, 128, 320, 512)}


@register_model
def segformer_b0(**kwargs) -> SegFormer:
    return _segformer({"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "decoder_hidden_size": 256}, kwargs)


@register_model
def segformer_b1(**kwargs) -> SegFormer:
    return _segformer(dict(depths=(2, 2, 2, 2), decoder_hidden_size=256, **_B1_5), kwargs)


@register_model
def segformer_b2(**kwargs) -> SegFormer:
    return _segformer(dict(depths=(3, 4, 6, 3), decoder_hidden_size=768, **_B1_5), kwargs)


@register_model
def segformer_b3(**kwargs) -> SegFormer:
    return _segformer(dict(depths=(3, 4, 18, 3), decoder_hidden_size=768, **_B1_5), kwargs)


@register_model
def segformer_b4(**kwargs) -> SegFormer:
    return _segformer(dict(depths=(3, 8, 27, 3), decoder_hidden_size=768, **_B1_5), kwargs)


@register_model
def segformer_b5(**kwargs) -> SegFormer:
    return _segformer(dict(depths=(3, 6, 40, 3), decoder_hidden_size=768, **_B1_5), kwargs)
