"""FlashAttention-2 style Triton kernels for ``vitkernels.attention`` / ``self_attention``.

Math, per (batch b, [group g,] head h), q (Nq, D), k and v (Nk, D), an optional bias (Nq, Nk):

    S = q kᵀ · scale + bias,   P = softmax_rows(S),   O = P v,   lse = logsumexp_rows(S)
    (a row of all -inf scores gives O = 0, lse = +inf; the softmax runs in base 2, exp2)
    backward (FA2): delta = rowsum(dO ∘ O), P = exp(S - lse) recomputed per tile, dV = Pᵀ dO,
    dS = P ∘ (dO vᵀ - delta) (= dbias before broadcast reduction), dQ = dS k·scale, dK = dSᵀ q·scale

Layout: q, k, v, out, dq, dk, dv are strided (B, H, N, D) or (B, G, H, N, D) views with a unit last
stride (slices of packed projections are read in place); the bias an expanded (B, H, Nq, Nk) view
(0 strides on broadcast dims; a boolean mask read as bytes); lse float32 (B, [G,] H, Nq). Kernels:
``_attn_fwd_kernel`` (one program per query block), ``_attn_bwd_preprocess``,
``_attn_bwd_dkdv_kernel`` (per key block), ``_attn_bwd_dq_kernel`` (per query block, + dbias), or
the single-kernel backward: the dK/dV kernel with DQ_MODE 1 (dQ by fp32 atomics) or 2 (per-key-block
dQ partials), chosen by ``backward_kernel``; 1-D grids, D ≤ 128 padded to BLOCK_D. Autotuned on a
GPU, a fixed config under TRITON_INTERPRET=1 (``INTERPRET_BLOCKS``). Design notes, cost and
versions: docs/attention.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from . import _launch as launch
from . import attention_short as short
from ._launch import use_fixed  # module globals: tests patch them here
from ._tiles import accumulate_pv, load_lse2, logsumexp
from ._tiles import load_1d as _load_1d
from ._tiles import load_2d as _load_2d
from ._tiles import store_1d as _store_1d
from ._tiles import store_2d as _store_2d

__all__ = [
    "BACKWARD_KERNELS",
    "MAX_HEAD_DIM",
    "attention_backward",
    "attention_flops",
    "attention_forward",
    "backward_kernel",
]

MAX_HEAD_DIM = 128


# Fixed block sizes used under the interpreter (CPU); tests may monkeypatch this dict to exercise
# other tilings. Values: (BLOCK_M, BLOCK_N).
INTERPRET_BLOCKS = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32), "fused": (32, 32)}


# ---------------------------------------------------------------------------------------------
# Small jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _apply_bias(s, bias, KIND: tl.constexpr):
    """Scores s (log2 units) with the bias tile applied. KIND (the kernels' HAS_BIAS) 1: an additive
    bias in natural-log units; 2: a boolean keep-mask read as bytes (0 = the key is excluded: -inf)."""
    if KIND == 2:
        s = tl.where(bias != 0, s, float("-inf"))
    else:
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _emit_dbias(
    db_base,
    ds,
    rc,
    SUM_R: tl.constexpr,
    SUM_C: tl.constexpr,
    ATOMIC: tl.constexpr,
    MASK_R: tl.constexpr,
    MASK_C: tl.constexpr,
):
    """dS of one (rows, columns) tile into dbias, summed over the rows and/or columns where dbias is
    broadcast along them (fp32 atomics), else stored (ATOMIC: added, when programs share dbias
    entries). rc = ((row, column) offsets, (row, column) strides, (row, column) validity); ds must
    be 0 on out-of-range rows and columns."""
    offs, strides, oks = rc
    offs_r, offs_c = offs
    stride_r, stride_c = strides
    r_ok, c_ok = oks
    if SUM_R:
        if SUM_C:
            tl.atomic_add(db_base, tl.sum(tl.sum(ds, 1), 0))
        else:
            tl.atomic_add(db_base + offs_c * stride_c, tl.sum(ds, 0), mask=c_ok)
    else:
        if SUM_C:
            tl.atomic_add(db_base + offs_r * stride_r, tl.sum(ds, 1), mask=r_ok)
        else:
            db_ptrs = db_base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
            if ATOMIC:
                tl.atomic_add(db_ptrs, ds, mask=r_ok[:, None] & c_ok[None, :])
            else:
                _store_2d(db_ptrs, ds, r_ok, c_ok, MASK_R, MASK_C)


@triton.jit
def _split_bh(bh, G, H):
    """(b, g, h) of a program's linear (batch, group, head) index, in int64. G = 1 for 4-D views."""
    bg = bh // H
    return (bg // G).to(tl.int64), (bg % G).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _query_program(G, H, rows, BLOCK_M: tl.constexpr):
    """(bh, b, g, h, start_m) of this program on a 1-D grid of ⌈rows / BLOCK_M⌉ query blocks per (b, g, h);
    b, g, h in int64."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(rows, BLOCK_M)
    bh = pid // num_m
    b, g, h = _split_bh(bh, G, H)
    return bh, b, g, h, (pid % num_m) * BLOCK_M


@triton.jit
def _extra_row(X, b, g, h, stride_b, stride_g, stride_h, offs_d, d_ok):
    """One D-vector per (b, g, h) in fp32: the extra key / value / query row of a class token,
    which is not in the token buffer (space_time_attention's shared class token)."""
    return tl.load(X + b * stride_b + g * stride_g + h * stride_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
# Addressing convention used by every kernel: a scalar base pointer is computed in int64 for the
# tile's origin (batch, head, first row), and the tile itself is addressed with small int32
# offsets (row * stride + col). Streamed tiles advance the scalar base; no 2-D pointer tensor or
# int64 vector is carried through a loop (that costs registers and caused spills).


@triton.jit
def _scores(
    q,
    k,
    b_base,
    offs,
    stride_bm,
    stride_bn,
    oks,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Base-2 scores q kᵀ·scale·log2 e (+ the bias tile at b_base) of one key block; keys past Nk
    (MASK_N) at -inf. offs = (m, n) offsets, oks = (m, n) validity."""
    offs_m, offs_n = offs
    m_ok, n_ok = oks
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        bias = _load_2d(b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, m_ok, n_ok, MASK_M, MASK_N)
        s = _apply_bias(s, bias, HAS_BIAS)
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _softmax_step(s, l_i, m_i):
    """The online softmax's update by one block of base-2 scores: (p, alpha, l_i, m_new), with p the
    block's unnormalised weights and alpha the factor that rescales what came before."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that is fully -inf so far subtracts 0 instead of -inf: exp2 sees -inf, never NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _softmax_finish(state):
    """(out, natural-log lse) of the online softmax state (acc, l_i, m_i); a row whose every score was
    -inf gives out = 0, lse = +inf."""
    acc, l_i, m_i = state
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("inf"), logsumexp(m_i, tl.where(empty, 1.0, l_i)))


@triton.jit
def _fwd_step(
    state,
    q,
    bases,
    offs,
    strides,
    oks,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax; scores are kept in base 2 (× log2 e). state = (acc, l_i,
    m_i), bases = (k, v, bias) tile origins, offs = (m, n, d) offsets, strides = (k row, v row, bias
    row, bias column), oks = (m, n, d) validity."""
    acc, l_i, m_i = state
    k_base, v_base, b_base = bases
    offs_m, offs_n, offs_d = offs
    stride_kn, stride_vn, stride_bm, stride_bn = strides
    m_ok, n_ok, d_ok = oks
    k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, MASK_N, MASK_D)
    s = _scores(
        q,
        k,
        b_base,
        (offs_m, offs_n),
        stride_bm,
        stride_bn,
        (m_ok, n_ok),
        qk_scale,
        HAS_BIAS,
        MASK_M,
        MASK_N,
        PRECISION,
    )
    p, alpha, l_i, m_new = _softmax_step(s, l_i, m_i)
    v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, MASK_N, MASK_D)
    acc = accumulate_pv(acc, alpha, p, v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Bias,
    Out,
    Lse,
    PK,
    PV,
    XQ,
    XO,
    XLse,
    stride_qb,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ob,
    stride_og,
    stride_oh,
    stride_om,
    stride_pb,
    stride_pg,
    stride_ph,
    stride_xqb,
    stride_xqg,
    stride_xqh,
    stride_xob,
    stride_xog,
    stride_xoh,
    G,
    H,
    Nq,
    Nk,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr = False,
    HAS_XROW: tl.constexpr = False,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    # HAS_XROW: one more query row per (b, g, h), XQ (a class token's query), runs as row Nq of the
    # last query block (a block of its own when BLOCK_M divides Nq); its out and lse go to XO, XLse.
    bh, b, g, h, start_m = _query_program(G, H, Nq + HAS_XROW, BLOCK_M)
    row0 = start_m.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = start_m + offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b * stride_qb + g * stride_qg + h * stride_qh + row0 * stride_qm
    q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
    if HAS_XROW:
        is_x = start_m + offs_m == Nq
        xq = _extra_row(XQ, b, g, h, stride_xqb, stride_xqg, stride_xqh, offs_d, d_ok)
        q = tl.where(is_x[:, None], xq[None, :].to(q.dtype), q)
    k_base = K + b * stride_kb + g * stride_kg + h * stride_kh
    v_base = V + b * stride_vb + g * stride_vg + h * stride_vh
    b_base = Bias + b * stride_bb + h * stride_bh + row0 * stride_bm

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_PREFIX:
        # A prefix key / value (PK, PV) before the Nk keys: the online softmax starts from it,
        # with running max = its score, sum = 1 and accumulator = its value row.
        pk = _extra_row(PK, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)
        m_i = tl.sum(q.to(tl.float32) * pk[None, :], 1) * qk_scale
        l_i += 1.0
        acc += _extra_row(PV, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)[None, :]

    # Full key blocks without masks, then the ragged tail (if any) with out-of-range keys at -inf.
    state = (acc, l_i, m_i)
    bases = (k_base, v_base, b_base)
    offs = (offs_m, offs_n, offs_d)
    strides = (stride_kn, stride_vn, stride_bm, stride_bn)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        oks = (m_ok, offs_n < Nk, d_ok)
        state = _fwd_step(state, q, bases, offs, strides, oks, qk_scale, HAS_BIAS, not EVEN_M, False, MASK_D, PRECISION)
        bases = (bases[0] + BLOCK_N * stride_kn, bases[1] + BLOCK_N * stride_vn, bases[2] + BLOCK_N * stride_bn)
    if not EVEN_N:
        oks = (m_ok, n_full + offs_n < Nk, d_ok)
        state = _fwd_step(state, q, bases, offs, strides, oks, qk_scale, HAS_BIAS, not EVEN_M, True, MASK_D, PRECISION)
    out, lse = _softmax_finish(state)

    o_base = Out + b * stride_ob + g * stride_og + h * stride_oh + row0 * stride_om
    _store_2d(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        m_ok,
        d_ok,
        not EVEN_M,
        MASK_D,
    )
    _store_1d(Lse + bh.to(tl.int64) * Nq + row0 + offs_m, lse, m_ok, not EVEN_M)
    if HAS_XROW:
        if start_m + BLOCK_M > Nq:  # this block holds the extra row
            xo = tl.sum(tl.where(is_x[:, None], out, 0.0), 0)
            xo_ptrs = XO + b * stride_xob + g * stride_xog + h * stride_xoh + offs_d
            tl.store(xo_ptrs, xo.to(XO.dtype.element_ty), mask=d_ok)
            tl.store(XLse + bh, tl.sum(tl.where(is_x, lse, 0.0), 0))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_og,
    stride_oh,
    stride_om,
    stride_dob,
    stride_dog,
    stride_doh,
    stride_dom,
    G,
    H,
    Nq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[bh, m] = sum_d dO[m, d] · O[m, d] in fp32."""
    bh, b, g, h, start_m = _query_program(G, H, Nq, BLOCK_M)
    row0 = start_m.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = start_m + offs_m < Nq
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_base = Out + b * stride_ob + g * stride_og + h * stride_oh + row0 * stride_om
    do_base = DO + b * stride_dob + g * stride_dog + h * stride_doh + row0 * stride_dom
    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Nq + row0 + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_step(
    grads,
    kv,
    bases,
    prefix_kv,
    offs,
    strides,
    oks,
    scales,
    with_prefix,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DQ_MODE: tl.constexpr,
    DBIAS: tl.constexpr,
    DB_SUM_M: tl.constexpr,
    DB_SUM_N: tl.constexpr,
    DB_ATOMIC: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    qdo=None,
):
    """One query block against the resident key block, on transposed (key, query) tiles. With
    DQ_MODE > 0 (the single-kernel backward) it also emits this pair of blocks' share of dQ, added
    with fp32 atomics (1) or stored as this key block's partial (2), and dS into dbias; the
    program of key block 0 (``with_prefix``) adds the prefix key's terms. Tuples: grads (dk, dv),
    kv (k, v), bases (q, dO, biasᵀ, lse, delta, dQ, dbias, prefix partial), prefix_kv (pk, pv),
    offs / oks (m, n, d), strides (q, dO, bias m, bias n, dQ, dbias m, dbias n rows), scales
    (qk_scale, scale); the constexprs as in _attn_bwd_dkdv_kernel. qdo: None, q and dO are loaded
    from their bases; or the (q, dO) tiles, 0 past Nq and D (the TMA kernel, attention_tma.py, whose
    q and dO bases are unused)."""
    dk, dv = grads
    k, v = kv
    q_base, do_base, bT_base, lse_base, delta_base, dq_base, db_base, part = bases
    pk, pv = prefix_kv
    offs_m, offs_n, offs_d = offs
    stride_qm, stride_dom, stride_bm, stride_bn, stride_dqm, stride_dbm, stride_dbn = strides
    m_ok, n_ok, d_ok = oks
    qk_scale, scale = scales
    if qdo is None:
        q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, MASK_M, MASK_D)
        do = _load_2d(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], m_ok, d_ok, MASK_M, MASK_D)
    else:
        q, do = qdo
    # Out-of-range query rows read lse = +inf, so p = 0 and they add nothing.
    lse2 = load_lse2(lse_base + offs_m, m_ok, MASK_M)
    delta = _load_1d(delta_base + offs_m, m_ok, 0.0, MASK_M)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        biasT = _load_2d(
            bT_base + offs_n[:, None] * stride_bn + offs_m[None, :] * stride_bm, n_ok, m_ok, MASK_N, MASK_M
        )
        sT = _apply_bias(sT, biasT, HAS_BIAS)
    if DQ_MODE > 0 and MASK_N:
        # Out-of-range keys (zero rows of k) must add nothing to dQ and dbias: p = 0 there.
        sT = tl.where(n_ok[:, None], sT, float("-inf"))
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    if DQ_MODE > 0:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION)
        if HAS_PREFIX:
            if with_prefix:
                qf, dof = q.to(tl.float32), do.to(tl.float32)
                p0 = tl.math.exp2(tl.sum(qf * pk[None, :], 1) * qk_scale - lse2)
                ds0 = p0 * (tl.sum(dof * pv[None, :], 1) - delta)
                dq += ds0[:, None] * pk[None, :]
                tl.store(part + offs_d, tl.sum(ds0[:, None] * qf, 0) * scale)
                tl.store(part + BLOCK_D + offs_d, tl.sum(p0[:, None] * dof, 0))
        dq_ptrs = dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :]
        if DQ_MODE == 1:
            tl.atomic_add(dq_ptrs, dq * scale, mask=m_ok[:, None] & d_ok[None, :])
        else:
            _store_2d(dq_ptrs, dq * scale, m_ok, d_ok, MASK_M, MASK_D)
        if DBIAS:
            # dsT is exactly 0 on out-of-range query rows (lse = +inf) and keys (-inf above).
            rc = ((offs_n, offs_m), (stride_dbn, stride_dbm), (n_ok, m_ok))
            _emit_dbias(db_base, dsT, rc, DB_SUM_N, DB_SUM_M, DB_ATOMIC, MASK_N, MASK_M)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Bias,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    XQ,
    XDO,
    XLse,
    XDelta,
    DQ,
    DBias,
    PK,
    PV,
    PPart,
    stride_qb,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dob,
    stride_dog,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkg,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvg,
    stride_dvh,
    stride_dvn,
    stride_xqb,
    stride_xqg,
    stride_xqh,
    stride_xdob,
    stride_xdog,
    stride_xdoh,
    stride_dqp,
    stride_dqb,
    stride_dqg,
    stride_dqh,
    stride_dqm,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    stride_dbn,
    stride_pb,
    stride_pg,
    stride_ph,
    slots,
    G,
    H,
    Nq,
    Nk,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_EXTRA_Q: tl.constexpr = False,
    DQ_MODE: tl.constexpr = 0,
    DBIAS: tl.constexpr = False,
    DB_SUM_M: tl.constexpr = False,
    DB_SUM_N: tl.constexpr = False,
    DB_ATOMIC: tl.constexpr = False,
    HAS_PREFIX: tl.constexpr = False,
):
    """dK, dV of one key block (resident), streaming the query blocks. DQ_MODE 0: that is all (the
    dQ kernel follows). DQ_MODE 1 / 2: the single-kernel backward, which also produces dQ (fp32
    atomics into DQ, or this key block's partial at DQ + key_block · stride_dqp), dbias and the
    prefix key's terms (see _dkdv_step); the dQ kernel is not launched."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid = tl.program_id(0)
    num_n = tl.cdiv(Nk, BLOCK_N)
    bh = pid // num_n
    block_n = pid % num_n
    start_n = block_n * BLOCK_N
    b, g, h = _split_bh(bh, G, H)
    col0 = start_n.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = start_n + offs_n < Nk
    d_ok = offs_d < HEAD_DIM

    k_base = K + b * stride_kb + g * stride_kg + h * stride_kh + col0 * stride_kn
    v_base = V + b * stride_vb + g * stride_vg + h * stride_vh + col0 * stride_vn
    k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, not EVEN_N, MASK_D)
    v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, not EVEN_N, MASK_D)

    q_base = Q + b * stride_qb + g * stride_qg + h * stride_qh
    do_base = DO + b * stride_dob + g * stride_dog + h * stride_doh
    lse_base = Lse + bh.to(tl.int64) * Nq
    delta_base = Delta + bh.to(tl.int64) * Nq
    bT_base = Bias + b * stride_bb + h * stride_bh + col0 * stride_bn
    dq_base = DQ + block_n.to(tl.int64) * stride_dqp + b * stride_dqb + g * stride_dqg + h * stride_dqh
    db_base = DBias + b * stride_dbb + h * stride_dbh + col0 * stride_dbn
    part = PPart + bh.to(tl.int64) * slots * (2 * BLOCK_D)
    pk = tl.zeros([BLOCK_D], dtype=tl.float32)
    pv = pk
    if HAS_PREFIX:
        pk = _extra_row(PK, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)
        pv = _extra_row(PV, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)

    grads = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32))
    offs = (offs_m, offs_n, offs_d)
    strides = (stride_qm, stride_dom, stride_bm, stride_bn, stride_dqm, stride_dbm, stride_dbn)
    m_full = (Nq // BLOCK_M) * BLOCK_M
    for _ in range(0, m_full, BLOCK_M):
        bases = (q_base, do_base, bT_base, lse_base, delta_base, dq_base, db_base, part)
        oks = (offs_m < Nq, n_ok, d_ok)
        grads = _dkdv_step(
            grads,
            (k, v),
            bases,
            (pk, pv),
            offs,
            strides,
            oks,
            (qk_scale, scale),
            block_n == 0,
            False,
            not EVEN_N,
            HAS_BIAS,
            MASK_D,
            PRECISION,
            DQ_MODE,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            HAS_PREFIX,
            BLOCK_D,
        )
        q_base += BLOCK_M * stride_qm
        do_base += BLOCK_M * stride_dom
        lse_base += BLOCK_M
        delta_base += BLOCK_M
        bT_base += BLOCK_M * stride_bm
        dq_base += BLOCK_M * stride_dqm
        db_base += BLOCK_M * stride_dbm
        part += 2 * BLOCK_D
    if not EVEN_M:
        bases = (q_base, do_base, bT_base, lse_base, delta_base, dq_base, db_base, part)
        oks = (m_full + offs_m < Nq, n_ok, d_ok)
        grads = _dkdv_step(
            grads,
            (k, v),
            bases,
            (pk, pv),
            offs,
            strides,
            oks,
            (qk_scale, scale),
            block_n == 0,
            True,
            not EVEN_N,
            HAS_BIAS,
            MASK_D,
            PRECISION,
            DQ_MODE,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            HAS_PREFIX,
            BLOCK_D,
        )
    dk, dv = grads
    if HAS_EXTRA_Q:
        # One more query row of this (b, g, h) that is not in Q (a class token's query, with its
        # own lse and delta): its contribution to dK / dV in vector form.
        xq = _extra_row(XQ, b, g, h, stride_xqb, stride_xqg, stride_xqh, offs_d, d_ok)
        xdo = _extra_row(XDO, b, g, h, stride_xdob, stride_xdog, stride_xdoh, offs_d, d_ok)
        xp = tl.math.exp2(
            tl.sum(k.to(tl.float32) * xq[None, :], 1) * qk_scale - tl.load(XLse + bh) * 1.4426950408889634
        )
        dv += xp[:, None] * xdo[None, :]
        xds = xp * (tl.sum(v.to(tl.float32) * xdo[None, :], 1) - tl.load(XDelta + bh))
        dk += xds[:, None] * xq[None, :]

    dk = dk * scale
    dk_base = DK + b * stride_dkb + g * stride_dkg + h * stride_dkh + col0 * stride_dkn
    dv_base = DV + b * stride_dvb + g * stride_dvg + h * stride_dvh + col0 * stride_dvn
    _store_2d(
        dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        n_ok,
        d_ok,
        not EVEN_N,
        MASK_D,
    )
    _store_2d(
        dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        n_ok,
        d_ok,
        not EVEN_N,
        MASK_D,
    )


@triton.jit
def _dq_step(
    dq,
    rows,
    bases,
    offs,
    strides,
    oks,
    qk_scale,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DBIAS: tl.constexpr,
    DB_SUM_M: tl.constexpr,
    DB_SUM_N: tl.constexpr,
    DB_ATOMIC: tl.constexpr,
    MASK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    kv=None,
):
    """One key block against the resident query block; optionally emits dS into dbias. Tuples: rows
    (q, dO, lse in base 2, delta) of the query block, bases (k, v, bias, dbias), offs / oks (m, n,
    d), strides (k, v, bias m, bias n, dbias m, dbias n); the constexprs as in _attn_bwd_dq_kernel.
    kv: None, k and v are loaded from their bases; or the (k, v) tiles, 0 past Nk and D (the TMA
    kernel, attention_tma.py, whose k and v bases are unused)."""
    q, do, lse2, delta = rows
    k_base, v_base, b_base, db_base = bases
    offs_m, offs_n, offs_d = offs
    stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm, stride_dbn = strides
    m_ok, n_ok, d_ok = oks
    if kv is None:
        k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, MASK_N, MASK_D)
        v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, MASK_N, MASK_D)
    else:
        k, v = kv
    s = _scores(
        q,
        k,
        b_base,
        (offs_m, offs_n),
        stride_bm,
        stride_bn,
        (m_ok, n_ok),
        qk_scale,
        HAS_BIAS,
        MASK_M,
        MASK_N,
        PRECISION,
    )
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    if DBIAS:
        # ds is exactly 0 on out-of-range rows (lse = +inf) and keys (s = -inf), so reducing the
        # tile over broadcast axes needs no extra masking.
        rc = ((offs_m, offs_n), (stride_dbm, stride_dbn), (m_ok, n_ok))
        _emit_dbias(db_base, ds, rc, DB_SUM_M, DB_SUM_N, DB_ATOMIC, MASK_M, MASK_N)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Bias,
    DO,
    Lse,
    Delta,
    DQ,
    DBias,
    PK,
    PV,
    PPart,
    XQ,
    XDO,
    XLse,
    XDelta,
    XDQ,
    stride_qb,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dob,
    stride_dog,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqg,
    stride_dqh,
    stride_dqm,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    stride_dbn,
    stride_pb,
    stride_pg,
    stride_ph,
    stride_xqb,
    stride_xqg,
    stride_xqh,
    stride_xdob,
    stride_xdog,
    stride_xdoh,
    stride_xdqb,
    stride_xdqg,
    stride_xdqh,
    slots,
    G,
    H,
    Nq,
    Nk,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DBIAS: tl.constexpr,
    DB_SUM_M: tl.constexpr,
    DB_SUM_N: tl.constexpr,
    DB_ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr = False,
    HAS_XROW: tl.constexpr = False,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    # HAS_XROW: the extra query row (XQ, XDO, XLse, XDelta) as row Nq, as in the forward; its dQ
    # goes to XDQ.
    bh, b, g, h, start_m = _query_program(G, H, Nq + HAS_XROW, BLOCK_M)
    row0 = start_m.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = start_m + offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b * stride_qb + g * stride_qg + h * stride_qh + row0 * stride_qm
    do_base = DO + b * stride_dob + g * stride_dog + h * stride_doh + row0 * stride_dom
    q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
    do = _load_2d(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
    row_base = bh.to(tl.int64) * Nq + row0
    lse2 = load_lse2(Lse + row_base + offs_m, m_ok, not EVEN_M)
    delta = _load_1d(Delta + row_base + offs_m, m_ok, 0.0, not EVEN_M)
    if HAS_XROW:
        is_x = start_m + offs_m == Nq
        xq = _extra_row(XQ, b, g, h, stride_xqb, stride_xqg, stride_xqh, offs_d, d_ok)
        xdo = _extra_row(XDO, b, g, h, stride_xdob, stride_xdog, stride_xdoh, offs_d, d_ok)
        q = tl.where(is_x[:, None], xq[None, :].to(q.dtype), q)
        do = tl.where(is_x[:, None], xdo[None, :].to(do.dtype), do)
        lse2 = tl.where(is_x, tl.load(XLse + bh) * 1.4426950408889634, lse2)
        delta = tl.where(is_x, tl.load(XDelta + bh), delta)

    k_base = K + b * stride_kb + g * stride_kg + h * stride_kh
    v_base = V + b * stride_vb + g * stride_vg + h * stride_vh
    b_base = Bias + b * stride_bb + h * stride_bh + row0 * stride_bm
    db_base = DBias + b * stride_dbb + h * stride_dbh + row0 * stride_dbm

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_PREFIX:
        # The prefix key: its part of dQ, and this block's share of its dK / dV as an fp32
        # partial (PPart[bh, query block] = [dK, dV] rows of BLOCK_D), summed by the launcher.
        pk = _extra_row(PK, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)
        pv = _extra_row(PV, b, g, h, stride_pb, stride_pg, stride_ph, offs_d, d_ok)
        qf, dof = q.to(tl.float32), do.to(tl.float32)
        p0 = tl.math.exp2(tl.sum(qf * pk[None, :], 1) * qk_scale - lse2)
        ds0 = p0 * (tl.sum(dof * pv[None, :], 1) - delta)
        dq += ds0[:, None] * pk[None, :]
        part = PPart + (bh.to(tl.int64) * slots + start_m // BLOCK_M) * (2 * BLOCK_D) + offs_d
        tl.store(part, tl.sum(ds0[:, None] * qf, 0) * scale)
        tl.store(part + BLOCK_D, tl.sum(p0[:, None] * dof, 0))
    rows = (q, do, lse2, delta)
    offs = (offs_m, offs_n, offs_d)
    strides = (stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm, stride_dbn)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        bases = (k_base, v_base, b_base, db_base)
        dq = _dq_step(
            dq,
            rows,
            bases,
            offs,
            strides,
            (m_ok, offs_n < Nk, d_ok),
            qk_scale,
            not EVEN_M,
            False,
            HAS_BIAS,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            MASK_D,
            PRECISION,
        )
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        b_base += BLOCK_N * stride_bn
        db_base += BLOCK_N * stride_dbn
    if not EVEN_N:
        bases = (k_base, v_base, b_base, db_base)
        oks = (m_ok, n_full + offs_n < Nk, d_ok)
        dq = _dq_step(
            dq,
            rows,
            bases,
            offs,
            strides,
            oks,
            qk_scale,
            not EVEN_M,
            True,
            HAS_BIAS,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            MASK_D,
            PRECISION,
        )

    dq = dq * scale
    dq_base = DQ + b * stride_dqb + g * stride_dqg + h * stride_dqh + row0 * stride_dqm
    _store_2d(
        dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        m_ok,
        d_ok,
        not EVEN_M,
        MASK_D,
    )
    if HAS_XROW:
        if start_m + BLOCK_M > Nq:  # this block holds the extra row
            xdq = tl.sum(tl.where(is_x[:, None], dq, 0.0), 0)
            xdq_ptrs = XDQ + b * stride_xdqb + g * stride_xdqg + h * stride_xdqh + offs_d
            tl.store(xdq_ptrs, xdq.to(XDQ.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------

_EVEN = {
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Nk"] % a["BLOCK_N"] == 0,
}


def _prune(configs, named_args, **kwargs):
    """Drop configs whose blocks are far larger than the sequence (e.g. Nk = 49 and BLOCK_N = 128)."""
    nq = max(int(named_args["Nq"]), 1)
    nk = max(int(named_args["Nk"]), 1)
    cap_m = max(32, launch.next_pow2(nq))
    cap_n = max(32, launch.next_pow2(nk))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    if kwargs.get("BLOCK_D", 0) >= 128:
        # 128×128 tiles at D = 128 need 256 KiB of shared memory in the 3-stage forward (offline
        # sm_90a compile), over the 227 KiB a block may have on H100/H200.
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


# (BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit inputs: tensor-core tiles. Picked so that none
# spills at D <= 128 on sm_90 with 8 warps (checked with ptxas); the 4-warp 128-row tiles are kept
# for small D, where they fit. fp32 operands: exact-fp32 ("ieee") dots run on CUDA cores and
# Triton's FMA lowering is register-hungry, so only small tiles; the same list serves "tf32".
_BLOCKS = ("BLOCK_M", "BLOCK_N")
_CONFIGS = {  # per family: (forward, dK/dV, dQ, single-kernel backward)
    "half": (
        launch.configs(
            _BLOCKS,
            [
                (128, 64, 8, 3),
                (128, 64, 4, 3),
                (128, 128, 8, 3),
                (128, 32, 4, 3),
                (64, 64, 4, 3),
                (64, 64, 4, 4),
                (64, 32, 4, 2),
                (32, 32, 4, 2),
            ],
        ),
        # BLOCK_N = resident key block, BLOCK_M = streamed query block
        launch.configs(
            _BLOCKS,
            [
                (32, 128, 8, 3),
                (32, 128, 4, 3),
                (64, 128, 8, 3),
                (32, 64, 4, 3),
                (64, 64, 4, 3),
                (16, 64, 4, 2),
                (32, 32, 4, 2),
            ],
        ),
        # BLOCK_M = resident query block, BLOCK_N = streamed key block
        launch.configs(
            _BLOCKS, [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 2), (32, 32, 4, 2)]
        ),
        # the single-kernel backward: the dK/dV tiles plus a (BLOCK_M, D) fp32 dQ tile per step;
        # 64-row query blocks spill at D = 64 with a bias (offline sm_90a compile)
        launch.configs(_BLOCKS, [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (16, 64, 4, 2)]),
    ),
    "fp32": (
        launch.configs(_BLOCKS, [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)]),
        launch.configs(_BLOCKS, [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)]),
        launch.configs(_BLOCKS, [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)]),
        launch.configs(_BLOCKS, [(32, 64, 4, 2), (32, 32, 4, 2)]),
    ),
}

_KEY = ["Nq", "Nk", "BLOCK_D", "HAS_BIAS", "PRECISION"]

# An extra query row makes the last query block ragged even when BLOCK_M divides Nq.
_EVEN_XROW = dict(_EVEN, EVEN_M=lambda a: a["Nq"] % a["BLOCK_M"] == 0 and not a.get("HAS_XROW", False))
_fwd_fixed = triton.heuristics(_EVEN_XROW)(_attn_fwd_kernel)
_dkdv_fixed = triton.heuristics(_EVEN)(_attn_bwd_dkdv_kernel)
_dq_fixed = triton.heuristics(_EVEN_XROW)(_attn_bwd_dq_kernel)

# The dQ kernel may accumulate dbias with atomics: restore the (zeroed) buffer after each
# benchmarking run so tuning does not leak into the result.
# The prefix row's dK/dV slots (PPart) are restored too: a smaller BLOCK_M fills more of them.
_TUNED = launch.tuned_table(
    _CONFIGS,
    [
        (_fwd_fixed, dict(key=_KEY + ["HAS_PREFIX", "HAS_XROW"], prune=_prune)),
        (_dkdv_fixed, dict(key=_KEY + ["HAS_EXTRA_Q"], prune=_prune)),
        (
            _dq_fixed,
            dict(
                key=_KEY + ["DBIAS", "DB_SUM_M", "DB_SUM_N", "HAS_PREFIX", "HAS_XROW"],
                prune=_prune,
                restore_value=["DBias", "PPart"],
            ),
        ),
        (
            _dkdv_fixed,
            dict(
                key=_KEY + ["HAS_EXTRA_Q", "DQ_MODE", "DBIAS", "DB_SUM_M", "DB_SUM_N", "HAS_PREFIX"],
                prune=_prune,
                restore_value=["DQ", "DBias", "PPart"],
            ),
        ),
    ],
)
# triton.jit decides at decoration (import) time whether kernels are interpreted.
_INTERPRETED = launch.is_interpreted(_attn_fwd_kernel)


def _use_fixed(t: torch.Tensor) -> bool:
    return use_fixed(t, _INTERPRETED, "attention")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# kernel name -> (index in _TUNED[family], heuristics-wrapped kernel, the block that tiles the grid)
_KERNELS = {
    "fwd": (0, _fwd_fixed, "BLOCK_M"),
    "dkdv": (1, _dkdv_fixed, "BLOCK_N"),
    "dq": (2, _dq_fixed, "BLOCK_M"),
    "fused": (3, _dkdv_fixed, "BLOCK_N"),
}


def _launch(name, args, meta, fixed, dtype, rows, heads):
    """One program per (batch·group·head = ``heads``, block of ``rows``): the interpreter's fixed
    blocks (``INTERPRET_BLOCKS[name]``) or the autotuned GPU kernel."""
    index, fixed_kernel, block = _KERNELS[name]
    kernel = launch.pick(fixed, fixed_kernel, _TUNED, dtype, index)
    if fixed:
        blocks = dict(zip(_BLOCKS, INTERPRET_BLOCKS[name], strict=True))
        kernel[(launch.cdiv(rows, blocks[block]) * heads,)](*args, **meta, **launch.fixed_meta(True, **blocks))
    else:
        kernel[lambda META: (launch.cdiv(rows, META[block]) * heads,)](*args, **meta)


def _check4(name, t, shape=None, dtype=None):
    if t.dim() not in (4, 5):
        raise ValueError(f"{name} must be 4-D (B, H, N, D) or 5-D (B, G, H, N, D), got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")


class _Dest:
    """An output view with stride(-1) != 1 is written through a contiguous temporary."""

    def __init__(self, t: torch.Tensor):
        self.target = t
        self.buf = t if launch.is_unit_last(t) else torch.empty_like(t, memory_format=torch.contiguous_format)

    def finish(self):
        if self.buf is not self.target:
            self.target.copy_(self.buf)


def _check_common(q, k, v, bias):
    """(B, G, H, Nq, Nk, D); G = 1 for 4-D views. 5-D views (B, G, H, N, D) add a group dim with
    its own stride (e.g. the interleaved sequences of space_time_attention); they take no bias."""
    _check4("q", q)
    _check4("k", k)
    (B, G, H), (Nq, D), Nk = launch.head_dims(q), q.shape[-2:], k.shape[-2]
    launch.check_dtype("q", q)
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)}")
    _check4("k", k, dtype=q.dtype)
    _check4("v", v, shape=k.shape, dtype=q.dtype)
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(
            f"head dim D={D} (q shape {tuple(q.shape)}) is not supported by the Triton "
            f"attention kernels (1 <= D <= {MAX_HEAD_DIM})"
        )
    if bias is not None and q.dim() == 5:
        raise ValueError("bias is not supported with 5-D (B, G, H, N, D) views")
    if bias is not None and (bias.dim() != 4 or tuple(bias.shape) != (B, H, Nq, Nk)):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected it expanded to {(B, H, Nq, Nk)}")
    for name, t in (("k", k), ("v", v), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return B, G, H, Nq, Nk, D


_strides = launch.head_strides


def _bias_kind(bias):
    """The kernels' HAS_BIAS: 0 no bias, 1 an additive float bias, 2 a boolean keep-mask."""
    return 0 if bias is None else 2 if bias.dtype == torch.bool else 1


def _bias_bytes(bias):
    """A boolean mask as the same bytes typed uint8 (a view: strides kept, no copy); else as given."""
    return bias.view(torch.uint8) if bias is not None and bias.dtype == torch.bool else bias


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _row_strides(t):
    """(batch, group, head) strides of a (B, H, D) or (B, G, H, D) view of extra rows."""
    return tuple(t.stride()[:3]) if t.dim() == 4 else (t.stride(0), 0, t.stride(1))


def _check_rows(name, t, q):
    shape = tuple(q.shape[:-2]) + (q.shape[-1],)
    if tuple(t.shape) != shape or t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a {shape} view of q's dtype and device with a unit last stride, "
            f"got {tuple(t.shape)} {t.dtype} {t.device} strides {t.stride()}"
        )


def attention_forward(q, k, v, bias, scale, out, prefix=None, extra_q=None):
    """softmax(q kᵀ·scale + bias) v written into ``out``; returns lse (B, H, Nq) float32.

    q (B,H,Nq,D); k, v (B,H,Nk,D): strided views (stride(-1) == 1 expected; otherwise copied).
    5-D views (B, G, H, N, D) are accepted too (no bias); lse is then (B, G, H, Nq).
    bias: None or a tensor expanded to (B,H,Nq,Nk) (any strides, 0 on broadcast dims): a float
    bias added to the scores, or a boolean mask (False = the key is excluded), read as bytes.
    out: preallocated (B,H,Nq,D) view of q's dtype with any strides. lse is the natural-log
    logsumexp of the scaled+biased scores; a row whose every score is -inf gives out = 0 and
    lse = +inf.
    prefix: None or (pk, pv), one extra key and value row per (b, [g,] h) placed before the Nk
    keys (q's shape without the row dim; e.g. a class token shared by every frame, stride 0 on g).
    extra_q: None or (xq, xout, xlse), one more query row per (b, [g,] h) against the same keys
    (a class token's query; no bias): xq and xout views like pk, xlse a contiguous float32
    (B, [G,] H) tensor; its output and lse are written there, in the same launch.
    """
    B, G, H, Nq, Nk, D = _check_common(q, k, v, bias)
    _check4("out", out, shape=q.shape, dtype=q.dtype)
    q, k, v = launch.unit_last(q), launch.unit_last(k), launch.unit_last(v)
    for name, t in zip(("pk", "pv", "xq", "xout"), (prefix or (None, None)) + tuple((extra_q or ())[:2])):
        if t is not None:
            _check_rows(name, t, q)
    if extra_q is not None:
        xlse = extra_q[2]
        if bias is not None:
            raise ValueError("extra_q takes no bias")
        if tuple(xlse.shape) != tuple(q.shape[:-2]) or xlse.dtype != torch.float32 or not xlse.is_contiguous():
            raise ValueError(f"xlse must be a contiguous float32 {tuple(q.shape[:-2])} tensor, got {tuple(xlse.shape)}")
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    if extra_q is not None and (B * G * H == 0 or Nq == 0):  # no block to carry the extra row
        xq, xout, xlse = extra_q
        xlse.copy_(attention_forward(xq.unsqueeze(-2), k, v, None, scale, xout.unsqueeze(-2), prefix)[..., 0])
        return lse
    if B * G * H * Nq == 0:
        return lse
    if Nk == 0 and prefix is None:
        out.zero_()
        lse.fill_(float("inf"))
        if extra_q is not None:
            extra_q[1].zero_()
            extra_q[2].fill_(float("inf"))
        return lse
    dest = _Dest(out)
    o = dest.buf
    if extra_q is None and short.packs(q, k, bias, prefix):  # many short sequences, several per tile
        short.packed_forward(q, k, v, o, lse, float(scale))
        dest.finish()
        return lse
    has_bias, bias = _bias_kind(bias), _bias_bytes(bias)
    if tma.eligible(q, k, v, o, bias, prefix, extra_q):  # VITKERNELS_ATTN_TMA=on, on sm_90+
        qk_scale = float(scale) * launch.LOG2E
        with launch.device_ctx(q):
            tma.tma_forward(
                q,
                k,
                v,
                bias,
                has_bias,
                _bias_strides(bias),
                o,
                lse,
                G,
                H,
                Nq,
                Nk,
                qk_scale,
                launch.pow2_at_least(D),
                B * G * H,
                INTERPRET_BLOCKS["fwd"],
            )
        dest.finish()
        return lse
    pk, pv = prefix if prefix is not None else (q, q)
    xq, xout, xlse = extra_q if extra_q is not None else (q, q, lse)
    args = (
        q,
        k,
        v,
        bias if has_bias else q,
        o,
        lse,
        pk,
        pv,
        xq,
        xout,
        xlse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_bias_strides(bias),
        *_strides(o),
        *(_row_strides(pk) if prefix is not None else (0, 0, 0)),
        *(_row_strides(xq) + _row_strides(xout) if extra_q is not None else (0,) * 6),
        G,
        H,
        Nq,
        Nk,
        float(scale) * launch.LOG2E,
    )
    meta = dict(
        HEAD_DIM=D,
        BLOCK_D=launch.pow2_at_least(D),
        HAS_BIAS=has_bias,
        PRECISION=launch.precision(q.dtype),
        HAS_PREFIX=prefix is not None,
        HAS_XROW=extra_q is not None,
    )
    with launch.device_ctx(q):
        _launch("fwd", args, meta, _use_fixed(q), q.dtype, Nq + (extra_q is not None), B * G * H)
    dest.finish()
    return lse


def _dbias_layout(bias):
    """Shape of dbias (broadcast dims → 1) and which dims are reduced."""
    reduced = [bias.stride(d) == 0 and bias.shape[d] > 1 for d in range(4)]
    shape = tuple(1 if r else s for r, s in zip(reduced, bias.shape))
    return shape, reduced


# The backward's kernels (VITKERNELS_ATTN_BWD_KERNEL): "split" = the dK/dV kernel + the dQ kernel;
# "fused" = one kernel, dQ by fp32 atomics; "fused-deterministic" = one kernel, dQ as per-key-block
# fp32 partials summed in order by torch. "auto": "fused" where both sequences have at least
# FUSED_MIN_LEN rows and deterministic algorithms are off, else "split" (docs/attention.md).
BACKWARD_KERNELS = ("auto", "split", "fused", "fused-deterministic")
FUSED_MIN_LEN = 512
_DQ_MODE = {"split": 0, "fused": 1, "fused-deterministic": 2}


def backward_kernel(Nq: int, Nk: int) -> str:
    """The backward kernel a call with these sequence lengths runs (see BACKWARD_KERNELS)."""
    choice = _env.get("VITKERNELS_ATTN_BWD_KERNEL")
    if choice not in BACKWARD_KERNELS:
        raise ValueError(f"VITKERNELS_ATTN_BWD_KERNEL={choice!r}: expected one of {', '.join(BACKWARD_KERNELS)}")
    if choice != "auto":
        return choice
    if torch.are_deterministic_algorithms_enabled() or min(Nq, Nk) < FUSED_MIN_LEN:
        return "split"
    return "fused"


def _dq_destination(mode, dq_, fixed, Nk):
    """Where the single-kernel backward writes dQ: (buffer, its strides with the key-block stride
    first). Mode 1: an fp32 accumulator (dq itself when it is fp32), zeroed. Mode 2: one zeroed
    fp32 partial per key block of the smallest BLOCK_N the launch may pick; a larger pick leaves
    the last slots zero (the tuner restores the buffer after each benchmark run)."""
    if mode == 1:
        acc = dq_.zero_() if dq_.dtype == torch.float32 else torch.zeros(dq_.shape, device=dq_.device)
        return acc, (0, *_strides(acc))
    configs = _CONFIGS[launch.family(dq_.dtype)][3]
    smallest = INTERPRET_BLOCKS["fused"][1] if fixed else min(c.kwargs["BLOCK_N"] for c in configs)
    parts = torch.zeros((launch.cdiv(Nk, smallest), *dq_.shape), device=dq_.device, dtype=torch.float32)
    return parts, (parts.stride(0), *_strides(parts[0]))


def _backward_operands(q, k, v, bias, dout, lse, delta):
    """The tensors every backward kernel takes first (a dummy for a missing bias), their strides."""
    tensors = (q, k, v, bias if bias is not None else q, dout, lse, delta)
    return tensors, (*_strides(q), *_strides(k), *_strides(v), *_bias_strides(bias), *_strides(dout))


def _launch_dkdv(operands, dk_, dv_, extra_q, meta, fixed, qk_scale, scale):
    """The dK/dV kernel (``operands`` from ``_backward_operands``). ``meta["DQ_MODE"]`` > 0: the
    single-kernel backward, whose dQ, dbias and prefix arguments come in ``meta.pop("fused")`` =
    (DQ, dq strides, DBias, db strides, PK, PV, PPart, prefix strides, slots)."""
    (q, k, _, _, _, lse, delta), strides = operands
    (B, G, H), Nq, Nk = launch.head_dims(q), q.shape[-2], k.shape[-2]
    if extra_q is not None:
        xq, xdo, xlse, xdelta = extra_q
        x_args = (xq, xdo, xlse.to(torch.float32).contiguous(), xdelta.to(torch.float32).contiguous())
        x_strides = (*_row_strides(xq), *_row_strides(xdo))
    else:
        x_args, x_strides = (q, q, lse, lse), (0,) * 6
    meta = dict(meta)
    dq_buf, dq_strides, db_arg, db_strides, pk, pv, ppart, p_strides, slots = meta.pop(
        "fused", (delta, (0,) * 5, delta, (0,) * 4, q, q, delta, (0,) * 3, 0)
    )
    args = (*operands[0], dk_, dv_, *x_args, dq_buf, db_arg, pk, pv, ppart, *strides, *_strides(dk_), *_strides(dv_))
    args += (*x_strides, *dq_strides, *db_strides, *p_strides, slots, G, H, Nq, Nk, qk_scale, float(scale))
    name = "fused" if meta.get("DQ_MODE", 0) else "dkdv"
    return _launch(name, args, dict(meta, HAS_EXTRA_Q=extra_q is not None), fixed, q.dtype, Nk, B * G * H)


def _launch_dq(operands, dq_, dbias_args, prefix_args, xrow, meta, fixed, qk_scale, scale):
    """The dQ kernel for the rows of q (+ dbias, the prefix row's partials; ``xrow`` = (xq, xdo,
    xlse, xdelta, dxq): the extra query row as row Nq, its dQ into dxq)."""
    (q, k, _, _, _, lse, _), strides = operands
    (B, G, H), Nq, Nk = launch.head_dims(q), q.shape[-2], k.shape[-2]
    db_arg, db_strides = dbias_args
    pk, pv, ppart, p_strides, slots = prefix_args
    has_xrow = xrow is not None
    if has_xrow:
        xq, xdo, _, _, dxq = xrow
        x_strides = (*_row_strides(xq), *_row_strides(xdo), *_row_strides(dxq))
    else:
        xrow, x_strides = (q, q, lse, lse, q), (0,) * 9
    args = (*operands[0], dq_, db_arg, pk, pv, ppart, *xrow, *strides, *_strides(dq_), *db_strides, *p_strides)
    args += (*x_strides, slots, G, H, Nq, Nk, qk_scale, float(scale))
    _launch("dq", args, dict(meta, HAS_XROW=has_xrow), fixed, q.dtype, Nq + has_xrow, B * G * H)


def attention_backward(
    dout, q, k, v, bias, out, lse, scale, dq, dk, dv, bias_requires_grad, prefix=None, dprefix=None, extra_q=None
):
    """Write dq, dk, dv (preallocated views of q/k/v's shapes and q's dtype) and return dbias.

    dout, out: (B,H,Nq,D), any strides. lse: (B,H,Nq) from ``attention_forward``.
    Returns None unless ``bias_requires_grad``; then a float32 tensor of bias's shape with every
    dim where bias.stride(dim) == 0 and size > 1 replaced by 1, holding dS = P∘(dP - delta)
    summed over those dims.
    dk = dv = None skips the key-side kernel (only dq is wanted).
    prefix (pk, pv) as in ``attention_forward``; dprefix (dpk, dpv): float32 (B, [G,] H, D)
    tensors that receive the prefix row's gradients from these queries.
    extra_q (xq, xdo, xlse, xdelta[, dxq]): one more query row per (b, [g,] h) that is not in q —
    its q and dO rows (views like pk) and its lse and delta = rowsum(dO ∘ O) (float32, q's shape
    without the last two dims); its contribution is added to dk and dv (and to dprefix). With dxq
    (a view like pk, q's dtype) its dq is written there: by the dQ kernel as one more row (the
    split backward), else by a one-row launch of it. No bias with extra_q.
    The kernels: ``backward_kernel(Nq, Nk)`` (VITKERNELS_ATTN_BWD_KERNEL).
    """
    B, G, H, Nq, Nk, D = _check_common(q, k, v, bias)
    _check4("dout", dout, shape=q.shape)
    _check4("out", out, shape=q.shape)
    _check4("dq", dq, shape=q.shape, dtype=q.dtype)
    if (dk is None) != (dv is None) or (dk is None and extra_q is not None):
        raise ValueError("dk and dv are both given or both None (and extra_q needs them)")
    if dk is not None:
        _check4("dk", dk, shape=k.shape, dtype=q.dtype)
        _check4("dv", dv, shape=v.shape, dtype=q.dtype)
    if (prefix is None) != (dprefix is None):
        raise ValueError("prefix and dprefix go together")
    for name, t in zip(("pk", "pv", "xq", "xdo"), (prefix or (None, None)) + tuple((extra_q or ())[:2])):
        if t is not None:
            _check_rows(name, t, q)
    dxq = extra_q[4] if extra_q is not None and len(extra_q) > 4 else None
    if dxq is not None:
        _check_rows("dxq", dxq, q)
    if extra_q is not None and bias is not None:
        raise ValueError("extra_q takes no bias")
    if bias_requires_grad and (bias is None or bias.dtype == torch.bool):
        raise ValueError("bias_requires_grad=True needs a float bias (a boolean mask has no gradient)")
    if tuple(lse.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {tuple(q.shape[:-1])}")
    kernel = backward_kernel(Nq, Nk) if dk is not None and Nk > 0 else "split"
    lse = lse.to(torch.float32).contiguous()
    # dO may come in another dtype (autocast) or with 0 strides (grad of a sum): the kernels need
    # it in the operands' dtype with a unit last stride.
    dout = launch.unit_last(dout.to(q.dtype))
    q, k, v, out = launch.unit_last(q), launch.unit_last(k), launch.unit_last(v), launch.unit_last(out)

    dbias = None
    reduced = [False] * 4
    if bias_requires_grad:
        db_shape, reduced = _dbias_layout(bias)
        dbias = torch.zeros(db_shape, device=q.device, dtype=torch.float32)
    if B * G * H == 0 or Nq == 0 or (Nk == 0 and prefix is None):
        if dxq is not None and B * G * H * Nq == 0 and (Nk > 0 or prefix is not None):
            raise ValueError("extra_q with dxq needs at least one query row in q")
        for t in (dq, dk, dv, dxq, *(dprefix or ())):
            if t is not None:
                t.zero_()
        return dbias

    dests = [_Dest(t) for t in (dq, dk, dv) if t is not None]
    dq_, dk_, dv_ = (d.buf for d in dests) if dk is not None else (dests[0].buf, None, None)
    if dk is not None and extra_q is None and short.packs(q, k, bias, prefix):
        short.packed_backward(dout, q, k, v, out, lse, scale, dq_, dk_, dv_)
        for d in dests:
            d.finish()
        return dbias
    BLOCK_D = launch.pow2_at_least(D)
    has_bias, bias = _bias_kind(bias), _bias_bytes(bias)
    fixed = _use_fixed(q)
    qk_scale = float(scale) * launch.LOG2E
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_BIAS=has_bias, PRECISION=launch.precision(q.dtype))
    if extra_q is not None:  # the kernels index the extra row's lse and delta by (b·g·h)
        extra_q = (*extra_q[:2], *(t.to(torch.float32).contiguous() for t in extra_q[2:4]))

    with launch.device_ctx(q):
        delta = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        bm_pre = 32 if fixed else 64
        _attn_bwd_preprocess[(launch.cdiv(Nq, bm_pre) * B * G * H,)](
            out, dout, delta, *_strides(out), *_strides(dout), G, H, Nq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm_pre
        )

        if dbias is not None:
            db_arg, db_strides = dbias, [0 if reduced[d] else dbias.stride(d) for d in range(4)]
        else:
            db_arg, db_strides = delta, [0, 0, 0, 0]  # dummy fp32 pointer, never touched
        # The prefix row's dK / dV: one fp32 slot per (b·g·h, query block of ≥ 16 rows), zeroed,
        # so whatever BLOCK_M the tuner picks the launcher can sum the slots.
        slots = launch.cdiv(Nq + 1, 16)  # + the extra query row
        ppart = torch.zeros(
            (B * G * H, slots, 2, BLOCK_D) if prefix is not None else (1,), device=q.device, dtype=torch.float32
        )
        pk, pv = prefix if prefix is not None else (q, q)
        p_strides = _row_strides(pk) if prefix is not None else (0, 0, 0)
        prefix_args = (pk, pv, ppart, p_strides, slots)
        dbias_meta = dict(
            DBIAS=dbias is not None,
            DB_SUM_M=reduced[2],
            DB_SUM_N=reduced[3],
            DB_ATOMIC=any(reduced),
            HAS_PREFIX=prefix is not None,
        )

        operands = _backward_operands(q, k, v, bias, dout, lse, delta)
        bwd_meta = dict(meta, **dbias_meta)
        # VITKERNELS_ATTN_TMA=on, on sm_90+: the dK/dV and dQ kernels move q, k, v, dO, dk, dv and dq
        # through TMA descriptors (attention_tma.py); dbias and the single kernel's dQ stay on pointers.
        via_tma = tma.eligible_backward(q, k, v, dout, dq_, dk_, dv_, prefix, extra_q)
        if kernel != "split":
            # The single-kernel backward: dK, dV, dQ, dbias and the prefix terms in one launch.
            mode = _DQ_MODE[kernel]
            dq_buf, dq_strides = _dq_destination(mode, dq_, fixed, Nk)
            fused = (dq_buf, dq_strides, db_arg, db_strides, *prefix_args)
            if via_tma:
                fused_meta = dict(bwd_meta, DQ_MODE=mode)
                tma.tma_dkdv(
                    operands[0], dk_, dv_, fused_meta, fused[:4], fixed, qk_scale, scale, INTERPRET_BLOCKS["fused"]
                )
            else:
                _launch_dkdv(
                    operands, dk_, dv_, extra_q, dict(bwd_meta, DQ_MODE=mode, fused=fused), fixed, qk_scale, scale
                )
            if mode == 2:
                dq_buf = dq_buf.sum(0)
            if dq_buf is not dq_:
                dq_.copy_(dq_buf)
            if dxq is not None:  # the extra row's dQ: a one-row launch of the dQ kernel
                xq, xdo, xlse, xdelta = extra_q
                xpart = torch.zeros_like(ppart)
                one_row = _backward_operands(
                    xq.unsqueeze(-2), k, v, bias, xdo.unsqueeze(-2), xlse[..., None], xdelta[..., None]
                )
                x_prefix = (pk, pv, xpart, p_strides, slots)
                _launch_dq(
                    one_row, dxq.unsqueeze(-2), (db_arg, db_strides), x_prefix, None, bwd_meta, fixed, qk_scale, scale
                )
                ppart += xpart
        else:
            # dK, dV: one program per key block.
            if dk is not None and Nk > 0:
                if via_tma:
                    tma.tma_dkdv(operands[0], dk_, dv_, meta, None, fixed, qk_scale, scale, INTERPRET_BLOCKS["dkdv"])
                else:
                    _launch_dkdv(operands, dk_, dv_, extra_q, meta, fixed, qk_scale, scale)
            # dQ (+ dbias, + the extra row): one program per query block.
            if via_tma:
                dbias_args = (db_arg, db_strides)
                tma.tma_dq(operands[0], dq_, bwd_meta, dbias_args, fixed, qk_scale, scale, INTERPRET_BLOCKS["dq"])
            else:
                xrow = (*extra_q, dxq) if dxq is not None else None
                _launch_dq(operands, dq_, (db_arg, db_strides), prefix_args, xrow, bwd_meta, fixed, qk_scale, scale)
    for d in dests:
        d.finish()
    if prefix is not None:
        sums = ppart.sum(1)[..., :D].view(*q.shape[:-2], 2, D)
        for dst, i in zip(dprefix, (0, 1)):
            dst.copy_(sums[..., i, :].view(dst.shape))
    return dbias


def attention_flops(B, H, Nq, Nk, D, backward=False):
    """FLOPs of the op as counted above (forward 4·B·H·Nq·Nk·D, backward 2.5× that)."""
    f = 4 * B * H * Nq * Nk * D
    return int(f * 2.5) if backward else f


# The Hopper TMA forward and backward reuse this module's jit helpers, so they are imported once those exist.
from . import attention_tma as tma  # noqa: E402
