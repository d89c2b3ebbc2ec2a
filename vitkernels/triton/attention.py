"""FlashAttention-2 style Triton kernels for ``vitkernels.attention`` / ``self_attention``.

Math
----
Per (batch b, head h), with q (Nq, D), k and v (Nk, D), an optional additive bias (Nq, Nk)
and a scale (default D^-1/2, chosen by the caller):

    S = q kᵀ · scale + bias              (Nq, Nk)
    P = softmax_rows(S)                  rows whose every score is -inf give P = 0
    O = P v                              (Nq, D)
    lse = logsumexp_rows(S)              natural log; +inf for fully -inf rows

Backward, given dO (FlashAttention-2, Dao 2023, Algorithm 2):

    delta = rowsum(dO ∘ O)               (Nq,)   fp32, one cheap pre-pass
    P     = exp(S - lse)                 recomputed tile by tile, never stored
    dV    = Pᵀ dO
    dP    = dO vᵀ
    dS    = P ∘ (dP - delta)             = dL/dS = dL/dbias (before broadcast reduction)
    dQ    = dS k · scale,   dK = dSᵀ q · scale

Softmax runs in base 2: scores are multiplied by log2(e) once (folded into ``qk_scale`` =
scale·log2(e) and applied to the bias tile), so the inner loop uses ``exp2``; lse is converted
back to natural log when it is stored and multiplied by log2(e) again in the backward.
A fully -inf row keeps m_i = -inf; the running max is replaced by 0 before it is subtracted, so
exp2 never sees (-inf) - (-inf) and the row ends with l_i = 0 → out = 0, lse = +inf, and the
backward's exp2(s - lse) = 0 gives exactly zero (finite) gradients for it.

Cost
----
    forward  FLOPs = 4·B·H·Nq·Nk·D    (two matmuls, QKᵀ and PV)
    backward FLOPs ≈ 10·B·H·Nq·Nk·D   (QKᵀ recomputed twice, dPᵀ/dP twice counted once each in
                                        the two kernels, dV, dK, dQ) → ≈ 2.5× forward
    HBM bytes (forward) ≈ (2·Nq + 2·Nk)·D·B·H·itemsize (+ Nq·Nk·itemsize per bias head-plane
    when a bias is given); no Nq×Nk tensor is ever written.
H100 SXM dense fp16/bf16 peak is ~989 TFLOP/s; for ViT-B (N=197, D=64) the op is short and
latency/occupancy bound, for N ≥ 1024 it is compute (softmax-exp) bound as in FA2.

Design
------
* ``_attn_fwd_kernel``: one program per (b·h, query block of BLOCK_M rows); the grid is 1-D,
  pid = bh·num_m_blocks + m_block, so B·H can be arbitrarily large (no 65535 y/z limit) and
  consecutive programs share one head's K/V in L2. The program keeps q, the fp32 accumulator,
  row max m_i and row sum l_i on chip and streams K/V (and the bias tile) in BLOCK_N blocks:
  full blocks run without any masking, the ragged last block (Nk % BLOCK_N) is a separate
  masked step (out-of-range keys → -inf). Head dim D is padded to BLOCK_D = next_pow2(max(D,16))
  with masked loads/stores, D ≤ 128.
* Backward: ``_attn_bwd_preprocess`` (delta), ``_attn_bwd_dkdv_kernel`` (one program per key
  block, loops over query blocks, accumulates dK and dV in registers) and
  ``_attn_bwd_dq_kernel`` (one program per query block, loops over key blocks). No atomics on
  dq/dk/dv, so the gradients are deterministic. dS for the bias gradient is written by the dQ
  kernel (its tile is row-major like the bias): a plain store when the bias is full, otherwise
  the tile is first reduced over the broadcast query/key axes in registers and then added with
  fp32 ``tl.atomic_add`` (broadcast batch/head axes are summed by the atomics across programs).
* Any strides: every tensor is addressed by (b, h, row) strides with the last dim contiguous.
  q/k/v may be slices of a packed (B, N, 3, H, D) projection and out / dq / dk / dv permuted
  views of (B, N, C) or (B, N, 3C) buffers, so the ops layer never copies. Batch and head
  offsets are computed in int64; per-row offsets of the resident tiles are int64 too, the
  streamed tiles advance their pointers incrementally.
* Matmul precision: fp16/bf16 operands go to tensor cores with fp32 accumulation (P and dS are
  rounded to the input dtype before their matmul, as in FA2). fp32 operands use
  ``input_precision="ieee"`` (exact fp32, CUDA cores, slower) unless the user allowed TF32 for
  matmuls in PyTorch (``torch.backends.cuda.matmul.fp32_precision == "tf32"`` /
  ``allow_tf32``), in which case "tf32" — the same precision eager fp32 matmuls would use.
* Tuning: on a GPU each kernel is ``triton.autotune``d over a handful of BLOCK_M/BLOCK_N/
  num_warps/num_stages configs keyed on (Nq, Nk, BLOCK_D, HAS_BIAS) plus the tensor dtypes;
  configs with blocks much larger than the sequence are pruned. Under ``TRITON_INTERPRET=1``
  (CPU tensors) one small fixed config is used so CPU tests are fast. ``EVEN_M``/``EVEN_N``
  heuristics drop all row masks when the sequence length is a multiple of the block.
* Forward is deterministic; kernels launch on the current stream (Triton's default).

Notes (per-version measurements go in docs/ once measured on a GPU):
* v1: this file. Not yet measured on H100/H200.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

__all__ = ["attention_forward", "attention_backward", "attention_flops", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpret_mode() -> bool:
    """True when Triton kernels are interpreted (set TRITON_INTERPRET=1 before importing triton)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed block sizes used under the interpreter (CPU); tests may monkeypatch this dict to exercise
# other tilings. Values: (BLOCK_M, BLOCK_N).
INTERPRET_BLOCKS = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}


# ---------------------------------------------------------------------------------------------
# Small jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_2d(ptrs, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a 2-D tile; r_ok / c_ok are 1-D validity vectors used only when MASK_* is set."""
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_2d(ptrs, x, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R:
        if MASK_C:
            tl.store(ptrs, x, mask=r_ok[:, None] & c_ok[None, :])
        else:
            tl.store(ptrs, x, mask=r_ok[:, None])
    else:
        if MASK_C:
            tl.store(ptrs, x, mask=c_ok[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def _load_1d(ptrs, ok, other, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, n_ok, m_ok, d_ok, qk_scale,
              HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr, MASK_M: tl.constexpr,
              MASK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax. Scores are kept in base 2 (×log2 e)."""
    k = _load_2d(k_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        bias = _load_2d(b_ptrs, m_ok, n_ok, MASK_M, MASK_N)
        s += bias.to(tl.float32) * 1.4426950408889634
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Fully -inf row so far: subtract 0 instead of -inf so exp2 sees -inf, never NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_2d(v_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Bias, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    H, Nq, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m64 = offs_m.to(tl.int64)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :]
    q = _load_2d(q_ptrs, m_ok, d_ok, not EVEN_M, MASK_D)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if HAS_BIAS:
        b_ptrs = (Bias + b * stride_bb + h * stride_bh + offs_m64[:, None] * stride_bm
                  + offs_n[None, :] * stride_bn)
    else:
        b_ptrs = Bias

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, offs_n < Nk, m_ok,
                                  d_ok, qk_scale, HAS_BIAS, False, not EVEN_M, MASK_D, PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_BIAS:
            b_ptrs += BLOCK_N * stride_bn
    if not EVEN_N:
        n_ok = (n_full + offs_n) < Nk
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, b_ptrs, n_ok, m_ok,
                                  d_ok, qk_scale, HAS_BIAS, True, not EVEN_M, MASK_D, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om + offs_d[None, :]
    _store_2d(o_ptrs, out.to(Out.dtype.element_ty), m_ok, d_ok, not EVEN_M, MASK_D)
    lse_ptrs = Lse + bh.to(tl.int64) * Nq + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[bh, m] = sum_d dO[m, d] · O[m, d] in fp32."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Nq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m64[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, bT_ptrs, lse_ptrs, delta_ptrs, m_ok, n_ok, d_ok,
               qk_scale, HAS_BIAS: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
               MASK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One query block for a resident key block; works on transposed (key, query) tiles."""
    q = _load_2d(q_ptrs, m_ok, d_ok, MASK_M, MASK_D)
    do = _load_2d(do_ptrs, m_ok, d_ok, MASK_M, MASK_D)
    # Out-of-range query rows get lse = +inf → p = 0, so they add nothing.
    lse2 = _load_1d(lse_ptrs, m_ok, float("inf"), MASK_M) * 1.4426950408889634
    delta = _load_1d(delta_ptrs, m_ok, 0.0, MASK_M)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        biasT = _load_2d(bT_ptrs, n_ok, m_ok, MASK_N, MASK_M)
        sT += biasT.to(tl.float32) * 1.4426950408889634
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, Nq, Nk, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Nk, BLOCK_N)
    bh = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM

    k = _load_2d(K + b * stride_kb + h * stride_kh + offs_n64[:, None] * stride_kn + offs_d[None, :],
                 n_ok, d_ok, not EVEN_N, MASK_D)
    v = _load_2d(V + b * stride_vb + h * stride_vh + offs_n64[:, None] * stride_vn + offs_d[None, :],
                 n_ok, d_ok, not EVEN_N, MASK_D)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
    lse_ptrs = Lse + bh.to(tl.int64) * Nq + offs_m
    delta_ptrs = Delta + bh.to(tl.int64) * Nq + offs_m
    if HAS_BIAS:
        bT_ptrs = (Bias + b * stride_bb + h * stride_bh + offs_n64[:, None] * stride_bn
                   + offs_m[None, :] * stride_bm)
    else:
        bT_ptrs = Bias

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (Nq // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, bT_ptrs, lse_ptrs, delta_ptrs,
                            offs_m < Nq, n_ok, d_ok, qk_scale, HAS_BIAS, False, not EVEN_N,
                            MASK_D, PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
        if HAS_BIAS:
            bT_ptrs += BLOCK_M * stride_bm
    if not EVEN_M:
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, bT_ptrs, lse_ptrs, delta_ptrs,
                            (m_full + offs_m) < Nq, n_ok, d_ok, qk_scale, HAS_BIAS, True,
                            not EVEN_N, MASK_D, PRECISION)

    dk = dk * scale
    _store_2d(DK + b * stride_dkb + h * stride_dkh + offs_n64[:, None] * stride_dkn + offs_d[None, :],
              dk.to(DK.dtype.element_ty), n_ok, d_ok, not EVEN_N, MASK_D)
    _store_2d(DV + b * stride_dvb + h * stride_dvh + offs_n64[:, None] * stride_dvn + offs_d[None, :],
              dv.to(DV.dtype.element_ty), n_ok, d_ok, not EVEN_N, MASK_D)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, db_ptrs, m_ok, n_ok, d_ok, qk_scale,
             HAS_BIAS: tl.constexpr, DBIAS: tl.constexpr, DB_SUM_M: tl.constexpr,
             DB_SUM_N: tl.constexpr, DB_ATOMIC: tl.constexpr, MASK_M: tl.constexpr,
             MASK_N: tl.constexpr, MASK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One key block for a resident query block; optionally emits dS into dbias."""
    k = _load_2d(k_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    v = _load_2d(v_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        bias = _load_2d(b_ptrs, m_ok, n_ok, MASK_M, MASK_N)
        s += bias.to(tl.float32) * 1.4426950408889634
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    if DBIAS:
        # ds is exactly 0 on out-of-range rows (lse=+inf) and keys (s=-inf), so the
        # in-register reductions over broadcast axes need no extra masking.
        if DB_SUM_M:
            if DB_SUM_N:
                tl.atomic_add(db_ptrs, tl.sum(tl.sum(ds, 1), 0))
            else:
                tl.atomic_add(db_ptrs, tl.sum(ds, 0), mask=n_ok)
        else:
            if DB_SUM_N:
                tl.atomic_add(db_ptrs, tl.sum(ds, 1), mask=m_ok)
            else:
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, ds, mask=m_ok[:, None] & n_ok[None, :])
                else:
                    _store_2d(db_ptrs, ds, m_ok, n_ok, MASK_M, MASK_N)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, DBias,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    H, Nq, Nk, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    DBIAS: tl.constexpr, DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr,
    DB_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q = _load_2d(Q + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :],
                 m_ok, d_ok, not EVEN_M, MASK_D)
    do = _load_2d(DO + b * stride_dob + h * stride_doh + offs_m64[:, None] * stride_dom
                  + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
    row = bh.to(tl.int64) * Nq + offs_m
    lse2 = _load_1d(Lse + row, m_ok, float("inf"), not EVEN_M) * 1.4426950408889634
    delta = _load_1d(Delta + row, m_ok, 0.0, not EVEN_M)

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if HAS_BIAS:
        b_ptrs = (Bias + b * stride_bb + h * stride_bh + offs_m64[:, None] * stride_bm
                  + offs_n[None, :] * stride_bn)
    else:
        b_ptrs = Bias
    if DBIAS:
        db_base = DBias + b * stride_dbb + h * stride_dbh
        if DB_SUM_M:
            if DB_SUM_N:
                db_ptrs = db_base
            else:
                db_ptrs = db_base + offs_n * stride_dbn
        else:
            if DB_SUM_N:
                db_ptrs = db_base + offs_m64 * stride_dbm
            else:
                db_ptrs = db_base + offs_m64[:, None] * stride_dbm + offs_n[None, :] * stride_dbn
    else:
        db_ptrs = DBias

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, db_ptrs, m_ok, offs_n < Nk,
                      d_ok, qk_scale, HAS_BIAS, DBIAS, DB_SUM_M, DB_SUM_N, DB_ATOMIC,
                      not EVEN_M, False, MASK_D, PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_BIAS:
            b_ptrs += BLOCK_N * stride_bn
        if DBIAS:
            if not DB_SUM_N:
                db_ptrs += BLOCK_N * stride_dbn
    if not EVEN_N:
        dq = _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, b_ptrs, db_ptrs, m_ok,
                      (n_full + offs_n) < Nk, d_ok, qk_scale, HAS_BIAS, DBIAS, DB_SUM_M,
                      DB_SUM_N, DB_ATOMIC, not EVEN_M, True, MASK_D, PRECISION)

    dq = dq * scale
    _store_2d(DQ + b * stride_dqb + h * stride_dqh + offs_m64[:, None] * stride_dqm + offs_d[None, :],
              dq.to(DQ.dtype.element_ty), m_ok, d_ok, not EVEN_M, MASK_D)


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
    cap_m = max(32, triton.next_power_of_2(nq))
    cap_n = max(32, triton.next_power_of_2(nk))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def _cfgs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for (m, n, w, s) in shapes]


_FWD_CONFIGS = _cfgs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2),
])
_DKDV_CONFIGS = _cfgs([  # BLOCK_N = resident key block, BLOCK_M = streamed query block
    (32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3),
    (64, 64, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2),
])
_DQ_CONFIGS = _cfgs([  # BLOCK_M = resident query block, BLOCK_N = streamed key block
    (128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
    (64, 32, 4, 3), (64, 16, 4, 2), (32, 32, 4, 2),
])
_KEY = ["Nq", "Nk", "BLOCK_D", "HAS_BIAS"]

_fwd_fixed = triton.heuristics(_EVEN)(_attn_fwd_kernel)
_dkdv_fixed = triton.heuristics(_EVEN)(_attn_bwd_dkdv_kernel)
_dq_fixed = triton.heuristics(_EVEN)(_attn_bwd_dq_kernel)

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _fwd_fixed)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _dkdv_fixed)
# The dQ kernel may accumulate dbias with atomics: restore the (zeroed) buffer after each
# benchmarking run so tuning does not leak into the result.
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY + ["DBIAS", "DB_SUM_M", "DB_SUM_N"],
                            prune_configs_by={"early_config_prune": _prune},
                            restore_value=["DBias"])(_dq_fixed)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fp32_precision() -> str:
    """'tf32' only if the user allowed TF32 for fp32 matmuls in PyTorch, else exact 'ieee'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = torch.backends.cuda.matmul.fp32_precision
            if p in ("tf32", "ieee"):
                return p
        except Exception:
            pass
        try:
            return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        except Exception:
            return "ieee"


def _precision(dtype) -> str:
    return _fp32_precision() if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16


def _use_fixed(t: torch.Tensor) -> bool:
    if t.device.type == "cuda" and not _interpret_mode():
        return False
    if not _interpret_mode():
        raise RuntimeError(
            f"vitkernels triton attention: tensors are on {t.device} but Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is first imported")
    return True


def _check4(name, t, shape=None, dtype=None):
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride(-1) == 1, got strides {tuple(t.stride())}")


def _check_common(q, k, v, bias):
    _check4("q", q)
    _check4("k", k)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)}")
    _check4("k", k, dtype=q.dtype)
    _check4("v", v, shape=k.shape, dtype=q.dtype)
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim D={D} (q shape {tuple(q.shape)}) is not supported by the Triton "
                         f"attention kernels (1 <= D <= {MAX_HEAD_DIM})")
    if bias is not None:
        if bias.dim() != 4 or tuple(bias.shape) != (B, H, Nq, Nk):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected it expanded to "
                             f"{(B, H, Nq, Nk)}")
    for name, t in (("k", k), ("v", v), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return B, H, Nq, Nk, D


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def attention_forward(q, k, v, bias, scale, out):
    """softmax(q kᵀ·scale + bias) v written into ``out``; returns lse (B, H, Nq) float32.

    q (B,H,Nq,D); k, v (B,H,Nk,D): strided views with stride(-1) == 1. bias: None or a tensor
    expanded to (B,H,Nq,Nk) (any strides, 0 on broadcast dims). out: preallocated (B,H,Nq,D)
    view of q's dtype (any strides, stride(-1) == 1). lse is the natural-log logsumexp of the
    scaled+biased scores; fully -inf rows give out = 0 and lse = +inf.
    """
    B, H, Nq, Nk, D = _check_common(q, k, v, bias)
    _check4("out", out, shape=q.shape, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if B * H * Nq == 0:
        return lse
    if Nk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return lse
    BLOCK_D = max(16, triton.next_power_of_2(D))
    has_bias = bias is not None
    args = (
        q, k, v, bias if has_bias else q, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_bias_strides(bias),
        out.stride(0), out.stride(1), out.stride(2),
        H, Nq, Nk, float(scale) * _LOG2E,
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_BIAS=has_bias, PRECISION=_precision(q.dtype))
    if _use_fixed(q):
        bm, bn = INTERPRET_BLOCKS["fwd"]
        grid = (triton.cdiv(Nq, bm) * B * H,)
        _fwd_fixed[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
    else:
        grid = lambda META: (triton.cdiv(Nq, META["BLOCK_M"]) * B * H,)  # noqa: E731
        with torch.cuda.device(q.device):
            _fwd_tuned[grid](*args, **meta)
    return lse


def _dbias_layout(bias):
    """Shape of dbias (broadcast dims → 1) and which dims are reduced."""
    reduced = [bias.stride(d) == 0 and bias.shape[d] > 1 for d in range(4)]
    shape = tuple(1 if r else s for r, s in zip(reduced, bias.shape))
    return shape, reduced


def attention_backward(dout, q, k, v, bias, out, lse, scale, dq, dk, dv, bias_requires_grad):
    """Write dq, dk, dv (preallocated views, stride(-1) == 1) and return dbias or None.

    dbias (when ``bias_requires_grad``) is float32 with bias's shape except that every dim where
    bias.stride(dim) == 0 and size > 1 is 1; it holds dS = P∘(dP - delta) summed over those dims.
    """
    B, H, Nq, Nk, D = _check_common(q, k, v, bias)
    _check4("dout", dout, shape=q.shape)
    _check4("out", out, shape=q.shape)
    _check4("dq", dq, shape=q.shape, dtype=q.dtype)
    _check4("dk", dk, shape=k.shape, dtype=q.dtype)
    _check4("dv", dv, shape=v.shape, dtype=q.dtype)
    if bias_requires_grad and bias is None:
        raise ValueError("bias_requires_grad=True but bias is None")
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(B, H, Nq)}")
    lse = lse.to(torch.float32).contiguous()
    # dO may arrive in another dtype (e.g. from an autocast region); the kernels' matmuls need it
    # in the operands' dtype.
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()

    dbias = None
    reduced = [False] * 4
    if bias_requires_grad:
        db_shape, reduced = _dbias_layout(bias)
        dbias = torch.zeros(db_shape, device=q.device, dtype=torch.float32)

    if B * H == 0 or Nq == 0 or Nk == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dbias

    BLOCK_D = max(16, triton.next_power_of_2(D))
    has_bias = bias is not None
    fixed = _use_fixed(q)
    precision = _precision(q.dtype)
    bias_arg = bias if has_bias else q
    bstr = _bias_strides(bias)
    qk_scale = float(scale) * _LOG2E

    ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else _nullctx()
    with ctx:
        delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
        bm_pre = 32 if fixed else 64
        _attn_bwd_preprocess[(triton.cdiv(Nq, bm_pre) * B * H,)](
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            H, Nq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm_pre,
        )

        common = (
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *bstr,
            dout.stride(0), dout.stride(1), dout.stride(2),
        )
        meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_BIAS=has_bias, PRECISION=precision)

        dkdv_args = (q, k, v, bias_arg, dout, lse, delta, dk, dv, *common,
                     dk.stride(0), dk.stride(1), dk.stride(2),
                     dv.stride(0), dv.stride(1), dv.stride(2),
                     H, Nq, Nk, qk_scale, float(scale))
        if fixed:
            bm, bn = INTERPRET_BLOCKS["dkdv"]
            _dkdv_fixed[(triton.cdiv(Nk, bn) * B * H,)](*dkdv_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                        num_warps=4, num_stages=1)
        else:
            _dkdv_tuned[lambda META: (triton.cdiv(Nk, META["BLOCK_N"]) * B * H,)](*dkdv_args, **meta)

        if dbias is not None:
            db_strides = [0 if reduced[d] else dbias.stride(d) for d in range(4)]
            db_arg = dbias
        else:
            db_strides = [0, 0, 0, 0]
            db_arg = lse  # dummy fp32 pointer, never touched
        dq_args = (q, k, v, bias_arg, dout, lse, delta, dq, db_arg, *common,
                   dq.stride(0), dq.stride(1), dq.stride(2),
                   *db_strides,
                   H, Nq, Nk, qk_scale, float(scale))
        dmeta = dict(meta, DBIAS=dbias is not None, DB_SUM_M=reduced[2], DB_SUM_N=reduced[3],
                     DB_ATOMIC=any(reduced))
        if fixed:
            bm, bn = INTERPRET_BLOCKS["dq"]
            _dq_fixed[(triton.cdiv(Nq, bm) * B * H,)](*dq_args, **dmeta, BLOCK_M=bm, BLOCK_N=bn,
                                                      num_warps=4, num_stages=1)
        else:
            _dq_tuned[lambda META: (triton.cdiv(Nq, META["BLOCK_M"]) * B * H,)](*dq_args, **dmeta)
    return dbias


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def attention_flops(B, H, Nq, Nk, D, backward=False):
    """FLOPs of the op as counted above (forward 4·B·H·Nq·Nk·D, backward 2.5× that)."""
    f = 4 * B * H * Nq * Nk * D
    return int(f * 2.5) if backward else f

