"""Triton kernels for ``vitkernels.pool_attention`` (MViTv2 pooling attention, decomposed relative positions).

Math, per (batch b, head h): q (Nq, D), k, v (Nk, D); query i (key j) after the optional class token sits at
(qh, qw) of q_hw ((kh, kw) of k_hw), row-major; idx = timm's cal_rel_pos_type row (float32, truncated):
    S = scale·q kᵀ + R,  R[i, j] = relh[i, kh] + relw[i, kw] (0 on the class row / column, or no tables),
    relh[i, kh] = q_i · rel_pos_h[idx(qh, kh)], relw likewise;  O = softmax(S) v (+ q),  lse = logsumexp(S)
    backward: delta = rowsum(dO ∘ (out − q·residual)), dS = P ∘ (dP − delta), dk = scale·dSᵀ q, dv = Pᵀ dO,
    drelh[i, kh] = Σ_{j in key row kh} dS[i, j];  dq = scale·dS k + Σ_kh drelh[i, kh]·rel_pos_h[idx] + ... (+ dO),
    drel_pos_h[l] = Σ_{(i, kh): idx = l} drelh[i, kh]·q_i;  the same for the w axis.
R never exists as a tensor: the score MMA takes it as (rel / scale)·E, E the key block's one-hot (kh | k_h + kw)
selector. Layout: q, k, v strided (B, heads, N, D) views with a unit last stride; out (B, Nq, heads·D); tables
(L, D); the backward's rel and drel rows fp32 (B·heads, Nq, k_h + k_w). Kernels: ``_pool_fwd_kernel`` (per
query block), ``_pool_bwd_pre_kernel`` (delta, rel rows), ``_pool_bwd_dkdv_kernel`` (per key block and query
chunk), ``_pool_bwd_dq_kernel`` (per query block; dq, drel rows), ``_pool_bwd_table_kernel`` (table grads:
fp32 partials summed by torch, no atomics). Design, cost, sm_90a registers: docs/pool_attention.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch as launch
from ._launch import sm_count, use_fixed  # module globals: tests patch them here
from ._tiles import (
    accumulate_pv,
    block_offsets,
    load_1d,
    load_lse2,
    load_tile,
    logsumexp,
    query_block,
    store_1d,
    store_tile,
)

__all__ = ["MAX_HEAD_DIM", "pool_attention_bwd", "pool_attention_fwd", "rel_index", "rel_ratios"]

MAX_HEAD_DIM = 128

# Fixed block sizes under the interpreter (CPU); tests may monkeypatch this dict. Values: (BLOCK_M, BLOCK_N)
# for "fwd", "dkdv" and "dq", (BLOCK_M, BLOCK_L) for "table"; "pre" is BLOCK_M of the preprocess kernel.
INTERPRET_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16), "table": (16, 16), "pre": 16}
PRE_BLOCK_M = 32  # preprocess kernel rows per program on a GPU
TABLE_UNIT = 128  # query rows a table-gradient program takes at a time on a GPU (a multiple of every BLOCK_M)
TABLE_WAVES = 2  # table-gradient programs per SM (each adds one (L, D) fp32 partial)
DKDV_WAVES = 2  # dK/dV programs per SM the query rows are split for (each split adds an fp32 dK, dV partial)
DKDV_ROWS: int | None = None  # query rows per dK/dV program (a multiple of BLOCK_M); None: chosen as above


# ---------------------------------------------------------------------------------------------
# Relative-position index (timm's cal_rel_pos_type)
# ---------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@functools.lru_cache(maxsize=256)
def rel_ratios(q_size: int, k_size: int) -> tuple[float, float, float]:
    """(q ratio, k ratio, offset) of one axis as timm uses them: float32 values of max(k/q, 1), max(q/k, 1)
    and (k − 1)·max(q/k, 1) (the products are formed in double by Python, then rounded once)."""
    rk = max(q_size / k_size, 1.0)
    return _f32(max(k_size / q_size, 1.0)), _f32(rk), _f32((k_size - 1) * rk)


def rel_index(q_size: int, k_size: int) -> torch.Tensor:
    """(q_size, k_size) int64 table row index, exactly timm's: arange·ratio in float32, difference, + offset,
    truncated. The kernels compute the same float32 operations (``_rel_index``)."""
    rq, rk, c = rel_ratios(q_size, k_size)
    x = torch.arange(q_size, dtype=torch.float32)[:, None] * torch.tensor(rq, dtype=torch.float32)
    y = torch.arange(k_size, dtype=torch.float32)[None, :] * torch.tensor(rk, dtype=torch.float32)
    return ((x - y) + c).long()


@functools.lru_cache(maxsize=256)
def _rel_rows(q_size: int, k_size: int) -> int:
    """Table rows an axis needs (largest index + 1)."""
    return int(rel_index(q_size, k_size).max()) + 1


@triton.jit
def _rel_index(pos_q, pos_k, ratio_q, ratio_k, offset):
    """trunc(f32(pos_q·ratio_q) − f32(pos_k·ratio_k) + offset) with float32 rounding at each step, as timm.
    Each product is formed exactly in float64 and rounded once to float32, so no fused multiply-add can
    change a rounding; the ratios are float32 values (``rel_ratios``)."""
    x = (pos_q * tl.cast(ratio_q, tl.float64)).to(tl.float32)
    y = (pos_k * tl.cast(ratio_k, tl.float64)).to(tl.float32)
    return ((x - y) + offset).to(tl.int32)


# ---------------------------------------------------------------------------------------------
# Shared jit helpers
# ---------------------------------------------------------------------------------------------
# ``rel_pos``: the kernel arguments (TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w) as
# one tuple: the two tables, their row strides, the key map (k_h, k_w) and each axis's ``rel_ratios``.


@triton.jit
def _grid_pos(n0, offs, N, width, CLS: tl.constexpr):
    """(row, column, spatial) of tokens n0 + offs: their grid position (0 for the class token and tokens
    past N) and whether they are spatial tokens."""
    t = n0 + offs
    sp = (t >= CLS) & (t < N)
    s = tl.where(sp, t - CLS, 0)
    return s // width, s % width, sp


@triton.jit
def _axis_terms(rel, qc, pos, T, stride_t, n_k, col0, ratio_q, ratio_k, offset, offs_d, mask, KR: tl.constexpr):
    """rel plus one axis's terms of a chunk of head dims: column col0 + kk (kk < n_k) += qc_i · T[idx(pos_i, kk)]
    over the chunk's dims offs_d, one table row gathered per query row (L1 / L2 hits)."""
    offs_r = tl.arange(0, KR)
    for kk in range(n_k):
        idx = _rel_index(pos, kk, ratio_q, ratio_k, offset)
        rows = tl.load(T + idx[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)
        rel += tl.where(offs_r[None, :] == col0 + kk, tl.sum(qc * rows.to(tl.float32), 1)[:, None], 0.0)
    return rel


@triton.jit
def _rel_terms(
    q_ptrs, qh, qw, ok, rel_pos, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KR: tl.constexpr
):
    """(BLOCK_M, KR) fp32 rel tile of a query block: column kk < k_h holds relh[i, kk] = q_i · TH[dh(qh_i, kk)],
    column k_h + kk relw[i, kk]; 0 on rows not ok and columns past k_h + k_w. ``q_ptrs`` (BLOCK_M,) points at
    the rows of q. D is taken in chunks of 32 (q re-read from L1), and per chunk a loop over the k_h + k_w key
    positions gathers one table row per query row: a few registers instead of fp32 copies of whole
    (BLOCK_M, BLOCK_D) tiles."""
    TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w = rel_pos
    CHUNK: tl.constexpr = 32 if BLOCK_D > 32 else BLOCK_D
    rel = tl.zeros([BLOCK_M, KR], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, CHUNK):
        offs_d = d0 + tl.arange(0, CHUNK)
        mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        qc = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        rel = _axis_terms(rel, qc, qh, TH, stride_th, k_h, 0, rq_h, rk_h, c_h, offs_d, mask, KR)
        rel = _axis_terms(rel, qc, qw, TW, stride_tw, k_w, k_h, rq_w, rk_w, c_w, offs_d, mask, KR)
    return rel


@triton.jit
def _axis_grad_q(dq, drel, pos, T, stride_t, n_k, col0, ratio_q, ratio_k, offset, offs_d, row_ok, KR: tl.constexpr):
    """dq += Σ_kk drel[i, col0 + kk]·T[idx(pos_i, kk)] over one axis (table rows gathered per query row)."""
    offs_r = tl.arange(0, KR)
    for kk in range(n_k):
        c = tl.sum(tl.where(offs_r[None, :] == col0 + kk, drel, 0.0), 1)
        idx = _rel_index(pos, kk, ratio_q, ratio_k, offset)
        rows = tl.load(T + idx[:, None] * stride_t + offs_d[None, :], mask=row_ok, other=0.0)
        dq += c[:, None] * rows.to(tl.float32)
    return dq


@triton.jit
def _rel_grad_q(dq, drel, qh, qw, ok, rel_pos, offs_d, d_ok, KR: tl.constexpr):
    """dq (BLOCK_M, BLOCK_D) fp32 plus the rel terms' share: Σ_kk drel[i, kk]·TH[dh(qh_i, kk)] + Σ_kk
    drel[i, k_h + kk]·TW[dw(qw_i, kk)]."""
    TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w = rel_pos
    row_ok = ok[:, None] & d_ok[None, :]
    dq = _axis_grad_q(dq, drel, qh, TH, stride_th, k_h, 0, rq_h, rk_h, c_h, offs_d, row_ok, KR)
    return _axis_grad_q(dq, drel, qw, TW, stride_tw, k_w, k_h, rq_w, rk_w, c_w, offs_d, row_ok, KR)


@triton.jit
def _one_hot(kh, kw, sp, k_h, KR: tl.constexpr, DT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The (KR, BLOCK_N) selector E of a key block: E[kh_j, j] = E[k_h + kw_j, j] = 1 for spatial keys j, so
    rel E = R (the class key and keys past Nk get 0); (BLOCK_N, KR) = Eᵀ when TRANSPOSED."""
    offs_r = tl.arange(0, KR)
    if TRANSPOSED:
        e = ((offs_r[None, :] == kh[:, None]) | (offs_r[None, :] == k_h + kw[:, None])) & sp[:, None]
    else:
        e = ((offs_r[:, None] == kh[None, :]) | (offs_r[:, None] == k_h + kw[None, :])) & sp[None, :]
    return e.to(DT)


@triton.jit
def _split(rel, DT: tl.constexpr):
    """rel (fp32) as hi + lo in DT (the launcher's ``_rel_dtype``): one term for fp32 operands; two 16-bit
    terms otherwise (bf16: 16 significant bits and fp32's range)."""
    hi = rel.to(DT)
    if DT == tl.float32:
        lo = hi
    else:
        lo = (rel - hi.to(tl.float32)).to(DT)
    return hi, lo


@triton.jit
def _scaled_rel(
    q_base,
    stride_qm,
    start_m,
    offs_m,
    Nq,
    q_w,
    rel_pos,
    scale,
    CLS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    KR: tl.constexpr,
    DT: tl.constexpr,
):
    """The rel terms / scale of query rows start_m + offs_m (q rows at q_base) as the score MMA takes them:
    ``_split`` into DT (hi, lo)."""
    qh, qw, q_sp = _grid_pos(start_m, offs_m, Nq, q_w, CLS)
    rel = _rel_terms(q_base + offs_m * stride_qm, qh, qw, q_sp, rel_pos, HEAD_DIM, BLOCK_D, BLOCK_M, KR)
    return _split(rel / scale, DT)


@triton.jit
def _add_rel(s, rel_hi, rel_lo, e, PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr):
    """s + R on a score tile: rel E accumulated by the score MMAs into s itself (E (KR, BLOCK_N) from
    ``_one_hot``), or Eᵀ relᵀ on TRANSPOSED (key, query) tiles; 16-bit operands add the lo term of ``_split``."""
    if TRANSPOSED:
        s = tl.dot(e, tl.trans(rel_hi), s, input_precision=PRECISION)
        if e.dtype != tl.float32:
            s = tl.dot(e, tl.trans(rel_lo), s)
    else:
        s = tl.dot(rel_hi, e, s, input_precision=PRECISION)
        if e.dtype != tl.float32:
            s = tl.dot(rel_lo, e, s)
    return s


@triton.jit
def _load_rel(base, offs_m, n_r, m_ok, KR: tl.constexpr):
    """A (BLOCK_M, KR) tile of a row-major (rows, n_r) buffer; 0 past n_r and on rows not m_ok."""
    offs_r = tl.arange(0, KR)
    return load_tile(base, n_r, offs_m, offs_r, m_ok, offs_r < n_r, True, True)


@triton.jit
def _store_rel(base, offs_m, n_r, m_ok, x, KR: tl.constexpr):
    """Store the columns < n_r of rows m_ok of a (BLOCK_M, KR) tile as ``_load_rel`` reads them."""
    offs_r = tl.arange(0, KR)
    store_tile(base, n_r, offs_m, offs_r, x, m_ok, offs_r < n_r, True, True)


@triton.jit
def _load_rel_pair(base, lo_offset, offs_m, n_r, m_ok, KR: tl.constexpr, DT: tl.constexpr):
    """The (hi, lo) rel tiles the backward's preprocess stored (``_split``; lo only for 16-bit DT)."""
    hi = _load_rel(base, offs_m, n_r, m_ok, KR)
    if DT == tl.float32:
        lo = hi
    else:
        lo = _load_rel(base + lo_offset, offs_m, n_r, m_ok, KR)
    return hi, lo


@triton.jit
def _reread_rows(base, stride_m, row0, offs_m, offs_d, m_ok, d_ok):
    """Rows row0 + offs_m of a (rows, D) view read again in fp32 for the residual: volatile (an L2 hit, not
    merged with the first load), so the tile is not kept live in registers through the key loop."""
    x = tl.load(
        base + (row0 + offs_m[:, None]) * stride_m + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
        volatile=True,
    )
    return x.to(tl.float32)


@triton.jit
def _key_scores(k, n0, keys, HAS_REL: tl.constexpr, CLS: tl.constexpr, MASK_N: tl.constexpr, PRECISION, KR):
    """(s, kh, kw, sp): base-2 scores (q kᵀ + rel E)·qk_scale of the query block against key block n0 (−inf
    past Nk) and the keys' grid positions."""
    q, rel_hi, rel_lo, offs_n, _offs_d, _d_ok, _stride_kn, _stride_vn, Nk, k_h, k_w, qk_scale = keys
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    kh, kw, sp = _grid_pos(n0, offs_n, Nk, k_w, CLS)
    if HAS_REL:
        s = _add_rel(s, rel_hi, rel_lo, _one_hot(kh, kw, sp, k_h, KR, rel_hi.dtype, False), PRECISION, False)
    s = s * qk_scale
    if MASK_N:
        s = tl.where((n0 + offs_n < Nk)[None, :], s, float("-inf"))
    return s, kh, kw, sp


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
# R enters the score dot itself: S·(1/scale) = q kᵀ + [relh | relw]/scale · E with the one-hot selector E of
# the key block, accumulated by the same MMAs into the same accumulator (the rel tile split into bf16 hi + lo
# for 16-bit inputs), so no (BLOCK_M, BLOCK_N) gather, layout change or Nq×Nk tensor is needed. The key loops
# of the forward and of dQ pass their loop-invariant values as one tuple, ``keys`` = (q, rel_hi, rel_lo,
# offs_n, offs_d, d_ok, stride_kn, stride_vn, Nk, k_h, k_w, qk_scale).


@triton.jit
def _fwd_step(
    state,
    k_base,
    v_base,
    n0,
    keys,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KR: tl.constexpr,
):
    """One key block of the online softmax, ``state`` = (acc, l_i, m_i) in and out; scores in base 2."""
    acc, l_i, m_i = state
    _q, _rel_hi, _rel_lo, offs_n, offs_d, d_ok, stride_kn, stride_vn, Nk, _k_h, _k_w, _qk_scale = keys
    n_ok = n0 + offs_n < Nk
    k = load_tile(k_base, stride_kn, offs_n, offs_d, n_ok, d_ok, MASK_N, MASK_D)
    s, _kh, _kw, _sp = _key_scores(k, n0, keys, HAS_REL, CLS, MASK_N, PRECISION, KR)
    # The first key block holds key 0, so every row max is finite from the first step on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_tile(v_base, stride_vn, offs_n, offs_d, n_ok, d_ok, MASK_N, MASK_D)
    return accumulate_pv(acc, alpha, p, v, PRECISION), l_i, m_new


@triton.jit
def _pool_fwd_kernel(
    Q,
    K,
    V,
    TH,
    TW,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_th,
    stride_tw,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    Nq,
    Nk,
    q_w,
    k_h,
    k_w,
    rq_h,
    rk_h,
    c_h,
    rq_w,
    rk_w,
    c_w,
    scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    KR: tl.constexpr,
    REL_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """out and lse of one query block: the online softmax over the key blocks, the rel terms inside the score
    MMAs, + q when RESIDUAL."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, start_m = query_block(H, Nq, BLOCK_M)
    row0 = start_m.to(tl.int64)
    offs_m, m_ok = block_offsets(start_m, Nq, BLOCK_M)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)

    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    q = load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
    rel_hi = tl.zeros([BLOCK_M, KR], dtype=REL_DT)
    rel_lo = rel_hi
    if HAS_REL:
        rel_pos = (TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w)
        rel_hi, rel_lo = _scaled_rel(
            q_base, stride_qm, start_m, offs_m, Nq, q_w, rel_pos, scale, CLS, HEAD_DIM, BLOCK_D, BLOCK_M, KR, REL_DT
        )

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    state = (acc, tl.zeros([BLOCK_M], dtype=tl.float32), tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))
    keys = (q, rel_hi, rel_lo, tl.arange(0, BLOCK_N), offs_d, d_ok, stride_kn, stride_vn, Nk, k_h, k_w, qk_scale)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        state = _fwd_step(state, k_base, v_base, n0, keys, HAS_REL, CLS, False, MASK_D, PRECISION, KR)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    if not EVEN_N:
        state = _fwd_step(state, k_base, v_base, n_full, keys, HAS_REL, CLS, True, MASK_D, PRECISION, KR)
    acc, l_i, m_i = state

    out = acc / l_i[:, None]
    if RESIDUAL:
        out += _reread_rows(Q + b * stride_qb + h * stride_qh, stride_qm, row0, offs_m, offs_d, m_ok, d_ok)
    lse = logsumexp(m_i, l_i)
    o_base = Out + b * stride_ob + h * stride_oh + row0 * stride_om
    store_tile(o_base, stride_om, offs_m, offs_d, out, m_ok, d_ok, not EVEN_M, MASK_D)
    store_1d(Lse + bh.to(tl.int64) * Nq + row0 + offs_m, lse, m_ok, not EVEN_M)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pool_bwd_pre_kernel(
    Q,
    Out,
    DO,
    TH,
    TW,
    Delta,
    Rel,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_th,
    stride_tw,
    H,
    Nq,
    q_w,
    k_h,
    k_w,
    rq_h,
    rk_h,
    c_h,
    rq_w,
    rk_w,
    c_w,
    scale,
    lo_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    KR: tl.constexpr,
    REL_DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ (out − q if residual)) (the attention output's part of out), and with tables each
    query row's rel terms / scale into Rel[0] (B·H, Nq, k_h + k_w) (columns: relh, then relw) as the score MMA
    takes them: ``_split`` into REL_DT hi (Rel[0]) and, for 16-bit REL_DT, lo (Rel[1] = Rel + lo_offset)."""
    bh, b, h, start_m = query_block(H, Nq, BLOCK_M)
    row0 = start_m.to(tl.int64)
    offs_m, m_ok = block_offsets(start_m, Nq, BLOCK_M)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    o_base = Out + b * stride_ob + h * stride_oh + row0 * stride_om
    do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dom
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    o = load_tile(o_base, stride_om, offs_m, offs_d, m_ok, d_ok, True, True).to(tl.float32)
    do = load_tile(do_base, stride_dom, offs_m, offs_d, m_ok, d_ok, True, True).to(tl.float32)
    if RESIDUAL:
        o -= load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, True, True).to(tl.float32)
    row_base = bh.to(tl.int64) * Nq + row0
    tl.store(Delta + row_base + offs_m, tl.sum(o * do, 1), mask=m_ok)
    if HAS_REL:
        rel_pos = (TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w)
        hi, lo = _scaled_rel(
            q_base, stride_qm, start_m, offs_m, Nq, q_w, rel_pos, scale, CLS, HEAD_DIM, BLOCK_D, BLOCK_M, KR, REL_DT
        )
        rel_base = Rel + row_base * (k_h + k_w)
        _store_rel(rel_base, offs_m, k_h + k_w, m_ok, hi, KR)
        if REL_DT != tl.float32:
            _store_rel(rel_base + lo_offset, offs_m, k_h + k_w, m_ok, lo, KR)


@triton.jit
def _next_query_rows(rows_at, stride_qm, stride_dom, n_r, BLOCK_M: tl.constexpr):
    """The (q, dO, lse, delta, rel) row bases ``rows_at`` advanced by one query block."""
    q_base, do_base, lse_base, delta_base, rel_base = rows_at
    return (
        q_base + BLOCK_M * stride_qm,
        do_base + BLOCK_M * stride_dom,
        lse_base + BLOCK_M,
        delta_base + BLOCK_M,
        rel_base + BLOCK_M * n_r,
    )


@triton.jit
def _dkdv_step(
    dk,
    dv,
    rows_at,
    m_ok,
    block,
    HAS_REL: tl.constexpr,
    MASK_M: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KR: tl.constexpr,
):
    """One query block (row bases ``rows_at`` = (q, dO, lse, delta, rel)) against the resident key block
    ``block`` = (k, v, e, offs_m, offs_d, d_ok, stride_qm, stride_dom, n_r, lo_offset, qk_scale), on
    transposed (key, query) tiles."""
    q_base, do_base, lse_base, delta_base, rel_base = rows_at
    k, v, e, offs_m, offs_d, d_ok, stride_qm, stride_dom, n_r, lo_offset, qk_scale = block
    q = load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, MASK_M, MASK_D)
    do = load_tile(do_base, stride_dom, offs_m, offs_d, m_ok, d_ok, MASK_M, MASK_D)
    # Out-of-range query rows read lse = +inf, so p = 0 and they add nothing.
    lse2 = load_lse2(lse_base + offs_m, m_ok, MASK_M)
    delta = load_1d(delta_base + offs_m, m_ok, 0.0, MASK_M)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    if HAS_REL:
        # (BLOCK_M, KR) row-major tiles (coalesced), used transposed as the MMA's B operand.
        rel_hi, rel_lo = _load_rel_pair(rel_base, lo_offset, offs_m, n_r, m_ok, KR, e.dtype)
        sT = _add_rel(sT, rel_hi, rel_lo, e, PRECISION, True)
    pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _pool_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    Rel,
    DK,
    DV,
    Part,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    Nq,
    Nk,
    k_h,
    k_w,
    rows,
    part_stride,
    lo_offset,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    KR: tl.constexpr,
    REL_DT: tl.constexpr,
    CHUNKED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dK, dV of one key block from the query rows [chunk·rows, (chunk + 1)·rows) (rows a multiple of BLOCK_M):
    MViTv2 has few keys and many queries, so the queries are split over programs; CHUNKED: each writes an fp32
    partial Part[0 | 1, chunk, b·h] (Nk, D) that the launcher sums, else dK, dV directly."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(Nq, rows)
    chunk = pid % num_chunks
    num_n = tl.cdiv(Nk, BLOCK_N)
    bh = pid // num_chunks // num_n
    start_n = (pid // num_chunks % num_n) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    col0 = start_n.to(tl.int64)
    row_start = chunk * rows
    row_end = tl.minimum(row_start + rows, Nq)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n, n_ok = block_offsets(start_n, Nk, BLOCK_N)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    kh, kw, k_sp = _grid_pos(start_n, offs_n, Nk, k_w, CLS)
    e = _one_hot(kh, kw, k_sp, k_h, KR, REL_DT, True)
    k_base = K + b * stride_kb + h * stride_kh + col0 * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + col0 * stride_vn
    k = load_tile(k_base, stride_kn, offs_n, offs_d, n_ok, d_ok, not EVEN_N, MASK_D)
    v = load_tile(v_base, stride_vn, offs_n, offs_d, n_ok, d_ok, not EVEN_N, MASK_D)

    row0 = row_start.to(tl.int64)
    row_base = bh.to(tl.int64) * Nq + row0
    n_r = k_h + k_w
    rows_at = (
        Q + b * stride_qb + h * stride_qh + row0 * stride_qm,
        DO + b * stride_dob + h * stride_doh + row0 * stride_dom,
        Lse + row_base,
        Delta + row_base,
        Rel + row_base * n_r,
    )
    block = (k, v, e, offs_m, offs_d, d_ok, stride_qm, stride_dom, n_r, lo_offset, qk_scale)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = row_start + (row_end - row_start) // BLOCK_M * BLOCK_M
    for _ in range(row_start, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, rows_at, offs_m < BLOCK_M, block, HAS_REL, False, MASK_D, PRECISION, KR)
        rows_at = _next_query_rows(rows_at, stride_qm, stride_dom, n_r, BLOCK_M)
    if not EVEN_M:
        if m_full < row_end:
            dk, dv = _dkdv_step(dk, dv, rows_at, m_full + offs_m < row_end, block, HAS_REL, True, MASK_D, PRECISION, KR)

    dk = dk * scale
    if CHUNKED:
        # Part[0 | 1, chunk, b·h] is a contiguous (Nk, HEAD_DIM) fp32 block; B·H = programs / (chunks · key blocks).
        bhs = tl.num_programs(0) // (num_chunks * num_n)
        slot = Part + ((chunk.to(tl.int64) * bhs + bh) * Nk + col0) * HEAD_DIM
        store_tile(slot, HEAD_DIM, offs_n, offs_d, dk, n_ok, d_ok, not EVEN_N, MASK_D)
        store_tile(slot + part_stride, HEAD_DIM, offs_n, offs_d, dv, n_ok, d_ok, not EVEN_N, MASK_D)
    else:
        dk_base = DK + b * stride_dkb + h * stride_dkh + col0 * stride_dkn
        dv_base = DV + b * stride_dvb + h * stride_dvh + col0 * stride_dvn
        store_tile(dk_base, stride_dkn, offs_n, offs_d, dk, n_ok, d_ok, not EVEN_N, MASK_D)
        store_tile(dv_base, stride_dvn, offs_n, offs_d, dv, n_ok, d_ok, not EVEN_N, MASK_D)


@triton.jit
def _dq_step(
    dq,
    drel,
    k_base,
    v_base,
    n0,
    keys,
    grads,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    KR: tl.constexpr,
):
    """One key block against the resident query block (``grads`` = its (dO, lse2, delta)): dq, and dS summed
    per key row and column (drel = dS Eᵀ, in the operands' precision like dq itself)."""
    _q, _rel_hi, _rel_lo, offs_n, offs_d, d_ok, stride_kn, stride_vn, Nk, k_h, _k_w, _qk_scale = keys
    do, lse2, delta = grads
    n_ok = n0 + offs_n < Nk
    k = load_tile(k_base, stride_kn, offs_n, offs_d, n_ok, d_ok, MASK_N, MASK_D)
    v = load_tile(v_base, stride_vn, offs_n, offs_d, n_ok, d_ok, MASK_N, MASK_D)
    s, kh, kw, sp = _key_scores(k, n0, keys, HAS_REL, CLS, MASK_N, PRECISION, KR)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    if HAS_REL:
        drel = tl.dot(ds, _one_hot(kh, kw, sp, k_h, KR, k.dtype, True), drel, input_precision=PRECISION)
    return dq, drel


@triton.jit
def _pool_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    Rel,
    TH,
    TW,
    DQ,
    DRel,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_th,
    stride_tw,
    H,
    Nq,
    Nk,
    q_w,
    k_h,
    k_w,
    rq_h,
    rk_h,
    c_h,
    rq_w,
    rk_w,
    c_w,
    lo_offset,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr,
    CLS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    KR: tl.constexpr,
    REL_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dQ of one query block over the key blocks (+ dO when RESIDUAL) and, with tables, its dS summed per key
    row and column into DRel (fp32, for the table kernel) and their share of dQ."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, start_m = query_block(H, Nq, BLOCK_M)
    row0 = start_m.to(tl.int64)
    offs_m, m_ok = block_offsets(start_m, Nq, BLOCK_M)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    row_base = bh.to(tl.int64) * Nq + row0
    n_r = k_h + k_w

    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dom
    q = load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
    do = load_tile(do_base, stride_dom, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
    lse2 = load_lse2(Lse + row_base + offs_m, m_ok, not EVEN_M)
    delta = load_1d(Delta + row_base + offs_m, m_ok, 0.0, not EVEN_M)
    rel_hi = tl.zeros([BLOCK_M, KR], dtype=REL_DT)
    rel_lo = rel_hi
    if HAS_REL:
        rel_hi, rel_lo = _load_rel_pair(Rel + row_base * n_r, lo_offset, offs_m, n_r, m_ok, KR, REL_DT)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drel = tl.zeros([BLOCK_M, KR], dtype=tl.float32)
    keys = (q, rel_hi, rel_lo, tl.arange(0, BLOCK_N), offs_d, d_ok, stride_kn, stride_vn, Nk, k_h, k_w, qk_scale)
    grads = (do, lse2, delta)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        dq, drel = _dq_step(dq, drel, k_base, v_base, n0, keys, grads, HAS_REL, CLS, False, MASK_D, PRECISION, KR)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    if not EVEN_N:
        dq, drel = _dq_step(dq, drel, k_base, v_base, n_full, keys, grads, HAS_REL, CLS, True, MASK_D, PRECISION, KR)

    dq = dq * scale
    if HAS_REL:
        # The class row has no rel terms: its dS sums are stored but every reader masks them out (q_sp).
        qh, qw, q_sp = _grid_pos(start_m, offs_m, Nq, q_w, CLS)
        _store_rel(DRel + row_base * n_r, offs_m, n_r, m_ok, drel, KR)
        rel_pos = (TH, TW, stride_th, stride_tw, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w)
        dq = _rel_grad_q(dq, drel, qh, qw, q_sp, rel_pos, offs_d, d_ok, KR)
    if RESIDUAL:
        dq += _reread_rows(DO + b * stride_dob + h * stride_doh, stride_dom, row0, offs_m, offs_d, m_ok, d_ok)
    dq_base = DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqm
    store_tile(dq_base, stride_dqm, offs_m, offs_d, dq, m_ok, d_ok, not EVEN_M, MASK_D)


@triton.jit
def _pool_bwd_table_kernel(
    Q,
    DRel,
    Part,
    stride_qb,
    stride_qh,
    stride_qm,
    H,
    Nq,
    q_w,
    n_r,
    col0,
    n_k,
    L,
    ratio_q,
    ratio_k,
    offset,
    units_per_bh,
    units_per_prog,
    total_units,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CLS: tl.constexpr,
    AXIS: tl.constexpr,
    UNIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One table's gradient rows [l0, l0 + BLOCK_L) from a run of (b·h, UNIT query rows) units: the partial
    Σ_i W[i, l]·q_i with W[i, l] = Σ_{kk: idx(pos_i, kk) = l} drel[i, col0 + kk], one (BLOCK_L, BLOCK_M) ×
    (BLOCK_M, D) dot per query block, into Part[program] (L, D) fp32. AXIS 0: rel_pos_h (pos = qh), 1:
    rel_pos_w (pos = qw)."""
    pid = tl.program_id(0)
    l0 = tl.program_id(1) * BLOCK_L
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = l0 + tl.arange(0, BLOCK_L)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    u_end = tl.minimum(pid * units_per_prog + units_per_prog, total_units)
    for u in range(pid * units_per_prog, u_end):
        bh = u // units_per_bh
        r0 = (u % units_per_bh) * UNIT
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        drel_base = DRel + bh.to(tl.int64) * Nq * n_r + col0
        for m0 in range(r0, tl.minimum(r0 + UNIT, Nq), BLOCK_M):
            m_ok = m0 + offs_m < Nq
            q = tl.load(
                q_base + (m0 + offs_m[:, None]).to(tl.int64) * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            qh, qw, sp = _grid_pos(m0, offs_m, Nq, q_w, CLS)
            if AXIS == 0:
                pos = qh
            else:
                pos = qw
            w = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
            for kk in range(n_k):
                c = tl.load(drel_base + (m0 + offs_m) * n_r + kk, mask=sp, other=0.0)
                idx = _rel_index(pos, kk, ratio_q, ratio_k, offset)
                w += tl.where(idx[:, None] == offs_l[None, :], c[:, None], 0.0)
            acc = tl.dot(tl.trans(w.to(q.dtype)), q, acc, input_precision=PRECISION)
    part = Part + pid.to(tl.int64) * L * HEAD_DIM
    tl.store(part + offs_l[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=(offs_l < L)[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------

_EVEN = {
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Nk"] % a["BLOCK_N"] == 0,
}


def _prune(configs, named_args, **kwargs):
    """Drop configs whose blocks are far larger than the sequences (e.g. Nk = 50 and BLOCK_N = 128)."""
    cap_m = max(32, launch.next_pow2(max(int(named_args["Nq"]), 1)))
    cap_n = max(32, launch.next_pow2(max(int(named_args["Nk"]), 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_table(configs, named_args, **kwargs):
    """Drop configs whose table block is far longer than the table."""
    cap = max(32, launch.next_pow2(max(int(named_args["L"]), 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_L"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_L"])]


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the table kernel's (BLOCK_M, BLOCK_L, ...). 16-bit inputs: chosen
# from an offline sm_90a compile (ptxas, tests/triton/triton_sm90.py) at MViTv2-T's shapes (D = 96 in a BLOCK_D
# of 128; k maps 7×7, 14×14 and 28×28, i.e. rel tiles KR = 16, 32, 64): the forward and the table kernel never
# spill, dK/dV and dQ have configs that spill at none of these shapes (a few spill ≤ 56 B at KR = 64); 4-warp
# 64-row score tiles and dQ's BLOCK_M < 64 spilled and were left out. fp32: exact ("ieee") dots run on CUDA
# cores and Triton's FMA lowering spills at BLOCK_D = 128 whatever the tile (as in attention.py), so only small
# tiles, chosen to spill least there and not with TF32; one list serves both. Numbers: docs/pool_attention.md.
_BLOCKS = ("BLOCK_M", "BLOCK_N")
_CONFIGS = {  # per family: (forward, dK/dV, dQ, table)
    "half": (
        launch.configs(_BLOCKS, [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)]),
        # BLOCK_N = resident key block, BLOCK_M = streamed query block
        launch.configs(_BLOCKS, [(32, 128, 8, 3), (32, 64, 8, 3), (16, 64, 4, 2), (16, 128, 8, 2)]),
        launch.configs(_BLOCKS, [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)]),
        launch.configs(("BLOCK_M", "BLOCK_L"), [(64, 64, 4, 2), (32, 128, 8, 2), (64, 32, 4, 2)]),
    ),
    "fp32": (
        launch.configs(_BLOCKS, [(16, 32, 4, 2), (64, 32, 4, 2)]),
        launch.configs(_BLOCKS, [(16, 32, 4, 2), (32, 32, 8, 2)]),
        launch.configs(_BLOCKS, [(16, 16, 4, 2), (64, 32, 4, 2)]),
        launch.configs(("BLOCK_M", "BLOCK_L"), [(32, 32, 4, 2), (64, 32, 4, 2)]),
    ),
}

_KEY = ["Nq", "Nk", "BLOCK_D", "HAS_REL", "KR", "PRECISION"]
_fwd_fixed = triton.heuristics(_EVEN)(_pool_fwd_kernel)
_dkdv_fixed = triton.heuristics(_EVEN)(_pool_bwd_dkdv_kernel)
_dq_fixed = triton.heuristics(_EVEN)(_pool_bwd_dq_kernel)
_TUNED = launch.tuned_table(
    _CONFIGS,
    [
        (_fwd_fixed, dict(key=_KEY, prune=_prune)),
        (_dkdv_fixed, dict(key=_KEY, prune=_prune)),
        (_dq_fixed, dict(key=_KEY, prune=_prune)),
        (_pool_bwd_table_kernel, dict(key=["L", "n_k", "total_units", "BLOCK_D", "PRECISION"], prune=_prune_table)),
    ],
)
_INTERPRETED = launch.is_interpreted(_pool_fwd_kernel)

# kernel name -> (index in _TUNED[family], interpreter kernel)
_KERNELS = {
    "fwd": (0, _fwd_fixed),
    "dkdv": (1, _dkdv_fixed),
    "dq": (2, _dq_fixed),
    "table": (3, _pool_bwd_table_kernel),
}


def _launch(name, grid, args, meta, fixed, dtype):
    """``grid(blocks)`` programs of kernel ``name``: the interpreter's fixed blocks or the autotuned kernel."""
    index, fixed_kernel = _KERNELS[name]
    kernel = launch.pick(fixed, fixed_kernel, _TUNED, dtype, index)
    keys = ("BLOCK_M", "BLOCK_L") if name == "table" else _BLOCKS
    if fixed:
        blocks = dict(zip(keys, INTERPRET_BLOCKS[name], strict=True))
        kernel[grid(blocks)](*args, **meta, **launch.fixed_meta(True, **blocks))
    else:
        kernel[grid](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token):
    """(B, H, Nq, Nk, D, (q_h, q_w), (k_h, k_w)) after validating the shapes the kernels rely on."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, heads, N, D), got shape {tuple(t.shape)}")
        launch.check_dtype(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if tuple(k.shape) != (B, H, Nk, D) or v.shape != k.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"k, v must be (B, heads, Nk, D) of q's dtype: q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported by the Triton pool_attention kernels (1 <= D <= 128)")
    (q_h, q_w), (k_h, k_w) = (int(x) for x in q_hw), (int(x) for x in k_hw)
    cls = int(bool(has_cls_token))
    if min(q_h, q_w, k_h, k_w) < 1 or Nq != q_h * q_w + cls or Nk != k_h * k_w + cls:
        raise ValueError(
            f"q_hw {tuple(q_hw)}, k_hw {tuple(k_hw)} (has_cls_token={bool(has_cls_token)}) do not match "
            f"Nq={Nq}, Nk={Nk}"
        )
    if (rel_pos_h is None) != (rel_pos_w is None):
        raise ValueError("rel_pos_h and rel_pos_w are both given or both None")
    if rel_pos_h is not None:
        for name, t, need in (
            ("rel_pos_h", rel_pos_h, _rel_rows(q_h, k_h)),
            ("rel_pos_w", rel_pos_w, _rel_rows(q_w, k_w)),
        ):
            launch.check_dtype(name, t)
            if t.dim() != 2 or t.shape[1] != D or t.shape[0] < need or t.device != q.device:
                raise ValueError(
                    f"{name} must be (L, {D}) with L >= {need} on {q.device}, got {tuple(t.shape)} on {t.device}"
                )
    return B, H, Nq, Nk, D, (q_h, q_w), (k_h, k_w)


def _s3(*tensors):
    """The (B, H, rows) strides of each (B, H, rows, D) view, in order: the kernels' stride arguments."""
    return launch.strides(*tensors, dims=3)


def _heads_view(t, B, Nq, H, D):
    """A (B, Nq, H·D) token-layout tensor as a (B, H, Nq, D) view (copied only if it cannot be viewed)."""
    return launch.unit_last(t.reshape(B, Nq, H, D).transpose(1, 2))


def _rel_dtype(dtype):
    """Operand type of the rel tile's MMAs (``_split``): fp32 inputs keep fp32; 16-bit inputs use bf16 hi + lo
    terms (fp32's range: rel / scale cannot overflow), float16 in the interpreter, whose bf16 dot is wrong."""
    if dtype == torch.float32:
        return tl.float32
    return tl.float16 if _INTERPRETED else tl.bfloat16


def _geometry(q_hw, k_hw, has_rel):
    """Kernel scalars (q_w, k_h, k_w, rq_h, rk_h, c_h, rq_w, rk_w, c_w) and KR, the rel tile's width."""
    (q_h, q_w), (k_h, k_w) = q_hw, k_hw
    ratios = (*rel_ratios(q_h, k_h), *rel_ratios(q_w, k_w)) if has_rel else (0.0,) * 6
    return (q_w, k_h, k_w, *ratios), launch.pow2_at_least(k_h + k_w)


def _dkdv_rows(nq: int, key_programs: int, device, fixed: bool) -> int:
    """Query rows per dK/dV program: the interpreter's fixed BLOCK_M (``DKDV_ROWS`` if set), else a multiple of
    128 (so of every tuned BLOCK_M) that gives about ``DKDV_WAVES`` programs per SM, or all of Nq."""
    if DKDV_ROWS is not None:
        return int(DKDV_ROWS)
    if fixed:
        return INTERPRET_BLOCKS["dkdv"][0]
    chunks = max(1, launch.cdiv(DKDV_WAVES * sm_count(device), max(key_programs, 1)))
    return max(128, launch.cdiv(launch.cdiv(nq, chunks), 128) * 128)


def pool_attention_fwd(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    """(out, lse): out (B, Nq, heads·D) in q's dtype, lse (B, heads, Nq) float32 (natural log of Σ_j e^S).

    q (B, heads, Nq, D), k, v (B, heads, Nk, D) with any strides (a strided last dim is copied); tables
    (L, D) or both None; see the module docstring for the math."""
    B, H, Nq, Nk, D, q_hw, k_hw = _check(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token)
    q, k, v = launch.unit_last(q), launch.unit_last(k), launch.unit_last(v)
    has_rel = rel_pos_h is not None
    th, tw = (launch.unit_last(rel_pos_h), launch.unit_last(rel_pos_w)) if has_rel else (q, q)
    out = torch.empty((B, Nq, H * D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if B * H * Nq == 0:
        return out, lse
    geo, kr = _geometry(q_hw, k_hw, has_rel)
    args = (
        q,
        k,
        v,
        th,
        tw,
        out,
        lse,
        *_s3(q, k, v),
        th.stride(0),
        tw.stride(0),
        Nq * H * D,
        D,
        H * D,
        H,
        Nq,
        Nk,
        *geo,
        float(scale),
        float(scale) * launch.LOG2E,
    )
    meta = dict(
        HEAD_DIM=D,
        BLOCK_D=launch.pow2_at_least(D),
        HAS_REL=has_rel,
        CLS=int(bool(has_cls_token)),
        RESIDUAL=bool(residual),
        KR=kr,
        REL_DT=_rel_dtype(q.dtype),
        PRECISION=launch.precision(q.dtype),
    )
    fixed = use_fixed(q, _INTERPRETED, "pool_attention")
    with launch.device_ctx(q):
        _launch("fwd", lambda m: (launch.cdiv(Nq, m["BLOCK_M"]) * B * H,), args, meta, fixed, q.dtype)
    return out, lse


def pool_attention_bwd(dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    """(dq, dk, dv, drel_pos_h, drel_pos_w) for ``pool_attention_fwd``'s (out, lse) and dout (B, Nq, heads·D).

    dq includes the residual's dout; the table grads are None without tables, else of the tables' shapes and
    dtypes (accumulated in float32: per-program partials summed by torch, deterministic; no atomics)."""
    B, H, Nq, Nk, D, q_hw, k_hw = _check(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token)
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != (B, Nq, H * D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, Nq, H * D)}")
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(B, H, Nq)}")
    has_rel = rel_pos_h is not None
    q, k, v = launch.unit_last(q), launch.unit_last(k), launch.unit_last(v)
    th, tw = (launch.unit_last(rel_pos_h), launch.unit_last(rel_pos_w)) if has_rel else (q, q)
    do = _heads_view(dout.to(q.dtype), B, Nq, H, D)
    o = _heads_view(out.to(q.dtype), B, Nq, H, D)
    lse = lse.to(torch.float32).contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    drel = [torch.empty_like(rel_pos_h), torch.empty_like(rel_pos_w)] if has_rel else [None, None]
    if B * H * Nq == 0:
        for t in (dq, dk, dv, *drel):
            if t is not None:
                t.zero_()
        return dq, dk, dv, *drel

    q_w, (k_h, k_w) = q_hw[1], k_hw
    geo, kr = _geometry(q_hw, k_hw, has_rel)
    BLOCK_D = launch.pow2_at_least(D)
    cls = int(bool(has_cls_token))
    fixed = use_fixed(q, _INTERPRETED, "pool_attention")
    precision = launch.precision(q.dtype)
    qk_scale = float(scale) * launch.LOG2E
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty((B * H, Nq), **f32)
    # Per query row, (B·H, Nq, k_h + k_w): its rel terms / scale as the score MMA takes them (``_split``: hi,
    # and lo for 16-bit inputs, computed once by the preprocess kernel) and dS summed per key row and column
    # (drelh | drelw, fp32, written by the dQ kernel for the table kernel).
    n_r = k_h + k_w
    rel_dt = _rel_dtype(q.dtype)
    rel_torch = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}[rel_dt]
    parts = 1 if rel_torch == torch.float32 else 2
    rel = torch.empty((parts, B * H, Nq, n_r), device=q.device, dtype=rel_torch) if has_rel else delta
    lo_offset = B * H * Nq * n_r if has_rel and parts == 2 else 0
    drel_rows = torch.empty((B * H, Nq, n_r), **f32) if has_rel else delta
    heads = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_REL=has_rel, CLS=cls, KR=kr, REL_DT=rel_dt)

    with launch.device_ctx(q):
        bm = INTERPRET_BLOCKS["pre"] if fixed else PRE_BLOCK_M
        _pool_bwd_pre_kernel[(launch.cdiv(Nq, bm) * B * H,)](
            q,
            o,
            do,
            th,
            tw,
            delta,
            rel,
            *_s3(q, o, do),
            th.stride(0),
            tw.stride(0),
            H,
            Nq,
            *geo,
            float(scale),
            lo_offset,
            **heads,
            RESIDUAL=bool(residual),
            BLOCK_M=bm,
        )
        common = _s3(q, k, v, do)
        # dK, dV: programs per (key block, b·h, chunk of query rows); with > 1 chunk, fp32 partials summed here.
        rows = _dkdv_rows(Nq, B * H * launch.cdiv(Nk, 64), q.device, fixed)
        chunks = launch.cdiv(Nq, rows)
        part = torch.empty((2, chunks, B * H, Nk, D) if chunks > 1 else (1,), **f32)
        args = (q, k, v, do, lse, delta, rel, dk, dv, part, *common, *_s3(dk, dv), H, Nq, Nk, k_h, k_w)
        args = (*args, rows, part[0].numel() if chunks > 1 else 0, lo_offset, qk_scale, float(scale))
        meta = dict(heads, PRECISION=precision)
        grid_n = lambda m: (launch.cdiv(Nk, m["BLOCK_N"]) * B * H * chunks,)  # noqa: E731
        _launch("dkdv", grid_n, args, dict(meta, CHUNKED=chunks > 1), fixed, q.dtype)
        if chunks > 1:
            sums = part.sum(1).view(2, B, H, Nk, D)
            dk.copy_(sums[0])
            dv.copy_(sums[1])
        args = (q, k, v, do, lse, delta, rel, th, tw, dq, drel_rows, *common, *_s3(dq), th.stride(0), tw.stride(0))
        args = (*args, H, Nq, Nk, *geo, lo_offset, qk_scale, float(scale))
        grid_m = lambda m: (launch.cdiv(Nq, m["BLOCK_M"]) * B * H,)  # noqa: E731
        _launch("dq", grid_m, args, dict(meta, RESIDUAL=bool(residual)), fixed, q.dtype)
        if has_rel:
            # Runs of UNIT query rows of one (b, h); each program sums a run of units into one fp32 partial.
            unit = INTERPRET_BLOCKS["table"][0] if fixed else TABLE_UNIT
            units_per_bh = launch.cdiv(Nq, unit)
            total = units_per_bh * B * H
            target = 2 if fixed else TABLE_WAVES * sm_count(q.device)
            per_prog = launch.cdiv(total, max(1, target))
            programs = launch.cdiv(total, per_prog)
            for axis, (table, col0, n_k, (rq, rk, c)) in enumerate(((th, 0, k_h, geo[3:6]), (tw, k_h, k_w, geo[6:9]))):
                L = table.shape[0]
                part = torch.empty((programs, L, D), **f32)
                targs = (q, drel_rows, part, *_s3(q), H, Nq, q_w, n_r, col0, n_k, L, rq, rk, c)
                targs = (*targs, units_per_bh, per_prog, total)
                tmeta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CLS=cls, AXIS=axis, UNIT=unit, PRECISION=precision)
                grid_l = lambda m, L=L: (programs, launch.cdiv(L, m["BLOCK_L"]))  # noqa: E731
                _launch("table", grid_l, targs, tmeta, fixed, q.dtype)
                drel[axis].copy_(part.sum(0))
    return dq, dk, dv, *drel
