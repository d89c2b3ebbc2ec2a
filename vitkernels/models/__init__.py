"""Reference models built on the vitkernels ops, with timm parameter names (strict state_dict loading).

    model = vitkernels.models.create_model("vit_base_patch16_224")
    model.load_state_dict(timm_model.state_dict(), strict=True)

Families so far: ViT/DeiT (`vit.py`), Swin (`swin.py`), Swin V2 (`swinv2.py`), PVTv2 (`pvt_v2.py`), SegFormer
(`segformer.py`; Hugging Face checkpoints load through `convert_hf_segformer`), XCiT (`xcit.py`), MViTv2
(`mvitv2.py`), TimeSformer
(`timesformer.py`; Hugging Face checkpoints through `convert_hf_timesformer`) and ViViT models 1 and 3 (`vivit.py`;
Hugging Face google/vivit-b-16x2-kinetics400 through `convert_hf_vivit`).
"""

from __future__ import annotations

from typing import Callable

import torch

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> torch.nn.Module:
    """Build model `name` (timm-style name). Weights cannot be downloaded by this package: pass a
    local `checkpoint_path` (a timm state_dict saved with torch.save) or load one yourself."""
    if name not in _REGISTRY:
        raise ValueError(f"vitkernels.models: unknown model {name!r}; available: {list_models()}")
    if pretrained and checkpoint_path is None:
        raise ValueError(
            "vitkernels.models: pretrained=True needs checkpoint_path= (a local timm state_dict); "
            "this package does not download weights"
        )
    model = _REGISTRY[name](**kwargs)
    if checkpoint_path is not None:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=True)
    return model


from . import mvitv2, pvt_v2, segformer, swin, swinv2, timesformer, vit, vivit, xcit  # noqa: E402,F401  (registers them)
from .segformer import convert_hf_segformer  # noqa: E402
from .timesformer import convert_hf_timesformer  # noqa: E402
from .vivit import convert_hf_vivit  # noqa: E402

__all__ = [
    "convert_hf_segformer",
    "convert_hf_timesformer",
    "convert_hf_vivit",
    "create_model",
    "list_models",
    "register_model",
]
