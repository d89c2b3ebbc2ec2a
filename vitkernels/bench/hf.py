"""Hugging Face transformers baselines of `vitkernels-bench models`.

For every vitkernels model with a transformers counterpart, `counterpart(vk_model)` gives the
transformers class and a config with exactly the sizes of that (already built) vitkernels model, read
off its modules, so a model built with other kwargs (a test's tiny depth) maps too:

=========================  ==========================================  =====================================
vitkernels class            transformers class                          weights shared (verified outputs)
=========================  ==========================================  =====================================
VisionTransformer (ViT/     ViTForImageClassification (class token,     no: there is no HF <-> timm key map;
DeiT sizes)                 exact GELU, LayerNorm eps 1e-6)             speed only
SwinTransformer             SwinForImageClassification                  no (speed only)
SwinTransformerV2           Swinv2ForImageClassification                no (speed only)
PyramidVisionTransformerV2  PvtV2ForImageClassification (linear_        no (speed only)
                            attention for pvt_v2_b2_li)
SegFormer                   SegformerForSemanticSegmentation            yes: `convert_hf_segformer`
TimeSformer                 TimesformerForVideoClassification           yes: `convert_hf_timesformer`
                            (divided_space_time)
ViViT (model 1)             VivitForVideoClassification                 yes: `convert_hf_vivit`
=========================  ==========================================  =====================================

XCiT and ViViT model 3 (factorised) have no transformers counterpart. The video classes take
`pixel_values` (B, T, 3, H, W): the benchmark hands them its (B, 3, T, H, W) clips transposed (made
contiguous once, outside the timed region).

Implementations (`HF_IMPLS`):

* ``hf-eager``     the transformers model built with attn_implementation="eager";
* ``hf-sdpa``      built with attn_implementation="sdpa" where the class supports it
                   (`_supports_sdpa`); skipped with that reason elsewhere (PVTv2, TimeSformer, and
                   Swinv2 in transformers 5.25);
* ``hf+patch_hf``  the transformers model with its default attention (sdpa where supported, else
                   eager), patched by `vitkernels.patch_hf`, run under the --backend; skipped when
                   patch_hf fuses no module;
* ``hf+compile``   `torch.compile` of the hf-sdpa model (hf-eager where there is no sdpa).

All of them hold the same weights (the hf-eager model's state_dict is loaded into the others).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .harness import _short

HF_IMPLS = ("hf-eager", "hf-sdpa", "hf+patch_hf", "hf+compile")


@dataclass
class HFSpec:
    """A transformers counterpart of one vitkernels model."""

    model_cls: str  # e.g. "SwinForImageClassification"
    config_cls: str  # e.g. "SwinConfig"
    config: dict  # the config's kwargs (sizes of the vitkernels model)
    video: bool = False  # pixel_values (B, T, 3, H, W)
    convert: Optional[Callable] = None  # HF state_dict -> vitkernels state_dict (strict), or None
    share_note: Optional[str] = None  # why the weights are not shared (convert is None)
    post: Optional[Callable] = None  # applied to a freshly built model (what the config cannot say)


def transformers_module():
    """(transformers, None) or (None, why not)."""
    try:
        import transformers

        return transformers, None
    except Exception as e:
        return None, f"transformers is not importable ({_short(e)})"


# ----------------------------------------------------------------------------- sizes of the vitkernels models


def _drop_path_rate(vk: nn.Module) -> float:
    """The stochastic-depth rate of the last block (the models' rates rise linearly from 0 to it, as HF's)."""
    return round(max((float(m.drop_prob) for m in vk.modules() if hasattr(m, "drop_prob")), default=0.0), 6)


def _bias(linear: nn.Linear) -> bool:
    return linear.bias is not None


def _num(x):
    """An integral float as an int (the configs type ratios as ints), else the float."""
    return int(x) if float(x) == int(x) else float(x)


def _ratio(hidden: int, dim: int):
    return _num(hidden / dim)


_NO_SHARE = "weights not shared (no transformers <-> timm key map): speed only"


def _vit(vk) -> HFSpec:
    pe, blk = vk.patch_embed, vk.blocks[0]
    p = int(pe.patch_size)
    return HFSpec(
        "ViTForImageClassification",
        "ViTConfig",
        dict(
            hidden_size=int(vk.embed_dim),
            num_hidden_layers=len(vk.blocks),
            num_attention_heads=int(blk.attn.num_heads),
            intermediate_size=int(blk.mlp.fc1.out_features),
            hidden_act="gelu",
            layer_norm_eps=float(blk.norm1.eps),
            image_size=int(pe.grid_size[0]) * p,
            patch_size=p,
            num_channels=int(pe.proj.in_channels),
            qkv_bias=_bias(blk.attn.qkv),
            num_labels=int(vk.num_classes),
        ),
        share_note=_NO_SHARE,
    )


def _swin_spec(model_cls: str, config_cls: str, vk, stages: list, **config) -> HFSpec:
    """Swin and Swin V2: their own `config` and what both configs read alike from the vitkernels model (the
    stages' depths and heads, embedding, norms, stochastic depth, head)."""
    first = stages[0].blocks[0]
    shared = dict(
        num_channels=int(vk.patch_embed.proj.in_channels),
        embed_dim=int(vk.patch_embed.proj.out_channels),
        depths=[len(s.blocks) for s in stages],
        num_heads=[int(s.blocks[0].attn.num_heads) for s in stages],
        drop_path_rate=_drop_path_rate(vk),
        hidden_act="gelu",
        layer_norm_eps=float(first.norm1.eps),
        num_labels=int(vk.num_classes),
    )
    return HFSpec(model_cls, config_cls, {**config, **shared}, share_note=_NO_SHARE)


def _swin(vk) -> HFSpec:
    stages = list(vk.layers)
    blocks = [b for s in stages for b in s.blocks]
    first = stages[0].blocks[0]
    dim = int(first.norm1.normalized_shape[0])
    img = vk.img_size if isinstance(vk.img_size, int) else list(vk.img_size)
    return _swin_spec(
        "SwinForImageClassification",
        "SwinConfig",
        vk,
        stages,
        image_size=img,
        patch_size=int(vk.patch_embed.patch_size),
        # the configured window: a stage whose map is no larger is built with a smaller one (HF does the same)
        window_size=max(int(b.attn.window_size) for b in blocks),
        mlp_ratio=_ratio(int(first.mlp.fc1.out_features), dim),
        qkv_bias=_bias(first.attn.qkv),
    )


def _swinv2(vk) -> HFSpec:
    stages = list(vk.layers)
    first = stages[0].blocks[0]
    dim = int(first.norm1.normalized_shape[0])
    window = max(int(b.window_size) for s in stages for b in s.blocks)
    p = int(vk.patch_embed.patch_size)
    res = [tuple(int(s) // p for s in vk.img_size)]
    for _ in stages[1:]:
        res.append(tuple((r + 1) // 2 for r in res[-1]))
    for i, (s, r) in enumerate(zip(stages, res)):  # HF has one window for every stage, clamped as timm's
        want = min(r) if min(r) <= window else window
        if any(int(b.window_size) != want for b in s.blocks):
            raise ValueError(f"stage {i} has its own window size; transformers' Swinv2Config has one for all")
    h, w = vk.img_size
    return _swin_spec(
        "Swinv2ForImageClassification",
        "Swinv2Config",
        vk,
        stages,
        image_size=h if h == w else [h, w],
        patch_size=p,
        window_size=window,
        pretrained_window_sizes=[int(s.blocks[0].attn.pretrained_window_size) for s in stages],
        mlp_ratio=float(first.mlp.fc1.out_features / dim),
        qkv_bias=first.attn.q_bias is not None,
    )


def _pvt(vk) -> HFSpec:
    stages = list(vk.stages)
    first = stages[0].blocks[0]
    dims = [int(s.blocks[0].norm1.normalized_shape[0]) for s in stages]
    return HFSpec(
        "PvtV2ForImageClassification",
        "PvtV2Config",
        dict(
            num_channels=int(vk.patch_embed.proj.in_channels),
            num_encoder_blocks=len(stages),
            depths=[len(s.blocks) for s in stages],
            sr_ratios=[int(s.blocks[0].attn.sr_ratio) for s in stages],
            hidden_sizes=dims,
            patch_sizes=[7] + [3] * (len(stages) - 1),
            strides=[4] + [2] * (len(stages) - 1),
            num_attention_heads=[int(s.blocks[0].attn.num_heads) for s in stages],
            mlp_ratios=[_ratio(int(s.blocks[0].mlp.fc1.out_features), d) for s, d in zip(stages, dims)],
            hidden_act="gelu",
            drop_path_rate=_drop_path_rate(vk),
            layer_norm_eps=float(first.norm1.eps),
            qkv_bias=_bias(first.attn.q),
            linear_attention=bool(first.attn.linear_attn),
            num_labels=int(vk.num_classes),
        ),
        share_note=_NO_SHARE,
    )


def _segformer(vk) -> HFSpec:
    from ..models.segformer import convert_hf_segformer

    cfg = vk.config
    n = len(cfg["depths"])
    return HFSpec(
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        dict(
            num_channels=cfg["in_chans"],
            num_encoder_blocks=n,
            hidden_sizes=list(cfg["embed_dims"]),
            depths=list(cfg["depths"]),
            num_attention_heads=list(cfg["num_heads"]),
            sr_ratios=list(cfg["sr_ratios"]),
            mlp_ratios=[_num(cfg["mlp_ratio"])] * n,
            decoder_hidden_size=cfg["decoder_hidden_size"],
            drop_path_rate=cfg.get("drop_path_rate", 0.1),
            classifier_dropout_prob=cfg.get("classifier_dropout", 0.1),
            num_labels=cfg["num_classes"],
        ),
        convert=convert_hf_segformer,
    )


def _timesformer(vk) -> HFSpec:
    from ..models.timesformer import convert_hf_timesformer

    blk = vk.blocks[0]
    p = int(vk.patch_size)
    grid = math.isqrt(vk.pos_embed.shape[1] - 1)
    kw = dict(
        image_size=grid * p,
        patch_size=p,
        num_channels=int(vk.patch_embed.proj.in_channels),
        num_frames=int(vk.num_frames),
        hidden_size=int(vk.patch_embed.proj.out_channels),
        num_hidden_layers=len(vk.blocks),
        num_attention_heads=int(blk.num_heads),
        intermediate_size=int(blk.mlp.fc1.out_features),
        hidden_act="gelu",
        layer_norm_eps=float(blk.norm1.eps),
        qkv_bias=_bias(blk.attn.qkv),
        attention_type="divided_space_time",
        num_labels=int(vk.num_classes),
    )
    rate = _drop_path_rate(vk)

    def post(model):
        # TimesformerConfig types drop_path_rate as an int: the rates (linear over the layers, as ours and as
        # transformers builds them from the config) are set on the layers instead
        from transformers.models.timesformer import modeling_timesformer as mod

        layers = model.timesformer.encoder.layer
        for layer, r in zip(layers, torch.linspace(0, rate, len(layers)).tolist()):
            layer.drop_path = mod.TimesformerDropPath(r) if r > 0 else nn.Identity()

    return HFSpec(
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        kw,
        video=True,
        convert=convert_hf_timesformer,
        post=post if rate else None,
    )


def _vivit(vk) -> HFSpec:
    from ..models.vivit import FastGELU, convert_hf_vivit

    blk = vk.blocks[0]
    proj = vk.patch_embed.proj
    t, ph, pw = (int(k) for k in proj.kernel_size)
    _, h, w = vk.grid
    act = blk.mlp.act
    hidden_act = (
        "gelu_fast"
        if isinstance(act, FastGELU)
        else "gelu_pytorch_tanh"
        if getattr(act, "approximate", "none") == "tanh"
        else "gelu"
    )
    return HFSpec(
        "VivitForVideoClassification",
        "VivitConfig",
        dict(
            image_size=h * ph if h * ph == w * pw else [h * ph, w * pw],
            num_frames=int(vk.num_frames),
            tubelet_size=[t, ph, pw],
            num_channels=int(proj.in_channels),
            hidden_size=int(proj.out_channels),
            num_hidden_layers=len(vk.blocks),
            num_attention_heads=int(blk.attn.num_heads),
            intermediate_size=int(blk.mlp.fc1.out_features),
            hidden_act=hidden_act,
            layer_norm_eps=float(blk.norm1.eps),
            qkv_bias=_bias(blk.attn.qkv),
            num_labels=int(vk.num_classes),
        ),
        video=True,
        convert=convert_hf_vivit,
    )


_FAMILIES = {
    "VisionTransformer": _vit,
    "SwinTransformer": _swin,
    "SwinTransformerV2": _swinv2,
    "PyramidVisionTransformerV2": _pvt,
    "SegFormer": _segformer,
    "TimeSformer": _timesformer,
    "ViViT": _vivit,
}
_NONE = {
    "Xcit": "transformers has no XCiT",
    "MultiScaleVit": "transformers has no MViTv2",
    "ViViTFactorized": "transformers' ViViT is model 1 (joint space-time attention); it has no model 3 "
    "(factorised self-attention)",
}


def counterpart(vk_model: nn.Module) -> tuple:
    """(HFSpec with the sizes of `vk_model`, None) or (None, why there is none)."""
    kind = type(vk_model).__name__
    if not type(vk_model).__module__.startswith("vitkernels.models") or kind not in _FAMILIES:
        return None, _NONE.get(kind, f"transformers has no counterpart of the vitkernels {kind}")
    try:
        return _FAMILIES[kind](vk_model), None
    except Exception as e:  # a model built with sizes this mapping does not read
        return None, f"could not map {kind} to a transformers config ({_short(e)})"


# ----------------------------------------------------------------------------- building


def supports_sdpa(transformers, spec: HFSpec) -> Optional[str]:
    """None when the class takes attn_implementation="sdpa", else why not."""
    cls = getattr(transformers, spec.model_cls)
    if not getattr(cls, "_supports_sdpa", False):
        return (
            f"transformers' {spec.model_cls} has no sdpa attention (_supports_sdpa is False): "
            "eager is its only attention"
        )
    return None


def build(transformers, spec: HFSpec, attn: str, state_dict=None) -> nn.Module:
    """The transformers model of `spec` with attn_implementation `attn` (on CPU, float32), holding
    `state_dict` when given; raises when transformers does not honour `attn`."""
    cls = getattr(transformers, spec.model_cls)
    config = getattr(transformers, spec.config_cls)(**spec.config)
    model = cls._from_config(config, attn_implementation=attn)
    got = getattr(model.config, "_attn_implementation", attn)
    if got != attn:
        raise RuntimeError(f"{spec.model_cls} was built with attn_implementation={got!r}, not {attn!r}")
    if spec.post is not None:
        spec.post(model)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def patch(model: nn.Module) -> dict:
    """`vitkernels.patch_hf(model)` in place; returns {Fused class name: count} (empty: nothing fused)."""
    from .. import patch_hf

    patch_hf(model)
    fused: dict = {}
    for m in model.modules():
        name = type(m).__name__
        if name.startswith("Fused"):
            fused[name] = fused.get(name, 0) + 1
    return fused


def hf_inputs(inputs: list, video: bool) -> list:
    """The bench's inputs as transformers takes them: clips (B, 3, T, H, W) -> pixel_values (B, T, 3, H, W)
    (contiguous, made once outside the timed region); images unchanged."""
    return [x.transpose(1, 2).contiguous() for x in inputs] if video else list(inputs)


class OpCounter(contextlib.AbstractContextManager):
    """Counts the torch.ops.vitkernels.* calls that reach the dispatcher inside the block."""

    def __init__(self):
        self.counts: dict = {}
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns, _, name = str(func.overloadpacket).partition(".")
                if ns == "vitkernels":
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False
