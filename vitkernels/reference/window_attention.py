"""Swin W-MSA / SW-MSA on un-partitioned tokens, by index math.

Instead of materially padding, rolling and partitioning the map, the reference builds, once per
geometry, the source token of every window slot (or the padding token) and gathers. The result is
exactly SPEC.md's recipe: pad bottom/right to multiples of M (padded qkv = qkv_bias), cyclic shift
y[h, w] = x[(h+s) mod Hp, (w+s) mod Wp], M×M windows (slot t = p·M + q), softmax(q·kᵀ·scale +
B_rel + mask)·v, reverse partition, shift back, crop.

`shift_first=True` (timm's order) shifts the unpadded map instead, y[h, w] = x[(h+s) mod H,
(w+s) mod W], and pads afterwards: only the slot → token map changes; the region labels and the
mask stay those of the padded grid. `logit_scale` (Swin V2) replaces q·kᵀ·scale by
(q̂·k̂ᵀ)·exp(min(logit_scale_h, ln 100)) with q̂, k̂ = F.normalize(·, dim=-1) (eps 1e-12), as timm's
and Hugging Face's Swin V2 attention compute it.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._util import compute_dtype
from .attention import attention_with_lse

LOGIT_SCALE_MAX = math.log(100.0)  # Swin V2 clamps the logit scale at ln(1 / 0.01)


def window_geometry(h: int, w: int, m: int, s: int, device=None, shift_first: bool = False):
    """Index tensors of one (H, W, M, s) geometry.

    Returns (src, region, hp, wp): src (nW·N,) is the token index x[h·W + w] that fills each window
    slot in window order, or H·W for a padded slot; region (nW·N,) is the 3·r_h + r_w label of the
    slot's position on the shifted padded grid (used only for the shift mask). With `shift_first`
    the shift is cyclic over the unpadded H×W map and the padding comes after it (timm's order).
    """
    hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
    ar = torch.arange(m, device=device)
    # shifted-grid coordinates of each slot, window-major: (nWh, nWw, p, q)
    ys = (torch.arange(hp // m, device=device)[:, None] * m + ar).reshape(-1, 1, m, 1)
    xs = (torch.arange(wp // m, device=device)[:, None] * m + ar).reshape(1, -1, 1, m)
    ys, xs = torch.broadcast_tensors(ys, xs)
    if shift_first:  # pad after the shift: positions past H or W are padding, the rest wrap over H, W
        real = (ys < h) & (xs < w)
        rows, cols = (ys + s) % h, (xs + s) % w
    else:  # shift the padded map: each shifted position reads the padded map
        rows, cols = (ys + s) % hp, (xs + s) % wp
        real = (rows < h) & (cols < w)
    src = torch.where(real, rows * w + cols, torch.full_like(rows, h * w))

    def region(coord, size):  # slices [0, size-M), [size-M, size-s), [size-s, size)
        return (coord >= size - m).long() + (coord >= size - s).long() if s > 0 else torch.zeros_like(coord)

    label = 3 * region(ys, hp) + region(xs, wp)
    return src.reshape(-1), label.reshape(-1), hp, wp


def relative_position_index(m: int, device=None) -> Tensor:
    """(N, N) index into the ((2M-1)², heads) table: (p_i-p_j+M-1)·(2M-1) + (q_i-q_j+M-1)."""
    p = torch.arange(m, device=device).repeat_interleave(m)
    q = torch.arange(m, device=device).repeat(m)
    return (p[:, None] - p[None, :] + m - 1) * (2 * m - 1) + (q[:, None] - q[None, :] + m - 1)


def cosine_logit_scale(logit_scale: Tensor, num_heads: int, dtype) -> Tensor:
    """exp(min(logit_scale, ln 100)) as (heads, 1, 1) in `dtype` (torch.clamp: zero gradient where
    clamped, as timm and Hugging Face compute it)."""
    return torch.clamp(logit_scale.to(dtype).reshape(num_heads, 1, 1), max=LOGIT_SCALE_MAX).exp()


def window_attention(
    qkv: Tensor,
    hw,
    num_heads: int,
    window_size: int,
    shift_size: int = 0,
    rel_pos_bias_table: Optional[Tensor] = None,
    qkv_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    logit_scale: Optional[Tensor] = None,
    shift_first: bool = False,
) -> Tensor:
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    h, w = int(hw[0]), int(hw[1])
    m, s = int(window_size), int(shift_size)
    nt = m * m
    src, label, hp, wp = window_geometry(h, w, m, s, qkv.device, shift_first)
    nw = (hp // m) * (wp // m)

    pad_token = qkv_bias if qkv_bias is not None else qkv.new_zeros(c3)
    padded = torch.cat([qkv, pad_token.to(qkv.dtype).reshape(1, 1, c3).expand(b, 1, c3)], dim=1)
    win = padded[:, src].reshape(b, nw, nt, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, D)

    bias = None
    if rel_pos_bias_table is not None:
        rel = rel_pos_bias_table[relative_position_index(m, qkv.device).reshape(-1)]  # (N·N, heads)
        bias = rel.reshape(nt, nt, num_heads).permute(2, 0, 1)  # (heads, N, N)
    if s > 0:
        lab = label.reshape(nw, 1, nt)
        mask = torch.where(lab.transpose(-1, -2) != lab, -100.0, 0.0).to(qkv.dtype).unsqueeze(1)  # (nW, 1, N, N)
        bias = mask if bias is None else bias + mask
    if logit_scale is None:
        out = attention_with_lse(win[0], win[1], win[2], bias, scale)[0]  # (B, nW, heads, N, D)
    else:  # Swin V2 cosine attention: the scale is the clamped exp(logit_scale) of each head
        ct = compute_dtype(qkv.dtype)
        qn = F.normalize(win[0].to(ct), dim=-1, eps=1e-12)
        kn = F.normalize(win[1].to(ct), dim=-1, eps=1e-12)
        scores = torch.matmul(qn, kn.transpose(-1, -2)) * cosine_logit_scale(logit_scale, num_heads, ct)
        if bias is not None:
            scores = scores + bias.to(ct)
        out = torch.matmul(scores.softmax(dim=-1), win[2].to(ct)).to(qkv.dtype)

    out = out.permute(0, 1, 3, 2, 4).reshape(b, nw * nt, c)
    # Every real token fills exactly one slot: invert the gather to return to token order.
    slot = torch.empty(h * w, dtype=torch.long, device=qkv.device)
    valid = src < h * w
    slot[src[valid]] = torch.arange(nw * nt, device=qkv.device)[valid]
    return out[:, slot]
