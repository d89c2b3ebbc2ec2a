"""Fused Triton kernels for ``vitkernels.window_attention`` (Swin W-MSA / SW-MSA, V1 and V2).

Math: qkv (B, L = H·W, 3C) is the qkv linear of the un-shifted, un-partitioned map, C = heads·D;
windows of N = M² slots tile the map padded to Hp × Wp (multiples of M). Slot t = p·M + c of
window (wh, ww) reads token ((wh·M + p + s) mod Hp)·W + (ww·M + c + s) mod Wp (a padded slot takes
the qkv_bias row), and per window and head, in base 2:

    S = q kᵀ·scale + table[rel(i, j), h] − 100·[region_i != region_j],   O = softmax_rows(S) v
    backward: dV = Pᵀ dO, dS = P ∘ (dO vᵀ − delta), dQ = dS k·scale, dK = dSᵀ q·scale,
    dtable = dS binned by rel-pos index, dqkv_bias = Σ over padded key slots of (dK, dV)
    options: SHIFT_FIRST (timm: shift the unpadded map, then pad) changes only slot → token;
    COSINE (Swin V2) uses τ_h·q̂·k̂ᵀ, τ_h = exp(min(logit_scale_h, ln 100)), with its gradients

Layout: qkv read and out (B, L, C) / dqkv (B, L, 3C) written in token layout through index math:
no padded, rolled or partitioned copies, no mask or bias tensors. One program = one head × WPG
windows on a 1-D grid; the backward recomputes the softmax of its resident (≤ 256-key) tile and
keeps every reduction in per-program partials summed by torch (deterministic). Under
TRITON_INTERPRET=1 a fixed config (``INTERPRET_BLOCKS``, ``WINDOWS_PER_PROGRAM``). Index math,
design, cost, registers and versions: docs/window_attention.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch as launch
from ._launch import occupancy, sm_count, use_fixed  # module globals: tests patch them here

__all__ = ["MAX_HEAD_DIM", "window_attention_backward", "window_attention_flops", "window_attention_forward"]

MAX_HEAD_DIM = 128
# Backward: the key set stays resident (one block) up to this many slots (M <= 16).
MAX_RESIDENT_KEYS = 256
LOGIT_SCALE_MAX = 4.605170185988092  # ln 100: Swin V2 clamps the logit scale there

# Interpreter (CPU) configuration; tests patch these to exercise the multi-block paths.
# "fwd": (BLOCK_M, BLOCK_N) or None (BLOCK_M = min(64, next_pow2(N)), keys in one block);
# "bwd": BLOCK_M or None (min(64, next_pow2(N))); "bwd_keys": BLOCK_N or None (resident keys).
INTERPRET_BLOCKS = {"fwd": None, "bwd": None, "bwd_keys": None}
# Windows per program; None chooses per launch (2 under the interpreter, see _windows_per_program).
WINDOWS_PER_PROGRAM = None
# Programs per SM the grid assumed before it followed the compiled kernel (VITKERNELS_GRID=fixed).
FIXED_PROGRAMS_PER_SM = 8


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _slots(t, wh, ww, H, W, Hp, Wp, M: tl.constexpr, SHIFT: tl.constexpr, SHIFT_FIRST: tl.constexpr):
    """Window slots t (vector) of window (wh, ww) → (in-window, real token, token, p, c, region code).

    Pad first (default): the shifted grid position (y, x) reads the padded map at
    ((y + s) mod Hp, (x + s) mod Wp). SHIFT_FIRST (timm): positions past H or W are padding, the
    others read the unpadded map at ((y + s) mod H, (x + s) mod W) (s may exceed H or W).

    The region code 2·(p ≥ M − s) + (c ≥ M − s) does not depend on the window: with ``_shift_sel``
    it gives Swin's shift-mask labels (``_shift_mask``)."""
    ok = t < M * M
    p = t // M
    c = t - p * M
    y = wh * M + p
    x = ww * M + c
    if SHIFT_FIRST:
        real = ok & (y < H) & (x < W)
        row = (y + SHIFT) % H
        col = (x + SHIFT) % W
    else:
        row = y + SHIFT
        row = tl.where(row >= Hp, row - Hp, row)
        col = x + SHIFT
        col = tl.where(col >= Wp, col - Wp, col)
        real = ok & (row < H) & (col < W)
    tok = tl.where(real, row * W + col, 0)
    if SHIFT > 0:
        code = 2 * (p >= M - SHIFT).to(tl.int32) + (c >= M - SHIFT).to(tl.int32)
    else:
        code = t * 0
    return ok, real, tok, p, c, code


@triton.jit
def _shift_sel(wh, ww, Hp, Wp, M: tl.constexpr):
    """Which region bits separate Swin's shift-mask labels in window (wh, ww): 2 in the last window
    row, 1 in the last window column (3 in the corner, 0 inside the map).

    Swin labels a slot 3·[y ≥ Hp − M] + 3·[y ≥ Hp − s] + [x ≥ Wp − M] + [x ≥ Wp − s] at its shifted
    grid position (y, x) = (wh·M + p, ww·M + c). With 0 ≤ s < M, y ≥ Hp − M holds exactly in the last
    window row, and there y ≥ Hp − s ⟺ p ≥ M − s; likewise for x. So two slots of one window have
    equal labels ⟺ their region codes (``_slots``) agree on the bits this returns."""
    return 2 * (wh * M >= Hp - M).to(tl.int32) + (ww * M >= Wp - M).to(tl.int32)


@triton.jit
def _shift_mask(s, codei, codej, sel):
    """Scores of slot pairs with different shift-mask labels − 100·log2 e (as Swin's −100 mask)."""
    # masked per row and column first: a (codei ^ codej) tile would be window-invariant and kept
    same = (codei & sel)[:, None] == (codej & sel)[None, :]
    return tl.where(same, s, s - 144.26950408889634)


@triton.jit
def _unit_rows(x):
    """Swin V2 cosine attention: rows of x over D as F.normalize computes them, x / max(‖x‖₂, 1e-12)
    (fp32 norm, the result rounded once to x's dtype for the tensor-core dots), and 1 / max(‖x‖₂,
    1e-12) per row, which the backward keeps for the normalisation's gradient."""
    xf = x.to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), 1e-12)
    return (xf * inv[:, None]).to(x.dtype), inv


@triton.jit
def _unit_rows_grad(xn, inv, g):
    """Gradient through x̂ = x / max(‖x‖, 1e-12): (g − x̂·(x̂·g))·inv where the norm exceeds eps,
    g·inv where it is clamped (as autograd of F.normalize). Also returns the rows' x̂·g."""
    xf = xn.to(tl.float32)
    c = tl.sum(xf * g, 1)
    proj = tl.where(inv < 1e12, c, 0.0)
    return (g - xf * proj[:, None]) * inv[:, None], c


@triton.jit
def _logit_scale(LogitScale, head, stride_ls):
    """τ_h = exp(min(logit_scale_h, ln 100)) in fp32."""
    ls = tl.load(LogitScale + head * stride_ls).to(tl.float32)
    return tl.exp(tl.minimum(ls, 4.605170185988092))


@triton.jit
def _row_off(tok, stride, BIG: tl.constexpr):
    if BIG:
        off = tok.to(tl.int64) * stride
    else:
        off = tok * stride
    return off


@triton.jit
def _load_rows(base, off, real, d, d_ok, MASK_D: tl.constexpr):
    """(rows, BLOCK_D) tile of head rows at base + off; non-real rows read 0."""
    if MASK_D:
        x = tl.load(base + off[:, None] + d[None, :], mask=real[:, None] & d_ok[None, :], other=0.0)
    else:
        x = tl.load(base + off[:, None] + d[None, :], mask=real[:, None], other=0.0)
    return x


@triton.jit
def _store_rows(base, off, x, real, d, d_ok, MASK_D: tl.constexpr):
    if MASK_D:
        tl.store(base + off[:, None] + d[None, :], x, mask=real[:, None] & d_ok[None, :])
    else:
        tl.store(base + off[:, None] + d[None, :], x, mask=real[:, None])


@triton.jit
def _rel_bias(tab, stride_tr, pi, ci, oki, pj, cj, okj, M: tl.constexpr):
    """table[idx(i, j), head] gathered into a (BLOCK_M, BLOCK_N) tile (table dtype: a tile kept
    across windows costs half the registers of an fp32 one)."""
    idx = (pi[:, None] - pj[None, :] + (M - 1)) * (2 * M - 1) + (ci[:, None] - cj[None, :] + (M - 1))
    return tl.load(tab + idx * stride_tr, mask=oki[:, None] & okj[None, :], other=0.0)


@triton.jit
def _scores(
    q,
    k,
    bias,
    codei,
    codej,
    sel,
    okj,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    SHIFT: tl.constexpr,
    MASK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Base-2 scores: (q kᵀ·scale + B_rel + mask)·log2 e; slots outside the window → −inf.
    ``bias``: the base-2 bias tile (``_bias_block``), which may already hold the −inf columns."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s += bias
    if SHIFT > 0:
        s = _shift_mask(s, codei, codej, sel)
    if MASK_N:
        s = tl.where(okj[None, :], s, float("-inf"))
    return s


@triton.jit
def _bin_ds(ds, pi, ci, oki, j0, part, M: tl.constexpr, BLOCK_N: tl.constexpr, ACCUM: tl.constexpr):
    """Sum a dS tile (rows = query slots pi/ci, columns = key slots j0 + [0, BLOCK_N)) into the
    (2M−1)² relative-position bins: part[e] (+)= Σ_{i,j: idx(i,j) = e} ds[i, j].

    For row i and entry e the key slot is unique (p_j = p_i + M−1 − e // (2M−1), likewise c_j),
    so the bin is a gather along the row, summed over rows."""
    S2: tl.constexpr = 2 * M - 1
    E: tl.constexpr = S2 * S2
    ar = tl.arange(0, BLOCK_N)
    for e0 in tl.static_range(0, E, BLOCK_N):
        e = e0 + ar
        u = e // S2
        v = e - u * S2
        pj = pi[:, None] + (M - 1) - u[None, :]
        cj = ci[:, None] + (M - 1) - v[None, :]
        col = pj * M + cj - j0
        ok = (
            oki[:, None] & (pj >= 0) & (pj < M) & (cj >= 0) & (cj < M) & (col >= 0) & (col < BLOCK_N) & (e < E)[None, :]
        )
        g = tl.gather(ds, tl.where(ok, col, 0), 1)
        tot = tl.sum(tl.where(ok, g, 0.0), 0)
        if ACCUM:
            tot += tl.load(part + e, mask=e < E, other=0.0)
        tl.store(part + e, tot, mask=e < E)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _program(heads, WPG, BW, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(head, first window, end window, head's channel offset, d, d_ok) of this program."""
    pid = tl.program_id(0)
    head = pid % heads
    w0 = (pid // heads) * WPG
    d = tl.arange(0, BLOCK_D)
    return head, w0, tl.minimum(w0 + WPG, BW), head * HEAD_DIM, d, d < HEAD_DIM


@triton.jit
def _window_origin(w, nW, nWw):
    """(batch as int64, window row, window column) of window w of the B·nW windows."""
    b = w // nW
    win = w - b * nW
    wh = win // nWw
    return b.to(tl.int64), wh, win - wh * nWw


@triton.jit
def _padding_kv(QKVBias, C, hd, d, d_ok, HAS_QB: tl.constexpr):
    """k and v of a padded slot: the qkv linear of a zero token, i.e. qkv_bias (zeros without)."""
    if HAS_QB:
        bk = tl.load(QKVBias + C + hd + d, mask=d_ok, other=0.0)
        bv = tl.load(QKVBias + 2 * C + hd + d, mask=d_ok, other=0.0)
    else:
        bk = tl.zeros_like(d).to(tl.float32)
        bv = bk
    return bk, bv


@triton.jit
def _load_kv(x_base, C, offj, realj, d, d_ok, bk, bv, HAS_QB: tl.constexpr, MASK_D: tl.constexpr):
    """The key block's k and v rows; padded slots hold the qkv of a zero token."""
    k = _load_rows(x_base + C, offj, realj, d, d_ok, MASK_D)
    v = _load_rows(x_base + 2 * C, offj, realj, d, d_ok, MASK_D)
    if HAS_QB:
        k = tl.where(realj[:, None], k, bk[None, :])
        v = tl.where(realj[:, None], v, bv[None, :])
    return k, v


@triton.jit
def _query_slots(
    t,
    window,
    geo,
    M: tl.constexpr,
    SHIFT: tl.constexpr,
    SHIFT_FIRST: tl.constexpr,
    COSINE: tl.constexpr,
    BIG: tl.constexpr,
    MASK_D: tl.constexpr,
):
    """Slots t of a window as queries: (ok, real, tok, p, c, region code) of ``_slots``, q (unit rows when COSINE)
    and, COSINE, 1/‖q‖. ``window`` = (x_base, wh, ww), ``geo`` = (H, W, Hp, Wp, stride_xl, C, d, d_ok)."""
    x_base, wh, ww = window
    H, W, Hp, Wp, stride_xl, _C, d, d_ok = geo
    ok, real, tok, p, c, code = _slots(t, wh, ww, H, W, Hp, Wp, M, SHIFT, SHIFT_FIRST)
    q = _load_rows(x_base, _row_off(tok, stride_xl, BIG), real, d, d_ok, MASK_D)
    inv = 1.0
    if COSINE:
        q, inv = _unit_rows(q)
    return ok, real, tok, p, c, code, q, inv


@triton.jit
def _key_slots(
    t,
    window,
    geo,
    bk,
    bv,
    M: tl.constexpr,
    SHIFT: tl.constexpr,
    SHIFT_FIRST: tl.constexpr,
    COSINE: tl.constexpr,
    HAS_QB: tl.constexpr,
    BIG: tl.constexpr,
    MASK_D: tl.constexpr,
):
    """Slots t of a window as keys: (ok, real, tok, p, c, region code), k (unit rows when COSINE), v (``_load_kv``)
    and, COSINE, 1/‖k‖; ``window`` and ``geo`` as in ``_query_slots``."""
    x_base, wh, ww = window
    H, W, Hp, Wp, stride_xl, C, d, d_ok = geo
    ok, real, tok, p, c, code = _slots(t, wh, ww, H, W, Hp, Wp, M, SHIFT, SHIFT_FIRST)
    k, v = _load_kv(x_base, C, _row_off(tok, stride_xl, BIG), real, d, d_ok, bk, bv, HAS_QB, MASK_D)
    inv = 1.0
    if COSINE:
        k, inv = _unit_rows(k)
    return ok, real, tok, p, c, code, k, v, inv


@triton.jit
def _window_bias(
    tab,
    stride_tr,
    H,
    W,
    Hp,
    Wp,
    M: tl.constexpr,
    SHIFT: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The base-2 bias of a window held in one (BLOCK_M, BLOCK_N) tile, with −inf in the key columns
    past the window (MASK_N): it does not depend on the window, so a program builds it once and the
    scores need no key mask of their own (one fp32 tile instead of a bias tile, a key-mask tile and
    the slot vectors behind them)."""
    ok0, _r0, _t0, p0, c0, _l0 = _slots(tl.arange(0, BLOCK_M), 0, 0, H, W, Hp, Wp, M, SHIFT, False)
    okk, _r1, _t1, pk0, ck0, _l1 = _slots(tl.arange(0, BLOCK_N), 0, 0, H, W, Hp, Wp, M, SHIFT, False)
    bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_TABLE:
        bias = _rel_bias(tab, stride_tr, p0, c0, ok0, pk0, ck0, okk, M).to(tl.float32) * 1.4426950408889634
    if MASK_N:
        bias = tl.where(okk[None, :], bias, float("-inf"))
    return bias


@triton.jit
def _bias_block(
    bias0, tab, stride_tr, pi, ci, oki, pj, cj, okj, M: tl.constexpr, HAS_TABLE: tl.constexpr, SINGLE: tl.constexpr
):
    """The base-2 bias of one (query block, key block): the program's tile (SINGLE), a gather, or none."""
    if SINGLE:
        bias = bias0
    elif HAS_TABLE:
        bias = _rel_bias(tab, stride_tr, pi, ci, oki, pj, cj, okj, M).to(tl.float32) * 1.4426950408889634
    else:
        bias = 0.0
    return bias


@triton.jit(do_not_specialize=["WPG"])  # one compile whatever windows per program the grid takes
def _wa_fwd_kernel(
    QKV,
    Table,
    QKVBias,
    LogitScale,
    Out,
    Lse,
    stride_xb,
    stride_xl,
    stride_tr,
    stride_th,
    stride_ls,
    stride_ob,
    stride_ol,
    L,
    H,
    W,
    Hp,
    Wp,
    nWw,
    nW,
    BW,
    heads,
    C,
    WPG,
    qk_scale,
    M: tl.constexpr,
    SHIFT: tl.constexpr,
    SHIFT_FIRST: tl.constexpr,
    COSINE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HAS_QB: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BIG: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    N: tl.constexpr = M * M
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    SINGLE: tl.constexpr = NUM_M * NUM_N == 1
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    head, w0, w1, hd, d, d_ok = _program(heads, WPG, BW, HEAD_DIM, BLOCK_D)
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    tab = Table + head * stride_th
    bk, bv = _padding_kv(QKVBias, C, hd, d, d_ok, HAS_QB)
    # SINGLE: the bias and the key mask live in one window-invariant tile (FOLD)
    FOLD: tl.constexpr = SINGLE and (HAS_TABLE or MASK_N)
    bias0 = 0.0
    if FOLD:
        bias0 = _window_bias(tab, stride_tr, H, W, Hp, Wp, M, SHIFT, HAS_TABLE, MASK_N, BLOCK_M, BLOCK_N)
    if COSINE:  # the launcher passed log2 e: the head's τ is the score scale
        qk_scale = qk_scale * _logit_scale(LogitScale, head, stride_ls)

    geo = (H, W, Hp, Wp, stride_xl, C, d, d_ok)
    for w in range(w0, w1):
        b64, wh, ww = _window_origin(w, nW, nWw)
        sel = _shift_sel(wh, ww, Hp, Wp, M)
        window = (QKV + b64 * stride_xb + hd, wh, ww)
        o_base = Out + b64 * stride_ob + hd
        for i in range(NUM_M):
            oki, reali, toki, pi, ci, codei, q, _rq = _query_slots(
                i * BLOCK_M + ar_m, window, geo, M, SHIFT, SHIFT_FIRST, COSINE, BIG, MASK_D
            )
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for j in range(NUM_N):
                okj, realj, tokj, pj, cj, codej, k, v, _rk = _key_slots(
                    j * BLOCK_N + ar_n, window, geo, bk, bv, M, SHIFT, SHIFT_FIRST, COSINE, HAS_QB, BIG, MASK_D
                )
                bias = _bias_block(bias0, tab, stride_tr, pi, ci, oki, pj, cj, okj, M, HAS_TABLE, SINGLE)
                s = _scores(
                    q,
                    k,
                    bias,
                    codei,
                    codej,
                    sel,
                    okj,
                    qk_scale,
                    FOLD or HAS_TABLE,
                    SHIFT,
                    MASK_N and not SINGLE,
                    PRECISION,
                )
                # Every key block holds at least one in-window slot, so m_new is finite.
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
                m_i = m_new
            out = acc * (1.0 / l_i)[:, None]
            _store_rows(o_base, _row_off(toki, stride_ol, BIG), out.to(Out.dtype.element_ty), reali, d, d_ok, MASK_D)
            if STORE_LSE:  # row statistics in base 2, kept apart: (max m, log2 Σ exp2(s − m))
                st = Lse + ((b64 * heads + head) * L + toki) * 2
                tl.store(st, m_i, mask=reali)
                tl.store(st + 1, tl.math.log2(l_i), mask=reali)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["WPG"])
def _wa_bwd_kernel(
    QKV,
    Table,
    QKVBias,
    LogitScale,
    DO,
    DQKV,
    Out,
    Lse,
    DQW,
    TablePart,
    BiasPart,
    LSPart,
    stride_xb,
    stride_xl,
    stride_tr,
    stride_th,
    stride_ls,
    stride_dob,
    stride_dol,
    stride_gb,
    stride_gl,
    stride_ob,
    stride_ol,
    stride_wb,
    stride_wl,
    L,
    H,
    W,
    Hp,
    Wp,
    nWw,
    nW,
    BW,
    heads,
    C,
    WPG,
    qk_scale,
    scale,
    M: tl.constexpr,
    SHIFT: tl.constexpr,
    SHIFT_FIRST: tl.constexpr,
    COSINE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HAS_QB: tl.constexpr,
    TABLE_GRAD: tl.constexpr,
    QB_GRAD: tl.constexpr,
    BIG: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    N: tl.constexpr = M * M
    E: tl.constexpr = (2 * M - 1) * (2 * M - 1)
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    SINGLE: tl.constexpr = NUM_M * NUM_N == 1
    KEYS_RESIDENT: tl.constexpr = NUM_N == 1
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    pid = tl.program_id(0)
    head, w0, w1, hd, d, d_ok = _program(heads, WPG, BW, HEAD_DIM, BLOCK_D)
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    tab = Table + head * stride_th
    part = TablePart + pid.to(tl.int64) * E
    bk, bv = _padding_kv(QKVBias, C, hd, d, d_ok, HAS_QB)
    # SINGLE: the bias and the key mask live in one window-invariant tile (FOLD)
    FOLD: tl.constexpr = SINGLE and (HAS_TABLE or MASK_N)
    bias0 = 0.0
    if FOLD:
        bias0 = _window_bias(tab, stride_tr, H, W, Hp, Wp, M, SHIFT, HAS_TABLE, MASK_N, BLOCK_M, BLOCK_N)
    if TABLE_GRAD and SINGLE:  # dS summed over this program's windows, binned once at the end
        ds_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if QB_GRAD:  # this program's row of the qkv_bias partial sums, accumulated in place
        bpart = BiasPart + pid.to(tl.int64) * (2 * BLOCK_D)
        tl.store(bpart + d, tl.zeros([BLOCK_D], dtype=tl.float32))
        tl.store(bpart + BLOCK_D + d, tl.zeros([BLOCK_D], dtype=tl.float32))
    if COSINE:  # scores τ·q̂·k̂ᵀ: the launcher passed log2 e and 1, the head's τ scales both
        tau = _logit_scale(LogitScale, head, stride_ls)
        qk_scale = qk_scale * tau
        scale = scale * tau
        ls_acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ over query rows of q̂·dq̂ = dlogit_scale

    geo = (H, W, Hp, Wp, stride_xl, C, d, d_ok)
    for w in range(w0, w1):
        b64, wh, ww = _window_origin(w, nW, nWw)
        sel = _shift_sel(wh, ww, Hp, Wp, M)
        window = (QKV + b64 * stride_xb + hd, wh, ww)
        do_base = DO + b64 * stride_dob + hd
        g_base = DQKV + b64 * stride_gb + hd
        for j in range(NUM_N):
            okj, realj, tokj, pj, cj, codej, k, v, rk = _key_slots(
                j * BLOCK_N + ar_n, window, geo, bk, bv, M, SHIFT, SHIFT_FIRST, COSINE, HAS_QB, BIG, MASK_D
            )
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for i in range(NUM_M):
                oki, reali, toki, pi, ci, codei, q, rq = _query_slots(
                    i * BLOCK_M + ar_m, window, geo, M, SHIFT, SHIFT_FIRST, COSINE, BIG, MASK_D
                )
                # Padded (cropped) query slots get dO = 0: they contribute nothing below.
                do = _load_rows(do_base, _row_off(toki, stride_dol, BIG), reali, d, d_ok, MASK_D)
                bias = _bias_block(bias0, tab, stride_tr, pi, ci, oki, pj, cj, okj, M, HAS_TABLE, SINGLE)
                s = _scores(
                    q,
                    k,
                    bias,
                    codei,
                    codej,
                    sel,
                    okj,
                    qk_scale,
                    FOLD or HAS_TABLE,
                    SHIFT,
                    MASK_N and not SINGLE,
                    PRECISION,
                )
                if KEYS_RESIDENT:  # complete rows: recompute the softmax, no saved lse
                    m_i = tl.max(s, 1)
                    p = tl.math.exp2(s - m_i[:, None])
                    p = p * (1.0 / tl.sum(p, 1))[:, None]
                else:
                    # (s − m) − log2 l: no rounding of a large m + log2 l (scores reach ±144 in
                    # base 2 with Swin V2's τ = 100)
                    st = Lse + ((b64 * heads + head) * L + toki) * 2
                    m_row = tl.load(st, mask=reali, other=0.0)
                    l_row = tl.load(st + 1, mask=reali, other=float("inf"))
                    p = tl.math.exp2((s - m_row[:, None]) - l_row[:, None])
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                if KEYS_RESIDENT:
                    delta = tl.sum(p * dp, 1)
                else:
                    o = _load_rows(Out + b64 * stride_ob + hd, _row_off(toki, stride_ol, BIG), reali, d, d_ok, MASK_D)
                    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                ds = p * (dp - delta[:, None])
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                if COSINE and KEYS_RESIDENT:  # dq̂ is complete: through the normalisation
                    dq, cq = _unit_rows_grad(q, rq, dq)
                    ls_acc += cq
                if KEYS_RESIDENT:
                    _store_rows(
                        g_base, _row_off(toki, stride_gl, BIG), dq.to(DQKV.dtype.element_ty), reali, d, d_ok, MASK_D
                    )
                else:  # fp32 workspace rows owned by this program: read-modify-write
                    w_ptr = DQW + b64 * stride_wb + hd
                    offw = _row_off(toki, stride_wl, BIG)
                    dq += _load_rows(w_ptr, offw, reali, d, d_ok, MASK_D)
                    _store_rows(w_ptr, offw, dq, reali, d, d_ok, MASK_D)
                if TABLE_GRAD:
                    if SINGLE:
                        ds_sum += ds
                    else:
                        _bin_ds(ds, pi, ci, oki, j * BLOCK_N, part, M, BLOCK_N, True)
                        tl.debug_barrier()
            dk = dk * scale
            if COSINE:
                dk, _ck = _unit_rows_grad(k, rk, dk)
            offg = _row_off(tokj, stride_gl, BIG)
            _store_rows(g_base + C, offg, dk.to(DQKV.dtype.element_ty), realj, d, d_ok, MASK_D)
            _store_rows(g_base + 2 * C, offg, dv.to(DQKV.dtype.element_ty), realj, d, d_ok, MASK_D)
            if QB_GRAD:
                # Only windows at the bottom/right edge hold padded slots: a scalar branch keeps
                # the reduction (and its registers) off the common path.
                pad = okj & (realj == 0)
                if tl.sum(pad.to(tl.int32), 0) > 0:
                    tl.debug_barrier()
                    gk = tl.sum(tl.where(pad[:, None], dk, 0.0), 0)
                    gv = tl.sum(tl.where(pad[:, None], dv, 0.0), 0)
                    tl.store(bpart + d, tl.load(bpart + d) + gk)
                    tl.store(bpart + BLOCK_D + d, tl.load(bpart + BLOCK_D + d) + gv)
            if not KEYS_RESIDENT:
                tl.debug_barrier()

    if TABLE_GRAD and SINGLE:
        okb, _r2, _t2, pb, cb, _l2 = _slots(ar_m, 0, 0, H, W, Hp, Wp, M, SHIFT, False)
        _bin_ds(ds_sum, pb, cb, okb, 0, part, M, BLOCK_N, False)
    if COSINE:  # this program's share of dlogit_scale (before the clamp mask and τ: see the launcher)
        tl.store(LSPart + pid, tl.sum(ls_acc, 0))


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


def _cap(m: int) -> int:
    return launch.pow2_at_least(m * m)


def _window(named_args, kwargs) -> int:
    return int(kwargs["M"] if "M" in kwargs else named_args["M"])  # M is passed as a keyword


def _prune_fwd(configs, named_args, **kwargs):
    """Blocks no larger than next_pow2(N) and key blocks of at least a quarter of it."""
    cap = _cap(_window(named_args, kwargs))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and cap // 4 <= c.kwargs["BLOCK_N"] <= cap]
    return kept or [triton.Config({"BLOCK_M": cap, "BLOCK_N": cap}, num_warps=4, num_stages=1)]


def _prune_bwd(configs, named_args, **kwargs):
    """Query blocks no larger than next_pow2(N); register caps only for one-block windows (N ≤ 64),
    where they spill a few bytes (N = 144 spills kilobytes under any cap)."""
    cap = _cap(_window(named_args, kwargs))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and (c.maxnreg is None or cap <= 64)]
    return kept or [triton.Config({"BLOCK_M": cap}, num_warps=4, num_stages=1)]


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]), pruned per window size (N = 49 → blocks
# <= 64). Backward: BLOCK_N is the resident key block (set by the launcher), BLOCK_M the query
# block; its first config kept is the occupancy grid's reference (launch.occupancy). Registers of
# every config on sm_90a (Swin-T / Swin-B shapes): docs/window_attention.md, "Registers". The
# maxnreg=168 backward (3 CTAs per SM) spills 32–96 B at M = 7; without a cap it takes 225–248.
_FWD_BLOCKS = ("BLOCK_M", "BLOCK_N")
_BWD_SHAPES = [(64, 4, 1, 168), (64, 4, 1), (64, 8, 1), (32, 4, 1), (32, 8, 1), (16, 4, 1), (16, 8, 1)]
_FWD_SHAPES = {  # per family, as chosen above
    "half": [(64, 64, 4, 1), (64, 64, 4, 1, 128), (64, 64, 8, 1), (32, 64, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)]
    + [(64, 64, 4, 2), (32, 64, 4, 2), (64, 256, 8, 2), (32, 256, 8, 2)]
    + [(16, 16, 4, 1), (64, 256, 8, 1), (32, 256, 8, 1), (64, 128, 8, 1), (32, 128, 4, 1), (128, 128, 8, 1)],
    "fp32": [(64, 64, 4, 1), (32, 64, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)]
    + [(64, 128, 8, 1), (32, 128, 4, 1), (32, 256, 8, 1)],
}
_CONFIGS = {  # per family: (forward, backward)
    fam: (launch.configs(_FWD_BLOCKS, _FWD_SHAPES[fam]), launch.configs(["BLOCK_M"], _BWD_SHAPES))
    for fam in launch.FAMILIES
}

_FWD_KEY = ["M", "SHIFT", "SHIFT_FIRST", "COSINE", "BLOCK_D", "HAS_TABLE", "HAS_QB", "STORE_LSE", "PRECISION"]
_BWD_KEY = [
    "M",
    "SHIFT",
    "SHIFT_FIRST",
    "COSINE",
    "BLOCK_D",
    "HAS_TABLE",
    "HAS_QB",
    "TABLE_GRAD",
    "QB_GRAD",
    "PRECISION",
    "BLOCK_N",
]

# triton.jit decides at decoration (import) time whether kernels are interpreted.
_INTERPRETED = launch.is_interpreted(_wa_fwd_kernel)


def _use_fixed(t: torch.Tensor) -> bool:
    return use_fixed(t, _INTERPRETED, "window_attention")


_TUNED = launch.tuned_table(
    _CONFIGS,
    [
        (_wa_fwd_kernel, dict(key=_FWD_KEY, prune=_prune_fwd)),
        (_wa_bwd_kernel, dict(key=_BWD_KEY, prune=_prune_bwd, restore_value=["DQW", "TablePart"])),
    ],
)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _windows_per_program(bw: int, heads: int, device, fixed: bool, resident: int | None = None) -> int:
    """Windows per program (WPG). The interpreter's fixed config: 2. On a GPU, with ``resident``
    programs of the kernel per SM (``occupancy``): one wave, every head's B·nW windows split into
    ⌊resident·SMs / heads⌋ groups (``launch.one_wave_split``). Without it (VITKERNELS_GRID=fixed, no
    compiled kernel): the old assumption of 8 programs per SM, 1–16 windows."""
    if WINDOWS_PER_PROGRAM is not None:
        return max(1, int(WINDOWS_PER_PROGRAM))
    if fixed or (_INTERPRETED and resident is None):  # (the config tests' tuned path on CPU too)
        return 2
    sms = sm_count(device)
    if resident is None:
        return max(1, min(16, (bw * heads) // (FIXED_PROGRAMS_PER_SM * sms)))
    return launch.one_wave_split(bw, heads, resident * sms)


def _split(g, fixed: bool, index: int, qkv, make_args, meta) -> int:
    """WPG of a launch of kernel ``index`` (0 forward, 1 backward); ``make_args(wpg)`` builds its
    positional arguments. The occupancy is asked with the fallback's WPG (WPG is not specialised
    on, so the kernel compiled is the one launched) and cached per call signature."""
    mode = launch.grid_mode()
    wpg = _windows_per_program(g.BW, g.heads, qkv.device, fixed)
    if fixed or mode == "fixed" or WINDOWS_PER_PROGRAM is not None:
        return wpg
    tuned = _TUNED[launch.family(qkv.dtype)][index]
    resident = occupancy(tuned, make_args(wpg), meta, qkv.device)
    return wpg if resident is None else _windows_per_program(g.BW, g.heads, qkv.device, False, resident)


class _Geometry:
    def __init__(self, qkv, hw, heads, m, s, shift_first=False, cosine=False):
        if qkv.dim() != 3 or qkv.shape[-1] % 3:
            raise ValueError(f"qkv must be (B, H*W, 3C), got shape {tuple(qkv.shape)}")
        launch.check_dtype("qkv", qkv)
        self.B, self.L, c3 = qkv.shape
        self.C = c3 // 3
        self.heads = int(heads)
        if self.C % self.heads:
            raise ValueError(f"C = {self.C} is not divisible by num_heads = {heads}")
        self.D = self.C // self.heads
        if not 1 <= self.D <= MAX_HEAD_DIM:
            raise ValueError(
                f"head dim {self.D} is not supported by the Triton window_attention kernels (1 <= D <= {MAX_HEAD_DIM})"
            )
        self.H, self.W = int(hw[0]), int(hw[1])
        if self.H * self.W != self.L:
            raise ValueError(f"hw = {tuple(hw)} does not match the {self.L} tokens of qkv")
        self.M, self.s = int(m), int(s)
        if self.M < 1 or not 0 <= self.s < self.M:
            raise ValueError(f"need window_size >= 1 and 0 <= shift_size < window_size, got {m}, {s}")
        self.Hp = -(-self.H // self.M) * self.M
        self.Wp = -(-self.W // self.M) * self.M
        self.nWw = self.Wp // self.M
        self.nW = (self.Hp // self.M) * self.nWw
        self.BW = self.B * self.nW
        self.N = self.M * self.M
        self.E = (2 * self.M - 1) ** 2
        self.BLOCK_D = launch.pow2_at_least(self.D)
        # Padded slots exist only when a side is not a multiple of M; only they read qkv_bias.
        self.padded = self.Hp != self.H or self.Wp != self.W
        # Both orders are one function unless a shifted map is padded: compile the variant only then.
        self.shift_first = bool(shift_first) and self.s > 0 and self.padded
        self.cosine = bool(cosine)

    def ints(self, wpg):
        return (self.L, self.H, self.W, self.Hp, self.Wp, self.nWw, self.nW, self.BW, self.heads, self.C, wpg)

    def consts(self, qkv, table, qkv_bias, big):
        return {
            "M": self.M,
            "SHIFT": self.s,
            "SHIFT_FIRST": self.shift_first,
            "COSINE": self.cosine,
            "HEAD_DIM": self.D,
            "BLOCK_D": self.BLOCK_D,
            "HAS_TABLE": table is not None,
            "HAS_QB": qkv_bias is not None and self.padded,
            "BIG": big,
            "PRECISION": launch.precision(qkv.dtype),
        }


def _needs_int64(*tensors) -> bool:
    """True when one image's rows of some tensor span >= 2^31 elements (int32 offsets overflow)."""
    return any(
        t is not None and t.dim() == 3 and t.shape[1] > 0 and (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[2] >= 2**31
        for t in tensors
    )


def _check_params(g: _Geometry, qkv, table, qkv_bias, logit_scale=None):
    if logit_scale is not None:
        if tuple(logit_scale.shape) not in ((g.heads,), (g.heads, 1, 1)):
            raise ValueError(
                f"logit_scale has shape {tuple(logit_scale.shape)}, expected {(g.heads,)} or {(g.heads, 1, 1)}"
            )
        if logit_scale.dtype != qkv.dtype or logit_scale.device != qkv.device:
            raise ValueError("logit_scale must have qkv's dtype and device")
    if table is not None:
        if tuple(table.shape) != (g.E, g.heads):
            raise ValueError(f"rel_pos_bias_table has shape {tuple(table.shape)}, expected {(g.E, g.heads)}")
        if table.dtype != qkv.dtype or table.device != qkv.device:
            raise ValueError("rel_pos_bias_table must have qkv's dtype and device")
    if qkv_bias is not None:
        if tuple(qkv_bias.shape) != (3 * g.C,):
            raise ValueError(f"qkv_bias has shape {tuple(qkv_bias.shape)}, expected {(3 * g.C,)}")
        if qkv_bias.dtype != qkv.dtype or qkv_bias.device != qkv.device:
            raise ValueError("qkv_bias must have qkv's dtype and device")
        qkv_bias = qkv_bias.contiguous()
    return qkv_bias


def _fwd_blocks(g: _Geometry):
    fixed = INTERPRET_BLOCKS["fwd"]
    if fixed is not None:
        return fixed
    cap = _cap(g.M)
    return (min(cap, 64), min(cap, 256))


def _launch_fwd(g, qkv, table, qkv_bias, scale, out, lse, logit_scale=None):
    big = _needs_int64(qkv, out)
    tab = table if table is not None else qkv
    tr, th = (table.stride(0), table.stride(1)) if table is not None else (0, 0)
    ls, sls = (logit_scale, logit_scale.stride(0)) if g.cosine else (qkv, 0)

    def make_args(wpg):
        return (
            qkv,
            tab,
            qkv_bias if qkv_bias is not None else qkv,
            ls,
            out,
            lse if lse is not None else qkv,
            qkv.stride(0),
            qkv.stride(1),
            tr,
            th,
            sls,
            out.stride(0),
            out.stride(1),
            *g.ints(wpg),
            (1.0 if g.cosine else float(scale)) * launch.LOG2E,
        )

    meta = dict(g.consts(qkv, table, qkv_bias, big), STORE_LSE=lse is not None)
    fixed = _use_fixed(qkv)
    with launch.device_ctx(qkv):
        wpg = _split(g, fixed, 0, qkv, make_args, meta)
        grid = (launch.cdiv(g.BW, wpg) * g.heads,)
        blocks = dict(zip(_FWD_BLOCKS, _fwd_blocks(g), strict=True)) if fixed else {}
        kernel = launch.pick(fixed, _wa_fwd_kernel, _TUNED, qkv.dtype, 0)
        kernel[grid](*make_args(wpg), **meta, **launch.fixed_meta(fixed, **blocks))


def window_attention_forward(
    qkv,
    hw,
    num_heads,
    window_size,
    shift_size,
    table,
    qkv_bias,
    scale,
    return_lse: bool = False,
    logit_scale=None,
    shift_first: bool = False,
):
    """out (B, H·W, C) of Swin window attention (SPEC op 3); with ``return_lse`` also the float32
    natural-log logsumexp of every real token's score row, (B, heads, H·W). ``logit_scale``
    (heads,) / (heads, 1, 1): Swin V2 cosine attention (``scale`` unused); ``shift_first``: timm's
    shift-then-pad order."""
    g = _Geometry(qkv, hw, num_heads, window_size, shift_size, shift_first, logit_scale is not None)
    qkv = launch.unit_last(qkv)
    qkv_bias = _check_params(g, qkv, table, qkv_bias, logit_scale)
    out = torch.empty((g.B, g.L, g.C), device=qkv.device, dtype=qkv.dtype)
    stats = _forward(g, qkv, table, qkv_bias, scale, out, logit_scale, return_lse)
    if not return_lse:
        return out
    return out, (stats[..., 0] + stats[..., 1]) * launch.LN2


def _forward(g, qkv, table, qkv_bias, scale, out, logit_scale, stats: bool):
    """Launches the forward into `out`; with `stats` returns the fp32 (B, heads, H·W, 2) base-2 row
    statistics (max, log2 of the sum) that the key-block backward reads."""
    st = torch.empty((g.B, g.heads, g.L, 2), device=qkv.device, dtype=torch.float32) if stats else None
    if g.B > 0:
        _launch_fwd(g, qkv, table, qkv_bias, scale, out, st, logit_scale)
    return st


def _bwd_blocks(g: _Geometry):
    """(BLOCK_M or None = tuned, BLOCK_N): keys resident (one block) for N <= MAX_RESIDENT_KEYS."""
    cap = _cap(g.M)
    bn = cap if cap <= MAX_RESIDENT_KEYS else 128
    bm = None
    if _INTERPRETED:
        bm = INTERPRET_BLOCKS["bwd"] or min(cap, 64)
        bn = INTERPRET_BLOCKS["bwd_keys"] or bn
    return bm, bn


def window_attention_backward(
    dout,
    qkv,
    hw,
    num_heads,
    window_size,
    shift_size,
    table,
    qkv_bias,
    scale,
    table_grad: bool = True,
    bias_grad: bool = True,
    logit_scale=None,
    shift_first: bool = False,
):
    """Gradients (dqkv, dtable, dqkv_bias, dlogit_scale) of ``window_attention_forward``.

    dqkv (B, H·W, 3C) in qkv's dtype; dtable ((2M−1)², heads), dqkv_bias (3C,) and dlogit_scale
    (logit_scale's shape) in their own dtype, or None when that input is None or (table, bias) its
    gradient was not asked for. Deterministic: per-program partial sums added by torch."""
    g = _Geometry(qkv, hw, num_heads, window_size, shift_size, shift_first, logit_scale is not None)
    qkv = launch.unit_last(qkv)
    qkv_bias = _check_params(g, qkv, table, qkv_bias, logit_scale)
    if tuple(dout.shape) != (g.B, g.L, g.C):
        raise ValueError(f"dout has shape {tuple(dout.shape)}, expected {(g.B, g.L, g.C)}")
    dout = launch.unit_last(dout.to(qkv.dtype))
    table_grad = table_grad and table is not None
    bias_grad = bias_grad and qkv_bias is not None
    dqkv = torch.empty((g.B, g.L, 3 * g.C), device=qkv.device, dtype=qkv.dtype)
    if g.B == 0:
        dqkv.zero_()
        return (
            dqkv,
            torch.zeros_like(table) if table_grad else None,
            torch.zeros_like(qkv_bias) if bias_grad else None,
            torch.zeros_like(logit_scale) if g.cosine else None,
        )

    bm, bn = _bwd_blocks(g)
    resident = bn >= g.N
    out = lse = dqw = None
    if not resident:  # key blocks: needs the row statistics and out (delta), dq accumulated in fp32
        out = torch.empty((g.B, g.L, g.C), device=qkv.device, dtype=qkv.dtype)
        lse = _forward(g, qkv, table, qkv_bias, scale, out, logit_scale, True)
        dqw = torch.zeros((g.B, g.L, g.C), device=qkv.device, dtype=torch.float32)
    big = _needs_int64(qkv, dout, dqkv, dqw)
    tab = table if table is not None else qkv
    tr, th = (table.stride(0), table.stride(1)) if table is not None else (0, 0)
    ls, sls = (logit_scale, logit_scale.stride(0)) if g.cosine else (qkv, 0)
    o_ = out if out is not None else qkv
    scale = 1.0 if g.cosine else float(scale)  # cosine: the kernels scale by the head's τ

    def make_args(wpg, tpart, bpart, lpart):
        w_ = dqw if dqw is not None else tpart
        return (
            qkv,
            tab,
            qkv_bias if qkv_bias is not None else qkv,
            ls,
            dout,
            dqkv,
            o_,
            lse if lse is not None else tpart,
            w_,
            tpart,
            bpart,
            lpart,
            qkv.stride(0),
            qkv.stride(1),
            tr,
            th,
            sls,
            dout.stride(0),
            dout.stride(1),
            dqkv.stride(0),
            dqkv.stride(1),
            o_.stride(0),
            o_.stride(1),
            w_.stride(0) if dqw is not None else 0,
            w_.stride(1) if dqw is not None else 0,
            *g.ints(wpg),
            scale * launch.LOG2E,
            scale,
        )

    qb_grad = bias_grad and g.padded  # without padded slots dqkv_bias is exactly 0
    meta = dict(g.consts(qkv, table, qkv_bias, big), TABLE_GRAD=table_grad, QB_GRAD=qb_grad, BLOCK_N=bn)
    fixed = _use_fixed(qkv)
    with launch.device_ctx(qkv):
        # The partials have one row per program: the grid is fixed before they are allocated
        # (placeholders stand in for them while the occupancy is read).
        stand_in = torch.empty(1, device=qkv.device, dtype=torch.float32)
        wpg = _split(g, fixed, 1, qkv, lambda w: make_args(w, stand_in, stand_in, stand_in), meta)
        programs = launch.cdiv(g.BW, wpg) * g.heads
        tpart = torch.zeros((programs, g.E) if table_grad else (1,), device=qkv.device, dtype=torch.float32)
        bpart = torch.empty((programs, 2, g.BLOCK_D) if qb_grad else (1,), device=qkv.device, dtype=torch.float32)
        lpart = torch.empty((programs,) if g.cosine else (1,), device=qkv.device, dtype=torch.float32)
        kernel = launch.pick(fixed, _wa_bwd_kernel, _TUNED, qkv.dtype, 1)
        kernel[(programs,)](*make_args(wpg, tpart, bpart, lpart), **meta, **launch.fixed_meta(fixed, BLOCK_M=bm))
    dls = None
    if g.cosine:  # Σ over a head's programs; zero where the clamp at ln 100 holds (as torch.clamp)
        dls = lpart.view(-1, g.heads).sum(0)
    if dqw is not None:
        if g.cosine:  # the workspace holds dq̂ (summed over key blocks): through the normalisation here
            dqw, extra = _unit_rows_grad_torch(qkv[..., : g.C], dqw, g.heads)
            dls = dls + extra
        dqkv[..., : g.C].copy_(dqw)
    if dls is not None:
        dls = torch.where(logit_scale.reshape(g.heads).float() < LOGIT_SCALE_MAX, dls, 0.0)
        dls = dls.reshape(logit_scale.shape).to(logit_scale.dtype)

    dtable = dbias = None
    if table_grad:
        dtable = tpart.view(-1, g.heads, g.E).sum(0).t().contiguous().to(table.dtype)
    if bias_grad:
        dbias = torch.zeros(3 * g.C, device=qkv.device, dtype=torch.float32)
        if qb_grad:
            kv = bpart.view(-1, g.heads, 2, g.BLOCK_D).sum(0)[..., : g.D]  # (heads, 2, D)
            dbias[g.C :] = kv.permute(1, 0, 2).reshape(2 * g.C)
        dbias = dbias.to(qkv_bias.dtype)
    return dqkv, dtable, dbias, dls


def _unit_rows_grad_torch(q, dqn, heads):
    """(dq, per-head Σ q̂·dq̂) from dq̂ (B, L, C) fp32 and q (B, L, C): the normalisation's gradient
    of the key-block backward (N > 256), where dq̂ is only complete after the kernel."""
    b, n, c = dqn.shape
    qf = q.float().reshape(b, n, heads, c // heads)
    inv = 1.0 / torch.linalg.vector_norm(qf, dim=-1, keepdim=True).clamp_min(1e-12)
    qn = qf * inv
    g = dqn.reshape(b, n, heads, c // heads)
    cq = (qn * g).sum(-1, keepdim=True)
    dq = (g - qn * torch.where(inv < 1e12, cq, 0.0)) * inv
    return dq.reshape(b, n, c), cq.sum((0, 1, 3))


def window_attention_flops(B, H, W, C, heads, window_size, backward=False):
    """Model FLOPs (unpadded N = M²): forward 4·B·nW·heads·N²·D, backward 2.5× that."""
    m = window_size
    nw = (-(-H // m)) * (-(-W // m))
    f = 4 * B * nw * heads * (m * m) ** 2 * (C // heads)
    return int(f * 2.5) if backward else f
