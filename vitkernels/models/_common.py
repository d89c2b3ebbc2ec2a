"""Model scaffolding the families share: the classifier head, timm's forward composition and init, the factories.

- `linear_head(dim, num_classes)`: timm's `head`, a Linear, or an Identity when num_classes is 0 (features only).
- `Classifier`: `forward(x) = forward_head(forward_features(x))`, as every timm model composes them; a model
  mixes it in (before `nn.Module`) and defines the two halves. `ClassTokenClassifier` adds the head of the
  models with a class token: `forward_head(x, pre_logits=False)` reads token 0 -> `head`.
- `init_linear` (timm's Linear init, applied over a model) and `init_embeddings_and_linears` (the video models:
  their learned embeddings first, then the Linears; the order fixes which random numbers each one draws).
- `build(cls, defaults, kwargs)`: a named size of a family, `kwargs` overriding its defaults.
- Video inputs: `check_clip(x, model)` and `patch_embed_holding(proj)` (the bare `patch_embed` module whose
  only child is the patch projection, so its parameters are named `patch_embed.proj.*`).

The mixins hold methods only (no state, no `__init__`): state_dict keys, pickling and deepcopy are those of
the model, and torch.compile traces the inherited methods as it traces the model's own.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_head(dim: int, num_classes: int) -> nn.Module:
    """Linear(dim, num_classes), or Identity when num_classes is 0 (timm's features-only model)."""
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class Classifier:
    """`forward(x)`: the model's `forward_head(forward_features(x))`."""

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class ClassTokenClassifier(Classifier):
    """`forward_head(x, pre_logits=False)` on tokens with the class token first: token 0 -> `head`."""

    def forward_head(self, x, pre_logits: bool = False):
        x = x[:, 0]
        return x if pre_logits else self.head(x)


def init_linear(m: nn.Module) -> None:
    """timm's init for Linear layers: truncated normal (std 0.02) weights, zero bias."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_embeddings_and_linears(model: nn.Module, *embeddings: nn.Parameter) -> None:
    """The init of the video models: each learned embedding truncated normal (std 0.02), in the order given,
    then every Linear as `init_linear`."""
    for p in embeddings:
        nn.init.trunc_normal_(p, std=0.02)
    model.apply(init_linear)


def build(cls, defaults: dict, kwargs: dict):
    """`cls(**defaults)` with `kwargs` overriding the named size (img_size, num_classes, a smaller depth for tests)."""
    return cls(**{**defaults, **kwargs})


def check_clip(x: torch.Tensor, model: str) -> None:
    """Video models take clips (B, C, T, H, W); anything else is refused with its shape."""
    if x.dim() != 5:
        raise ValueError(f"{model} expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")


def patch_embed_holding(proj: nn.Module) -> nn.Module:
    """A bare module holding the patch projection as `proj` (parameter names `patch_embed.proj.*`)."""
    patch_embed = nn.Module()
    patch_embed.proj = proj
    return patch_embed
