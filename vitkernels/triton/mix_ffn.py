"""Triton kernel for ``vitkernels.mix_ffn``: depthwise conv + GELU + fc2 in one pass (forward).

Math: h (B, N = H·W, hidden) = act(fc1(x)) in token layout (n = r·W + c), dw weight (hidden, 1, k, k),
k odd, P = k // 2, h taken as 0 outside the H×W map (zero padding P, stride 1):

    z[b, n, j] = dw_bias[j] + Σ_{i,l<k} dw_weight[j, 0, i, l] · h[b, r + i − P, c + l − P, j]
    g = GELU_erf(z), rounded to h's dtype (as the composite's dwconv output is)
    y[b, n, o] = fc2_bias[o] + Σ_j g[b, n, j] · fc2_weight[o, j]

g never leaves the chip: ``_mix_ffn_fwd_kernel`` runs one program per BLOCK_H × BLOCK_W tokens of
one image × BLOCK_N output channels and loops over hidden chunks of BLOCK_K channels; per chunk it
loads the tile's h (the k² taps read the one-pixel halo, cache-resident), forms z in fp32, applies
GELU, and accumulates g · fc2_weightᵀ with tl.dot in fp32. Layout: h with channel stride 1 and any
batch / token strides; fc2_weight any strides; y contiguous (B, N, C_out). The backward recomputes
g through the dwconv op (vitkernels/ops/mix_ffn.py). Autotuned on a GPU, ``INTERPRET_TILE`` under
TRITON_INTERPRET=1. Design notes, cost and versions: docs/mix_ffn.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch as launch
from ._launch import use_fixed  # module globals: tests patch them here
from .dwconv import (
    _add_bias,
    _check_map,
    _conv_tile,
    _gelu,
    _pixel_program,
    _store_pixels,
    _tile_coords,
    _weight_table,
    _wide,
)

__all__ = ["mix_ffn_bytes", "mix_ffn_flops", "mix_ffn_forward"]

# Tile used under the interpreter (CPU): (BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K). Small on purpose, so
# ragged tiles in every axis (rows, columns, output channels, hidden chunks) run at the test shapes.
INTERPRET_TILE = (2, 8, 16, 16)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mix_ffn_fwd_kernel(
    HIN,
    WT,
    DW_BIAS,
    W2,
    BIAS,
    OUT,
    H,
    W,
    HIDDEN,
    C_OUT,
    stride_hb,
    stride_hn,
    stride_w2o,
    stride_w2j,
    stride_ob,
    stride_on,
    K: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    # Output-channel blocks of one token tile are neighbours in launch order: they read the same h.
    b, th, tw, nb = _pixel_program(H, W, tl.cdiv(C_OUT, BLOCK_N), BLOCK_H, BLOCK_W)
    h, w, o, o_ok = _tile_coords(th, tw, nb, C_OUT, BLOCK_H, BLOCK_W, BLOCK_N)
    h_base = HIN + b.to(tl.int64) * stride_hb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, HIDDEN, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < HIDDEN
        # Zero past the hidden width (masked loads and weights) -> GELU(0) = 0 and zero fc2 rows.
        z = _conv_tile(h_base, WT, h, w, j, j_ok, H, W, HIDDEN, stride_hn, K, WIDE, BLOCK_M, BLOCK_K)
        if HAS_DW_BIAS:
            z = _add_bias(z, DW_BIAS, j, j_ok)
        g = _gelu(z)
        w2 = tl.load(
            W2 + o[None, :] * stride_w2o + j[:, None] * stride_w2j, mask=j_ok[:, None] & o_ok[None, :], other=0.0
        )
        acc = tl.dot(g.to(W2.dtype.element_ty), w2, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = _add_bias(acc, BIAS, o, o_ok)
    _store_pixels(OUT, b, h, w, o, o_ok, acc, H, W, stride_ob, stride_on, WIDE)


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------

# (BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K, num_warps), one stage (the k² tap loads are not pipelined).
# 64–128 tokens × 64–128 output channels; BLOCK_N ≥ C_out computes the conv once per token tile, a
# smaller one recomputes it per output block. fp32 (exact "ieee" dots on FMA units) takes smaller tiles.
_TILE = ("BLOCK_H", "BLOCK_W", "BLOCK_N", "BLOCK_K")
_HALF_TILES = [(8, 8, 64, 32, 4), (4, 16, 64, 32, 4), (8, 16, 64, 32, 4), (8, 16, 64, 64, 8), (4, 16, 128, 32, 4)]
_HALF_TILES += [(8, 16, 128, 32, 8), (2, 16, 64, 64, 4), (4, 8, 32, 32, 2)]
_FP32_TILES = [(8, 8, 64, 16, 4), (4, 16, 64, 32, 4), (8, 16, 64, 16, 8), (4, 16, 128, 32, 8), (4, 8, 32, 16, 2)]
_CONFIGS = {
    "half": (launch.configs(_TILE, _HALF_TILES, num_stages=1),),
    "fp32": (launch.configs(_TILE, _FP32_TILES, num_stages=1),),
}


def _prune(configs, named_args, **kwargs):
    """Keep tiles that do not overshoot the map, C_out or the hidden width by more than a power of two."""
    h, w, hidden, c_out = (max(int(named_args[n]), 1) for n in ("H", "W", "HIDDEN", "C_OUT"))
    cap_h, cap_w = launch.next_pow2(h), max(16, launch.next_pow2(w))
    cap_n, cap_k = max(32, launch.next_pow2(c_out)), max(32, launch.next_pow2(hidden))
    kept = [
        cf
        for cf in configs
        if cf.kwargs["BLOCK_H"] <= cap_h
        and cf.kwargs["BLOCK_W"] <= cap_w
        and cf.kwargs["BLOCK_N"] <= cap_n
        and cf.kwargs["BLOCK_K"] <= cap_k
    ]
    return kept or [min(configs, key=lambda cf: cf.kwargs["BLOCK_H"] * cf.kwargs["BLOCK_W"] * cf.kwargs["BLOCK_N"])]


_KEY = ["H", "W", "HIDDEN", "C_OUT", "K", "HAS_DW_BIAS", "HAS_BIAS", "WIDE", "PRECISION"]
_TUNED = launch.tuned_table(_CONFIGS, [(_mix_ffn_fwd_kernel, dict(key=_KEY, prune=_prune))])

# triton.jit decides at decoration (import) time whether kernels are interpreted.
_INTERPRETED = launch.is_interpreted(_mix_ffn_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _check(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias):
    B, N, hidden, H, W, k = _check_map(h, hw, dw_weight, "h", "hidden", "dw_weight")
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight must be (C_out, hidden) with hidden = {hidden}, got {tuple(fc2_weight.shape)}")
    c_out = fc2_weight.shape[0]
    for name, b, n in (("dw_bias", dw_bias, hidden), ("fc2_bias", fc2_bias, c_out)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must be ({n},), got {tuple(b.shape)}")
    if fc2_weight.dtype != h.dtype:
        raise ValueError(f"fc2_weight has dtype {fc2_weight.dtype}, h {h.dtype}: they must match")
    return B, N, hidden, c_out, H, W, k


def mix_ffn_forward(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias):
    """GELU(dwconv(h) + dw_bias) · fc2_weightᵀ + fc2_bias -> a new contiguous (B, H·W, C_out) tensor
    of h's dtype; h is (B, H·W, hidden) (the fc1 output), biases may be None."""
    B, N, hidden, c_out, H, W, k = _check(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias)
    h = launch.unit_last(h)
    out = torch.empty((B, N, c_out), device=h.device, dtype=h.dtype)
    if out.numel() == 0:
        return out
    with launch.device_ctx(h):
        wt = _weight_table(dw_weight)
        dwb = wt if dw_bias is None else dw_bias.contiguous()  # without a bias: a placeholder pointer
        b2 = wt if fc2_bias is None else fc2_bias.contiguous()
        args = (h, wt, dwb, fc2_weight, b2, out, H, W, hidden, c_out, *launch.strides(h, fc2_weight, out))
        wide = _wide((N, h.stride(1), hidden), (N, out.stride(1), c_out))
        meta = {"K": k, "HAS_DW_BIAS": dw_bias is not None, "HAS_BIAS": fc2_bias is not None, "WIDE": wide}
        meta["PRECISION"] = launch.precision(h.dtype)

        def grid(m):
            return (B * launch.cdiv(H, m["BLOCK_H"]) * launch.cdiv(W, m["BLOCK_W"]) * launch.cdiv(c_out, m["BLOCK_N"]),)

        fixed = use_fixed(h, _INTERPRETED, "mix_ffn")
        if fixed:
            bh, bw, bn, bk = INTERPRET_TILE
            tile = {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_N": bn, "BLOCK_K": bk}
            _mix_ffn_fwd_kernel[grid(tile)](*args, **meta, **launch.fixed_meta(True, **tile))
        else:
            launch.pick(False, _mix_ffn_fwd_kernel, _TUNED, h.dtype, 0)[grid](*args, **meta)
    return out


def mix_ffn_flops(B, N, hidden, c_out, k=3):
    """What the fused kernel computes: 2·k²·B·N·hidden (conv) + 2·B·N·hidden·C_out (fc2)."""
    return 2 * k * k * B * N * hidden + 2 * B * N * hidden * c_out


def mix_ffn_bytes(B, N, hidden, c_out, itemsize):
    """HBM floor of the fused kernel: read h once, write y once (weights aside)."""
    return B * N * (hidden + c_out) * itemsize
