"""Training helpers shared by the models: stochastic depth (drop path) and gradient checkpointing.

Stochastic depth (Huang et al. 2016) as timm and Hugging Face apply it to residual branches: in
training, each sample's branch output is kept with probability 1 - p and then scaled by 1/(1 - p),
or zeroed; in eval mode (or with p = 0) the branch passes unchanged and no random numbers are drawn.
The schedule over a network's blocks rises linearly from 0 at the first block to `drop_path_rate`
at the last (`drop_path_rates`); hierarchical models spread it over the blocks of all stages.

Two ways of drawing the keep decisions are offered, equal in distribution, so that a model can
consume the random stream exactly as its reference does (same seed -> same masks):
  - style "timm": one Bernoulli(1 - p) draw per sample (`Tensor.bernoulli_`), as timm's DropPath;
  - style "hf": one uniform draw u per sample, kept where u + (1 - p) >= 1, as the DropPath
    modules of transformers' SegFormer and TimeSformer (and the official TimeSformer code).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_STYLES = ("timm", "hf")


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block rates 0 … drop_path_rate, evenly spaced over `depth` blocks (float32 steps, as
    timm's and transformers' `torch.linspace` schedules)."""
    if depth <= 0:
        return []
    return [float(r) for r in torch.linspace(0.0, float(drop_path_rate), depth, device="cpu")]


def block_rates(drop_path, depth: int) -> list[float]:
    """A stage's per-block rates: `drop_path` as given when it is a list or tuple (its slice of the model's
    schedule), else the one rate for each of its `depth` blocks."""
    return list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth


def split_rates(rates: Sequence[float], depths: Sequence[int]) -> list[list[float]]:
    """Cut one schedule over all blocks into per-stage lists (`depths` blocks each)."""
    out, start = [], 0
    for d in depths:
        out.append(list(rates[start : start + d]))
        start += d
    return out


class DropPath(nn.Module):
    """Per-sample stochastic depth of a residual branch. No parameters (state_dict unchanged).

    `forward(x)` masks along dim 0 of x. Models whose reference drops finer groups (TimeSformer
    drops per spatial position in its temporal branch and per frame in its spatial branch) call
    `mask(shape, x)` for a multiplier of their own shape and apply it themselves."""

    def __init__(self, drop_prob: float = 0.0, style: str = "timm"):
        super().__init__()
        drop_prob = float(drop_prob)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1], got {drop_prob}")
        if style not in _STYLES:
            raise ValueError(f"DropPath: style must be one of {_STYLES}, got {style!r}")
        self.drop_prob = drop_prob
        self.style = style

    @property
    def active(self) -> bool:
        return self.training and self.drop_prob > 0.0

    def mask(self, shape, like: torch.Tensor) -> torch.Tensor | None:
        """A multiplier of `shape` (like's dtype and device) holding 0 or 1/(1 - p) per entry, or None
        when the module is inactive (eval mode or p = 0): then nothing is drawn."""
        if not self.active:
            return None
        keep = 1.0 - self.drop_prob
        if self.style == "timm":
            m = like.new_empty(shape).bernoulli_(keep)
        else:
            m = torch.floor(torch.rand(shape, dtype=like.dtype, device=like.device) + keep)
        return m.div_(keep) if keep > 0.0 else m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask((x.shape[0],) + (1,) * (x.dim() - 1), x)
        return x if m is None else x * m

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}" + (f", style={self.style!r}" if self.style != "timm" else "")


class GradCheckpointMixin:
    """`set_grad_checkpointing(enable=True)` and the `grad_checkpointing` attribute, as timm models
    have them. While enabled, and while the model trains with autograd on, the model runs each block
    under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: activations inside a block
    are recomputed in backward instead of stored (the RNG state is restored, so drop-path masks are
    the same in the recomputation)."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for m in self.modules():  # the model and its stages
            if isinstance(m, GradCheckpointMixin):
                m.grad_checkpointing = bool(enable)

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def run_block(self, block, *args):
        """block(*args), checkpointed when gradient checkpointing is in effect."""
        if self._checkpointing():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
