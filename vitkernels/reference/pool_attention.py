"""MViTv2 pooling-attention core (SPEC.md op 9): q (B, heads, Nq, D), k, v (B, heads, Nk, D) -> (B, Nq, heads·D).

out[b, i, h·D + d] = Σ_j softmax_j(scale·q_i·k_j + R[i, j])·v[j, d] + (q[b, h, i, d] if residual), with
R[i, j] = q_i·rel_pos_h[dh] + q_i·rel_pos_w[dw] (q unscaled) between spatial tokens (0 when i or j is the
class token, or without tables). Spatial tokens are row-major after the optional class token.
The index dh of query row qh and key row kh is trunc(qh·max(k_h/q_h, 1) − kh·max(q_h/k_h, 1) +
(k_h − 1)·max(q_h/k_h, 1)) evaluated as timm's cal_rel_pos_type does: in float32, one rounding per
operation (ratios and offset rounded from Python doubles), truncated (`rel_pos_index`); dw likewise.
This reference materialises the Nq×Nk scores (the fused kernels do not).
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ._util import compute_dtype, up


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float (x >= 0, normal range)."""
    if x == 0:
        return 0.0
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2**24), e - 24)


def rel_pos_ratios(q_len: int, k_len: int) -> tuple[float, float, float]:
    """(q ratio, k ratio, offset) of one axis as float32 values, as torch rounds timm's Python floats:
    max(k/q, 1), max(q/k, 1) and (k − 1)·max(q/k, 1) (the product formed in double)."""
    k_ratio = max(q_len / k_len, 1.0)
    return _f32(max(k_len / q_len, 1.0)), _f32(k_ratio), _f32((k_len - 1) * k_ratio)


def rel_pos_index(q_len: int, k_len: int, device=None) -> Tensor:
    """(q_len, k_len) long: the table row of each (query, key) position along one axis, timm's float32
    arithmetic (computed on CPU, where no operation is fused)."""
    qr, kr, offset = rel_pos_ratios(q_len, k_len)
    x = torch.arange(q_len, dtype=torch.float32).unsqueeze(1) * qr
    y = torch.arange(k_len, dtype=torch.float32).unsqueeze(0) * kr
    return ((x - y) + offset).long().to(device)


def rel_pos_length(q_len: int, k_len: int) -> int:
    """The table length an axis needs: largest index + 1 (the last query row against the first key;
    every float32 step is monotonic). Plain Python floats: cheap, and constant under torch.compile."""
    qr, _, offset = rel_pos_ratios(q_len, k_len)
    return int(_f32(_f32((q_len - 1) * qr) + offset)) + 1


def rel_pos_terms(q_sp: Tensor, q_hw: Sequence[int], k_hw: Sequence[int], rel_pos_h: Tensor, rel_pos_w: Tensor):
    """relh (..., q_h·q_w, k_h) and relw (..., q_h·q_w, k_w) of the spatial queries q_sp (..., q_h·q_w, D):
    relh[..., i, kh] = q_i·rel_pos_h[dh(qh(i), kh)], relw likewise."""
    (qh, qw), (kh, kw) = q_hw, k_hw
    lead, d = q_sp.shape[:-2], q_sp.shape[-1]
    r = q_sp.reshape(*lead, qh, qw, d)
    th = rel_pos_h[rel_pos_index(qh, kh, q_sp.device)]  # (q_h, k_h, D)
    tw = rel_pos_w[rel_pos_index(qw, kw, q_sp.device)]  # (q_w, k_w, D)
    relh = torch.einsum("...hwd,hkd->...hwk", r, th).reshape(*lead, qh * qw, kh)
    relw = torch.einsum("...hwd,wkd->...hwk", r, tw).reshape(*lead, qh * qw, kw)
    return relh, relw


def pool_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_hw: Sequence[int],
    k_hw: Sequence[int],
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    has_cls_token: bool = True,
    residual: bool = True,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, Nq, heads·D) in q's dtype, lse (B, heads, Nq) float32): lse is the natural-log
    logsumexp of each score row scale·q_i·k_j + R[i, j]."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if rel_pos_h is not None:
        sp = 1 if has_cls_token else 0
        relh, relw = rel_pos_terms(qc[:, :, sp:], q_hw, k_hw, up(rel_pos_h, ct), up(rel_pos_w, ct))
        kh, kw = k_hw
        r = (relh.unsqueeze(-1) + relw.unsqueeze(-2)).reshape(b, h, nq - sp, kh * kw)
        s = s + F.pad(r, (sp, 0, sp, 0))  # zero rows / columns for the class token
    # The row max only shifts the exponent (softmax is shift invariant): no gradient through it.
    m = s.detach().amax(dim=-1, keepdim=True) if nk > 0 else s.new_zeros(*s.shape[:-1], 1)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p / denom, vc)
    if residual:
        o = o + qc
    out = o.transpose(1, 2).reshape(b, nq, h * d).to(q.dtype)
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse.detach().float()


def pool_attention(*args, **kwargs) -> Tensor:
    """The output (B, Nq, heads·D) of `pool_attention_with_lse` (the same arguments)."""
    return pool_attention_with_lse(*args, **kwargs)[0]
