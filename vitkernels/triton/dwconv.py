"""Triton kernels for ``vitkernels.dwconv``: depthwise k×k conv on token layout, activation fused.

Math: x (B, N = H·W, C) in token layout (n = h·W + w), weight (C, 1, k, k), k odd, P = k // 2,
x taken as 0 outside the H×W map (zero padding P, stride 1):

    z[b, h, w, c] = bias[c] + Σ_{i,j<k} weight[c, 0, i, j] · x[b, h + i − P, w + j − P, c]
    y = act(z),   act ∈ {identity, GELU exact erf, ReLU}
    backward: dz = dy · act'(z) (z recomputed), dx = the same conv of dz with the spatially flipped
    kernel, dweight[c, 0, i, j] = Σ_{b,h,w} dz · x_shifted(i, j), dbias[c] = Σ_{b,h,w} dz

Layout: x with channel stride 1 and any batch / token strides (a channel slice is read in place);
outputs contiguous (B, H·W, C). ``_dwconv_kernel``: one program per BLOCK_H × BLOCK_W pixels ×
BLOCK_C channels tile, fp32 accumulation, one store (forward, and dx in the backward);
``_dwconv_bwd_v2_kernel``: dz (in x's dtype; with no activation dx itself) and per-program fp32
dweight / dbias partials, accumulated per thread across a band of rows and summed by torch
(deterministic); ``_dwconv_bwd_reduce_kernel``: the v1 backward (VITKERNELS_DWCONV_KERNEL=v1).
Autotuned on a GPU, ``INTERPRET_TILE`` under TRITON_INTERPRET=1. Design notes, cost and versions:
docs/dwconv.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from . import _launch as launch
from ._launch import use_fixed  # module globals: tests patch them here

__all__ = ["dwconv_backward", "dwconv_bytes", "dwconv_flops", "dwconv_forward"]

_ACT = {None: 0, "gelu": 1, "relu": 2}
_INT32_MAX = 2**31 - 1

# Tile used under the interpreter (CPU): (BLOCK_H, BLOCK_W, BLOCK_C, BAND). Small on purpose, so
# ragged tiles in every axis are exercised at the test shapes.
INTERPRET_TILE = (2, 8, 16, 2)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pixel_program(H, W, n_inner, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(b, th, tw, inner) of this program on a 1-D grid, pid = ((b·n_th + th)·n_tw + tw)·n_inner + inner: the
    BLOCK_H × BLOCK_W pixel tile (th, tw) of image b and the innermost (channel) block."""
    n_th = tl.cdiv(H, BLOCK_H)
    n_tw = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    inner = pid % n_inner
    r = pid // n_inner
    tw = r % n_tw
    r = r // n_tw
    th = r % n_th
    return r // n_th, th, tw, inner


@triton.jit
def _tile_coords(th, tw, cb, C, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """(h, w, c, c_ok): the pixel rows and columns of tile (th, tw) and the channels of block cb."""
    offs_m = tl.arange(0, BLOCK_H * BLOCK_W)
    h = th * BLOCK_H + offs_m // BLOCK_W
    w = tw * BLOCK_W + offs_m % BLOCK_W
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return h, w, c, c < C


@triton.jit
def _token_off(hh, ww, W, stride_n, WIDE: tl.constexpr):
    tok = hh * W + ww
    if WIDE:
        return tok.to(tl.int64) * stride_n
    else:
        return tok * stride_n


@triton.jit
def _tap_tile(x_base, hh, row_ok, ww, c, c_ok, W, stride_n, WIDE: tl.constexpr):
    """The (BLOCK_M, BLOCK_C) x tile one tap reads: pixels (hh, ww) (hh in the map where row_ok), channels c;
    zero outside the map."""
    ok = row_ok & (ww >= 0) & (ww < W)
    off = _token_off(hh, ww, W, stride_n, WIDE)
    return tl.load(x_base + off[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _add_bias(acc, BIAS, c, c_ok):
    """acc (rows, channels c) plus the bias of its channels, in fp32."""
    return acc + tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gelu(z):
    """GELU with the exact erf, in fp32."""
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    """GELU′(z) = Φ(z) + z·φ(z) in fp32 (Φ = (1 + erf(z/√2))/2, φ = exp(−z²/2)/√(2π))."""
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _store_pixels(OUT, b, h, w, c, c_ok, x, H, W, stride_ob, stride_on, WIDE: tl.constexpr):
    """Store x (pixels (h, w) of image b, channels c) to a token-layout output in its element type."""
    ok = (h < H) & (w < W)
    off = _token_off(h, w, W, stride_on, WIDE)
    o_base = OUT + b.to(tl.int64) * stride_ob
    tl.store(o_base + off[:, None] + c[None, :], x.to(OUT.dtype.element_ty), mask=ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_tile(
    x_base,
    wt_ptr,
    h,
    w,
    c,
    c_ok,
    H,
    W,
    C,
    stride_n,
    K: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Σ_taps wt[tap, c] · x[h + i − P, w + j − P, c] in fp32 (zero outside the map)."""
    P: tl.constexpr = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # Runtime (not static) tap loops: unrolled, the scheduler hoists all k² tile loads and spills.
    for i in range(K):
        hh = h + (i - P)
        row_ok = (hh >= 0) & (hh < H)
        for j in range(K):
            xv = _tap_tile(x_base, hh, row_ok, w + (j - P), c, c_ok, W, stride_n, WIDE)
            wv = tl.load(wt_ptr + (i * K + j) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    return acc


@triton.jit
def _dwconv_kernel(
    X,
    WT,
    BIAS,
    OUT,
    H,
    W,
    C,
    stride_xb,
    stride_xn,
    stride_ob,
    stride_on,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """act(conv + bias) of one BLOCK_H × BLOCK_W pixel tile × BLOCK_C channels."""
    b, th, tw, cb = _pixel_program(H, W, tl.cdiv(C, BLOCK_C), BLOCK_H, BLOCK_W)
    h, w, c, c_ok = _tile_coords(th, tw, cb, C, BLOCK_H, BLOCK_W, BLOCK_C)
    x_base = X + b.to(tl.int64) * stride_xb
    acc = _conv_tile(x_base, WT, h, w, c, c_ok, H, W, C, stride_xn, K, WIDE, BLOCK_H * BLOCK_W, BLOCK_C)
    if HAS_BIAS:
        acc = _add_bias(acc, BIAS, c, c_ok)
    if ACT == 1:
        acc = _gelu(acc)
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    _store_pixels(OUT, b, h, w, c, c_ok, acc, H, W, stride_ob, stride_on, WIDE)


@triton.jit
def _band_program(n_band, n_tw, n_cb):
    """(b, band, tw, cb, sp) of a backward program: pid = sp·n_cb + cb with the spatial index
    sp = (b·n_band + band)·n_tw + tw (a band of sub-tile rows of column strip tw of image b)."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    sp = pid // n_cb
    tw = sp % n_tw
    r = sp // n_tw
    return r // n_band, r % n_band, tw, cb, sp


@triton.jit
def _act_grad(
    dy,
    x_base,
    WT,
    BIAS,
    h,
    w,
    c,
    c_ok,
    H,
    W,
    C,
    stride_xn,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dz = dy·act′(z) in fp32 with z = conv(x) + bias recomputed for pixels (h, w), channels c."""
    z = _conv_tile(x_base, WT, h, w, c, c_ok, H, W, C, stride_xn, K, WIDE, BLOCK_M, dy.shape[1])
    if HAS_BIAS:
        z = _add_bias(z, BIAS, c, c_ok)
    if ACT == 1:
        return dy.to(tl.float32) * _gelu_grad(z)
    else:
        return tl.where(z > 0.0, dy.to(tl.float32), 0.0)


@triton.jit
def _dwconv_bwd_reduce_kernel(
    X,
    DY,
    WT,
    BIAS,
    DZ,
    PDW,
    PDB,
    H,
    W,
    C,
    n_band,
    n_tw,
    n_cb,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    stride_zb,
    stride_zn,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BAND: tl.constexpr,
    KK_PAD: tl.constexpr,
):
    P: tl.constexpr = K // 2
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    b, band, tw, cb, sp = _band_program(n_band, n_tw, n_cb)
    x_base = X + b.to(tl.int64) * stride_xb
    y_base = DY + b.to(tl.int64) * stride_yb
    z_base = DZ + b.to(tl.int64) * stride_zb
    taps = tl.arange(0, KK_PAD)
    dw_acc = tl.zeros((KK_PAD, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(BAND):
        h, w, c, c_ok = _tile_coords(band * BAND + s, tw, cb, C, BLOCK_H, BLOCK_W, BLOCK_C)
        ok = ((h < H) & (w < W))[:, None] & c_ok[None, :]
        dz = tl.load(y_base + _token_off(h, w, W, stride_yn, WIDE)[:, None] + c[None, :], mask=ok, other=0.0)
        dz = dz.to(tl.float32)
        if ACT != 0:
            dz = _act_grad(dz, x_base, WT, BIAS, h, w, c, c_ok, H, W, C, stride_xn, K, HAS_BIAS, ACT, WIDE, BLOCK_M)
            tl.store(z_base + _token_off(h, w, W, stride_zn, WIDE)[:, None] + c[None, :], dz, mask=ok)
        db_acc += tl.sum(dz, axis=0)
        for i in range(K):
            hh = h + (i - P)
            row_ok = (hh >= 0) & (hh < H)
            for j in range(K):
                xv = _tap_tile(x_base, hh, row_ok, w + (j - P), c, c_ok, W, stride_xn, WIDE)
                part = tl.sum(dz * xv.to(tl.float32), axis=0)
                dw_acc += tl.where(taps[:, None] == i * K + j, part[None, :], 0.0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    pdw = PDW + sp.to(tl.int64) * (K * K * C)
    tl.store(pdw + taps[:, None] * C + c[None, :], dw_acc, mask=(taps < K * K)[:, None] & c_ok[None, :])
    tl.store(PDB + sp.to(tl.int64) * C + c, db_acc, mask=c_ok)


@triton.jit
def _tap_gather(x_base, h, w, c, c_ok, H, W, stride_n, K: tl.constexpr, KK_PAD: tl.constexpr, WIDE: tl.constexpr):
    """(KK_PAD, BLOCK_M, BLOCK_C) tile: row t = i·K + j holds x at pixels (h + i − P, w + j − P), channels c;
    zero outside the map and for the padding taps t ≥ K²."""
    P: tl.constexpr = K // 2
    taps = tl.arange(0, KK_PAD)
    hh = h[None, :] + (taps // K - P)[:, None]
    ww = w[None, :] + (taps % K - P)[:, None]
    ok = (taps < K * K)[:, None] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    off = _token_off(hh, ww, W, stride_n, WIDE)
    return tl.load(x_base + off[:, :, None] + c[None, None, :], mask=ok[:, :, None] & c_ok[None, None, :], other=0.0)


@triton.jit
def _dwconv_bwd_v2_kernel(
    X,
    DY,
    WT,
    WT_FLIP,
    BIAS,
    DZ,
    PDW,
    PDB,
    H,
    W,
    C,
    n_band,
    n_tw,
    n_cb,
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,
    stride_zb,
    stride_zn,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BAND: tl.constexpr,
    KK_PAD: tl.constexpr,
):
    """dweight / dbias partials of a band of BAND sub-tiles, and per pixel either dz = dy·act′(z) (ACT ≠ 0,
    stored in DZ's dtype for the dx conv) or, with no activation, dx itself (the conv of dy with the flipped
    kernel, so dy is read once). The products dz·x_shift of every tap are summed per thread across the band in
    a (KK_PAD, BLOCK_M, BLOCK_C) fp32 tile and reduced over pixels once per program."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    b, band, tw, cb, sp = _band_program(n_band, n_tw, n_cb)
    x_base = X + b.to(tl.int64) * stride_xb
    y_base = DY + b.to(tl.int64) * stride_yb
    z_base = DZ + b.to(tl.int64) * stride_zb
    dw_acc = tl.zeros((KK_PAD, BLOCK_M, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for s in range(BAND):
        h, w, c, c_ok = _tile_coords(band * BAND + s, tw, cb, C, BLOCK_H, BLOCK_W, BLOCK_C)
        ok = ((h < H) & (w < W))[:, None] & c_ok[None, :]
        z_off = _token_off(h, w, W, stride_zn, WIDE)[:, None] + c[None, :]
        dz = tl.load(y_base + _token_off(h, w, W, stride_yn, WIDE)[:, None] + c[None, :], mask=ok, other=0.0)
        if ACT != 0:
            dz = _act_grad(dz, x_base, WT, BIAS, h, w, c, c_ok, H, W, C, stride_xn, K, HAS_BIAS, ACT, WIDE, BLOCK_M)
            tl.store(z_base + z_off, dz, mask=ok)
        else:
            dz = dz.to(tl.float32)
            dx = _conv_tile(y_base, WT_FLIP, h, w, c, c_ok, H, W, C, stride_yn, K, WIDE, BLOCK_M, BLOCK_C)
            tl.store(z_base + z_off, dx, mask=ok)
        db_acc += dz
        xs = _tap_gather(x_base, h, w, c, c_ok, H, W, stride_xn, K, KK_PAD, WIDE)
        dw_acc += xs.to(tl.float32) * dz[None, :, :]
    taps = tl.arange(0, KK_PAD)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    pdw = PDW + sp.to(tl.int64) * (K * K * C)
    tap_ok = (taps < K * K)[:, None] & c_ok[None, :]
    tl.store(pdw + taps[:, None] * C + c[None, :], tl.sum(dw_acc, axis=1), mask=tap_ok)
    tl.store(PDB + sp.to(tl.int64) * C + c, tl.sum(db_acc, axis=0), mask=c_ok)


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


# (BLOCK_H, BLOCK_W, BLOCK_C, num_warps), one stage: 64–256 pixels × 32–128 channels.
_CONFIGS = launch.configs(
    ("BLOCK_H", "BLOCK_W", "BLOCK_C"),
    [
        (4, 16, 64, 4),
        (8, 8, 64, 4),
        (2, 32, 64, 4),
        (4, 8, 128, 4),
        (8, 16, 32, 4),
        (4, 16, 128, 8),
        (8, 16, 64, 8),
        (1, 32, 128, 4),
        (2, 16, 32, 2),
        (1, 16, 64, 2),
    ],
    num_stages=1,
)


def _prune(configs, named_args, **kwargs):
    """Keep tiles that do not overshoot the map / channel count by more than one power of two."""
    h, w, c = (max(int(named_args[n]), 1) for n in ("H", "W", "C"))
    cap_h, cap_w = launch.next_pow2(h), launch.next_pow2(w)
    cap_c = max(32, launch.next_pow2(c))
    kept = [
        cf
        for cf in configs
        if cf.kwargs["BLOCK_H"] <= cap_h and cf.kwargs["BLOCK_W"] <= max(16, cap_w) and cf.kwargs["BLOCK_C"] <= cap_c
    ]
    return kept or [min(configs, key=lambda cf: cf.kwargs["BLOCK_H"] * cf.kwargs["BLOCK_W"] * cf.kwargs["BLOCK_C"])]


_tuned_kernel = launch.autotuned(
    _dwconv_kernel, _CONFIGS, key=["H", "W", "C", "K", "ACT", "HAS_BIAS", "WIDE"], prune=_prune
)

# triton.jit decides at decoration (import) time whether kernels are interpreted.
_INTERPRETED = launch.is_interpreted(_dwconv_kernel)


def _use_fixed(t: torch.Tensor) -> bool:
    return use_fixed(t, _INTERPRETED, "dwconv")


def kernel_version() -> str:
    """ "v2" (the default) or "v1" (VITKERNELS_DWCONV_KERNEL=v1: the first backward, kept for A/B runs)."""
    value = _env.get("VITKERNELS_DWCONV_KERNEL")
    if value not in ("auto", "v1"):
        raise ValueError(f"VITKERNELS_DWCONV_KERNEL={value!r}: expected auto or v1")
    return "v1" if value == "v1" else "v2"


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_map(x, hw, weight, x_name: str = "x", c_name: str = "C", w_name: str = "weight"):
    """(B, N, C, H, W, k) of a token-layout map x (B, N = H·W, C) and a depthwise weight (C, 1, k, k), k odd,
    after the checks (the names are the caller's, for the messages)."""
    if x.dim() != 3:
        raise ValueError(f"{x_name} must be (B, H·W, {c_name}), got shape {tuple(x.shape)}")
    launch.check_dtype(x_name, x)
    B, N, C = x.shape
    H, W = int(hw[0]), int(hw[1])
    if H * W != N:
        raise ValueError(f"hw = ({H}, {W}) does not match the {N} tokens of {x_name} {tuple(x.shape)}")
    k = weight.shape[-1]
    if tuple(weight.shape) != (C, 1, k, k) or k % 2 == 0:
        raise ValueError(
            f"{w_name} must be ({c_name}, 1, k, k) with {c_name} = {C} and k odd, got {tuple(weight.shape)}"
        )
    return B, N, C, H, W, k


def _check(x, hw, weight, bias):
    B, N, C, H, W, k = _check_map(x, hw, weight)
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must be ({C},), got {tuple(bias.shape)}")
    return B, N, C, H, W, k


def _weight_table(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(C, 1, k, k) → (k², C) float32, contiguous per tap (flipped spatially for the transposed conv)."""
    C, k = weight.shape[0], weight.shape[-1]
    w = weight.reshape(C, k, k)
    if flip:
        w = w.flip(1, 2)
    return w.reshape(C, k * k).t().to(torch.float32).contiguous()


def _wide(*pairs) -> bool:
    """True when an in-image token offset (N · token stride + C) can pass int32."""
    return any(n * s + c > _INT32_MAX for n, s, c in pairs)


def _launch_conv(src, wt, bias, out, H, W, k, act):
    B, N, C = src.shape
    wide = _wide((N, src.stride(1), C), (N, out.stride(1), C))
    args = (src, wt, bias if bias is not None else wt, out, H, W, C, *launch.strides(src, out))
    meta = {"K": k, "HAS_BIAS": bias is not None, "ACT": act, "WIDE": wide}

    def grid(m):
        return (B * launch.cdiv(H, m["BLOCK_H"]) * launch.cdiv(W, m["BLOCK_W"]) * launch.cdiv(C, m["BLOCK_C"]),)

    if _use_fixed(src):
        bh, bw, bc, _ = INTERPRET_TILE
        tile = {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc}
        _dwconv_kernel[grid(tile)](*args, **meta, **tile, num_warps=4)
    else:
        _tuned_kernel[grid](*args, **meta)


def dwconv_forward(x, hw, weight, bias=None, activation=None):
    """act(depthwise_conv(x) + bias) → a new contiguous (B, H·W, C) tensor of x's dtype."""
    B, N, C, H, W, k = _check(x, hw, weight, bias)
    out = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    x = launch.unit_last(x)
    with launch.device_ctx(x):
        wt = _weight_table(weight)
        b = None if bias is None else bias.contiguous()
        _launch_conv(x, wt, b, out, H, W, k, _ACT[activation])
    return out


def _bwd_tile(B, H, W, C, k, fixed):
    """v1 reduce kernel's (BLOCK_H, BLOCK_W, BLOCK_C, BAND): 64-pixel sub-tiles; 32 channels for
    k ≥ 5 so the (next_pow2(k²), BLOCK_C) fp32 dweight accumulator stays in registers."""
    if fixed:
        return INTERPRET_TILE
    bw = min(16, launch.next_pow2(W))
    bh = max(1, 64 // bw) if bw < 16 else 4
    bc = min(64 if k <= 3 else 32, max(16, launch.next_pow2(C)))
    return bh, bw, bc, _band(B, H, W, C, bh, bw, bc, (8, 4, 2))


def _band(B, H, W, C, bh, bw, bc, bands):
    """The longest band (sub-tiles per program) that keeps ≥ ~1024 programs in flight: fewest partials."""
    n_th, n_tw, n_cb = launch.cdiv(H, bh), launch.cdiv(W, bw), launch.cdiv(C, bc)
    for cand in bands:
        if B * launch.cdiv(n_th, cand) * n_tw * n_cb >= 1024:
            return cand
    return 1


def _bwd_v2_tile(B, H, W, C, k, fixed):
    """v2 kernel's (BLOCK_H, BLOCK_W, BLOCK_C, BAND, num_warps): one-row sub-tiles swept down a band of rows,
    sized so the (next_pow2(k²), BLOCK_M, BLOCK_C) fp32 dweight tile is ~32 registers per thread."""
    if fixed:
        return (*INTERPRET_TILE, 4)
    kk = launch.next_pow2(k * k)
    bw = min(8 if kk <= 32 else 4, launch.next_pow2(W))
    bc = min(32, max(16, launch.next_pow2(C)))
    warps = 4 if kk <= 16 else 8
    return 1, bw, bc, _band(B, H, W, C, 1, bw, bc, (64, 32, 16, 8, 4, 2)), warps


def dwconv_backward(dout, x, hw, weight, bias=None, activation=None):
    """(dx, dweight, dbias) of ``dwconv_forward``; dbias is None without a bias.

    dx has x's dtype, dweight / dbias the dtype of weight / bias; the weight and bias reductions
    are fp32 partials per program summed with torch (deterministic).
    """
    B, N, C, H, W, k = _check(x, hw, weight, bias)
    act = _ACT[activation]
    dx = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    if dx.numel() == 0:
        dx.zero_()
        return dx, torch.zeros_like(weight), (None if bias is None else torch.zeros_like(bias))
    x = launch.unit_last(x)
    dout = launch.unit_last(dout.to(x.dtype))
    version = kernel_version()
    fixed = _use_fixed(x)
    if version == "v1":
        bh, bw, bc, band = _bwd_tile(B, H, W, C, k, fixed)
        warps = 4
        dz_dtype = torch.float32  # v1: dz through HBM in fp32
    else:
        bh, bw, bc, band, warps = _bwd_v2_tile(B, H, W, C, k, fixed)
        dz_dtype = x.dtype  # v2: dz rounded to x's dtype, as eager's GELU backward hands it to the conv
    n_th, n_tw, n_cb = launch.cdiv(H, bh), launch.cdiv(W, bw), launch.cdiv(C, bc)
    n_band = launch.cdiv(n_th, band)
    n_sp = B * n_band * n_tw
    with launch.device_ctx(x):
        wt = _weight_table(weight)
        b = None if bias is None else bias.contiguous()
        if act != 0:
            dz = torch.empty((B, N, C), device=x.device, dtype=dz_dtype)
        else:  # dz = dout: v2 writes dx in the reduce kernel itself, v1 convolves dout afterwards
            dz = dx if version == "v2" else dout
        pdw = torch.empty((n_sp, k * k, C), device=x.device, dtype=torch.float32)
        pdb = torch.empty((n_sp, C), device=x.device, dtype=torch.float32)
        wide = _wide((N, x.stride(1), C), (N, dout.stride(1), C), (N, dz.stride(1), C))
        conv = {"K": k, "HAS_BIAS": b is not None, "ACT": act, "WIDE": wide}
        tile = {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc, "BAND": band, "KK_PAD": launch.next_pow2(k * k)}
        strides = launch.strides(x, dout, dz)
        grid = (n_sp * n_cb,)
        flipped = _weight_table(weight, flip=True)
        if version == "v1":
            args = (x, dout, wt, b if b is not None else wt, dz, pdw, pdb, H, W, C, n_band, n_tw, n_cb)
            _dwconv_bwd_reduce_kernel[grid](*args, *strides, **conv, **tile, num_warps=warps)
        else:
            args = (x, dout, wt, flipped, b if b is not None else wt, dz, pdw, pdb, H, W, C, n_band, n_tw, n_cb)
            _dwconv_bwd_v2_kernel[grid](*args, *strides, **conv, **tile, num_warps=warps)
        if act != 0 or version == "v1":
            # dx: the transposed conv = the same conv of dz with the spatially flipped kernel.
            _launch_conv(dz, flipped, None, dx, H, W, k, 0)
        dw = pdw.sum(0).t().reshape(C, 1, k, k).to(weight.dtype)
        db = None if bias is None else pdb.sum(0).to(bias.dtype)
    return dx, dw, db


def dwconv_flops(B, N, C, k, backward=False):
    """2·k²·B·N·C forward, ≈ 2× that backward (dx and dweight)."""
    f = 2 * k * k * B * N * C
    return 2 * f if backward else f


def dwconv_bytes(B, N, C, itemsize, backward=False):
    """HBM floor: read x + write y (forward); read x, dy + write dx (backward)."""
    return (3 if backward else 2) * B * N * C * itemsize
