"""softmax(q·kᵀ·scale + bias)·v, with rows whose every score is -inf giving 0. A boolean bias is a
keep-mask (False = -inf), as in F.scaled_dot_product_attention."""
from typing import Optional

import torch
from torch import Tensor

from ._util import compute_dtype


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                       scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): lse is the float32 natural-log logsumexp of each score row, +inf for a
    fully masked row (the convention of the fused kernels, so that exp(s - lse) = 0 there).
    Works on any number of leading batch dims: q (..., Nq, D), k, v (..., Nk, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    return attention_with_lse(q, k, v, bias, scale)[0]
