"""softmax(q·kᵀ·scale + bias)·v, with rows whose every score is -inf giving 0. A boolean bias is a
keep-mask (False = -inf), as in F.scaled_dot_product_attention."""

from typing import Optional

import torch
from torch import Tensor

from ._util import compute_dtype


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): lse is the float32 natural-log logsumexp of each score row, +inf for a
    fully masked row (the convention of the fused kernels, so that exp(s - lse) = 0 there).
    Works on any number of leading batch dims: q (..., Nq, D), k, v (..., Nk, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _flash_cpu_applies(q, k, v, bias):
        return _flash_cpu(q, k, v, bias, scale)
    ct = compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if bias is not None and bias.dtype == torch.bool:  # a keep-mask, as in SDPA: False -> -inf
        s = s.masked_fill(~bias, float("-inf"))
    elif bias is not None:
        s = s + bias.to(ct)
    # The row max only shifts the exponent (softmax is shift invariant), so it carries no gradient.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / torch.where(denom > 0, denom, torch.ones_like(denom)), v.to(ct))
    lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(denom, float("inf"))).squeeze(-1)
    return out.to(q.dtype), lse.detach().float()


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    return attention_with_lse(q, k, v, bias, scale)[0]


# ----------------------------------------------------------------------------- CPU forward fast path

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_cpu_applies(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> bool:
    """The forward of the reference backend on CPU (what "auto" runs there) may use ATen's tiled CPU
    attention, which returns the same output and logsumexp without materialising the Nq×Nk scores
    (about 10× faster at ViViT's 3,137 tokens). Only where nothing is differentiated through it: the
    reference backward (reference_vjp) records the literal math above, and float64 (the oracle)
    always takes it."""
    if _FLASH_CPU is None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return False
    return q.dim() >= 2 and k.shape[-2] > 0 and q.numel() > 0 and k.dtype == v.dtype == q.dtype


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    lead, nq, nk, d = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
    q4, k4, v4 = (t.reshape(-1, 1, t.shape[-2], d) for t in (q, k, v))
    mask = dead = None
    if bias is not None:
        full = bias.expand(*lead, nq, nk)
        if bias.dtype == torch.bool:
            dead = ~full.any(-1)
            full = torch.zeros(full.shape, dtype=q.dtype).masked_fill(~full, float("-inf"))
        else:
            full = full.to(q.dtype)
            dead = torch.isneginf(full).all(-1)
        mask = full.reshape(-1, 1, nq, nk)
    out, lse = _FLASH_CPU(q4, k4, v4, attn_mask=mask, scale=scale)
    out, lse = out.reshape(q.shape), lse.reshape(*lead, nq).float()
    if dead is not None and bool(dead.any()):  # rows with no key: output 0, lse +inf (the kernels' convention)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("inf"))
    return out, lse
