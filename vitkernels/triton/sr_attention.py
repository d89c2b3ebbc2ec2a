"""Triton kernels for ``vitkernels.sr_attention`` specialised for N ≫ M (PVT / SegFormer).

Math, per (batch b, head h), q (N, D) from the full-resolution map, k and v (M, D) from the
spatially reduced map: S = q kᵀ · scale, P = softmax_rows(S), O = P v, lse = logsumexp_rows(S)
(natural log, fp32, (B, heads, N)); backward: delta = rowsum(dO ∘ O), P = exp(S - lse), dV = Pᵀ dO,
dS = P ∘ (dO vᵀ - delta), dQ = dS k·scale, dK = dSᵀ q·scale.

Layout: q, k, v, out, dq, dk, dv strided (B, heads, rows, D) views with a unit last stride. One
program per (b·h, chunk of ``rows`` queries); dK/dV as fp32 partials per program summed by torch
(deterministic, no atomics). Three kernels:
- forward and backward with all M keys/values of the head on chip (``supports_forward`` /
  ``supports_backward``: M ≤ 256, next_pow2(M)·next_pow2(D) ≤ 16384 / 8192);
- the split backward (any M, D ≤ 128): the keys streamed in BLOCK_N passes over the chunk, dK/dV of
  a pass on chip, dQ summed over the passes in a program-private fp32 scratch.
Design notes, cost and versions: docs/sr_attention.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch as launch
from ._launch import occupancy, sm_count, use_fixed  # module globals: tests patch them here
from ._tiles import block_offsets, load_1d, load_lse2, load_tile, logsumexp, store_1d, store_2d, store_tile

__all__ = [
    "sr_attention_backward",
    "sr_attention_forward",
    "sr_attention_split_backward",
    "supports_backward",
    "supports_forward",
    "supports_split_backward",
]

MAX_KEYS = 256
_FWD_TILE = 16384  # BLOCK_KV · BLOCK_D resident in the forward
_BWD_TILE = 8192  # ... in the backward (k, v, dK, dV)

# Interpreter (CPU) configuration; tests may monkeypatch these to exercise other tilings.
INTERPRET_BLOCK_M = {"fwd": 32, "bwd": 16}
INTERPRET_SPLIT_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}  # the split backward's (queries, keys)
# Query rows per program; None = chosen from the GPU's SM count (interpreter: 2 blocks).
ROWS_PER_PROGRAM: int | None = None
# Programs per SM assumed where the compiled kernel's occupancy is not used (VITKERNELS_GRID=fixed,
# no compiled kernel): forward, backward, split backward (see _rows_per_program, _split_rows).
FIXED_WAVES = {"fwd": 4, "bwd": 2}
SPLIT_WAVES = 1


def _block_kv(m: int) -> int:
    return launch.pow2_at_least(m)


def _block_d(d: int) -> int:
    return launch.pow2_at_least(d)


def supports_forward(m: int, d: int) -> bool:
    return 1 <= m <= MAX_KEYS and d <= 128 and _block_kv(m) * _block_d(d) <= _FWD_TILE


def supports_backward(m: int, d: int) -> bool:
    return 1 <= m <= MAX_KEYS and d <= 128 and _block_kv(m) * _block_d(d) <= _BWD_TILE


def supports_split_backward(m: int, d: int) -> bool:
    """The split backward streams the keys: any M ≥ 1, D ≤ 128."""
    return m >= 1 and d <= 128


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _program_rows(H, N, rows):
    """(b·h, b, h, first row, end row) of this program; pid = bh·num_chunks + chunk, 1-D grid."""
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(N, rows)
    bh = pid // num_chunks
    row_start = (pid % num_chunks) * rows
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), row_start, tl.minimum(row_start + rows, N)


@triton.jit
def _program_kv(
    kv, H, N, M, rows, HEAD_DIM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_KV: tl.constexpr
):
    """(b·h, b, h, first row, end row, k, v): this program's rows (``_program_rows``) and all M keys and values
    of its head, zero-filled to BLOCK_KV rows and BLOCK_D columns. ``kv`` = (K, V, stride_kb, stride_kh,
    stride_kn, stride_vb, stride_vh, stride_vn)."""
    K, V, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn = kv
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, row_start, row_end = _program_rows(H, N, rows)
    offs_kv, kv_ok = block_offsets(0, M, BLOCK_KV)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, stride_kn, offs_kv, offs_d, kv_ok, d_ok, not EVEN_KV, MASK_D)
    v = load_tile(V + b * stride_vb + h * stride_vh, stride_vn, offs_kv, offs_d, kv_ok, d_ok, not EVEN_KV, MASK_D)
    return bh, b, h, row_start, row_end, k, v


@triton.jit
def _ds_dv(q, k, v, do, lse2, delta, dv, n_ok, qk_scale, MASK_N: tl.constexpr, PRECISION: tl.constexpr):
    """(dS, dV + Pᵀ dO) of a query block against a key block: P = exp2(q kᵀ·qk_scale − lse2) (0 on keys not
    n_ok), dS = P ∘ (dO vᵀ − delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:
        p = tl.where(n_ok[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p * (dp - delta[:, None]), dv


@triton.jit
def _store_partial(slot, part_stride, dk, dv, n_ok, d_ok, MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    """A program's fp32 (dK, dV) partial rows: dK at the pointer tile ``slot``, dV part_stride after it."""
    store_2d(slot, dk, n_ok, d_ok, MASK_N, MASK_D)
    store_2d(slot + part_stride, dv, n_ok, d_ok, MASK_N, MASK_D)


@triton.jit
def _sr_fwd_kernel(
    Q,
    K,
    V,
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
    stride_ob,
    stride_oh,
    stride_om,
    H,
    N,
    M,
    rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_KV: tl.constexpr,
):
    """out and lse of a chunk of query rows against all M keys of the head, resident on chip."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    kv = (K, V, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn)
    bh, b, h, row_start, row_end, k, v = _program_kv(kv, H, N, M, rows, HEAD_DIM, BLOCK_KV, BLOCK_D, EVEN_KV)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    kv_ok = tl.arange(0, BLOCK_KV) < M

    row0 = row_start.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    o_base = Out + b * stride_ob + h * stride_oh + row0 * stride_om
    lse_base = Lse + bh.to(tl.int64) * N + row0
    for start in range(row_start, row_end, BLOCK_M):
        m_ok = start + offs_m < row_end
        q = load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if not EVEN_KV:
            s = tl.where(kv_ok[None, :], s, float("-inf"))
        # Single-pass softmax: the whole row is on chip (M ≥ 1 real key → finite row max).
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        out = acc / l_i[:, None]
        store_tile(o_base, stride_om, offs_m, offs_d, out, m_ok, d_ok, not EVEN_M, MASK_D)
        store_1d(lse_base + offs_m, logsumexp(m_i, l_i), m_ok, not EVEN_M)
        q_base += BLOCK_M * stride_qm
        o_base += BLOCK_M * stride_om
        lse_base += BLOCK_M


@triton.jit
def _sr_bwd_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    Lse,
    DQ,
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
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    H,
    N,
    M,
    rows,
    part_stride,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_KV: tl.constexpr,
):
    """dq of a chunk of query rows and the chunk's (dK, dV) partial over all M keys of the head, resident on
    chip with their dK, dV accumulators."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    kv = (K, V, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn)
    bh, b, h, row_start, row_end, k, v = _program_kv(kv, H, N, M, rows, HEAD_DIM, BLOCK_KV, BLOCK_D, EVEN_KV)
    offs_m = tl.arange(0, BLOCK_M)
    offs_kv, kv_ok = block_offsets(0, M, BLOCK_KV)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)

    row0 = row_start.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    o_base = Out + b * stride_ob + h * stride_oh + row0 * stride_om
    do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dom
    dq_base = DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqm
    lse_base = Lse + bh.to(tl.int64) * N + row0

    dk = tl.zeros([BLOCK_KV, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        m_ok = start + offs_m < row_end
        q = load_tile(q_base, stride_qm, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        o = load_tile(o_base, stride_om, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        do = load_tile(do_base, stride_dom, offs_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        # Rows past the chunk read lse = +inf → P = 0 and they add nothing.
        lse2 = load_lse2(lse_base + offs_m, m_ok, not EVEN_M)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        ds, dv = _ds_dv(q, k, v, do, lse2, delta, dv, kv_ok, qk_scale, not EVEN_KV, PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        store_tile(dq_base, stride_dqm, offs_m, offs_d, dq, m_ok, d_ok, not EVEN_M, MASK_D)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        q_base += BLOCK_M * stride_qm
        o_base += BLOCK_M * stride_om
        do_base += BLOCK_M * stride_dom
        dq_base += BLOCK_M * stride_dqm
        lse_base += BLOCK_M

    # This program's partial (dK, dV) slot: Part[0 or 1, pid] is a contiguous (M, HEAD_DIM) fp32 block.
    slot = Part + tl.program_id(0).to(tl.int64) * M * HEAD_DIM + offs_kv[:, None] * HEAD_DIM + offs_d[None, :]
    _store_partial(slot, part_stride, dk * scale, dv, kv_ok, d_ok, not EVEN_KV, MASK_D)


@triton.jit
def _split_pass(
    heads,
    row_strides,
    chunk,
    kb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
):
    """Key block ``kb`` of one head against every query of the chunk [row_start, row_end). dK/dV of
    the block stay on chip and are written as this program's partial; dQ goes to the fp32 scratch
    (FIRST: stored; later: added to it; LAST: the sum, scaled, to dq). FIRST computes delta from O
    and dO and stores it unless it is LAST too; later passes load it. ``heads``: the head's (q, k, v, o, dO,
    dq, dQ scratch) first rows, its lse and delta rows and this program's partial slot; ``row_strides``: the
    row strides of the first seven; ``chunk`` = (row_start, row_end, M, part_stride, qk_scale, scale)."""
    q_head, k_head, v_head, o_head, do_head, dq_head, acc_head, lse_row, delta_row, part_slot = heads
    stride_qm, stride_kn, stride_vn, stride_om, stride_dom, stride_dqm, stride_am = row_strides
    row_start, row_end, M, part_stride, qk_scale, scale = chunk
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_m = tl.arange(0, BLOCK_M)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    key0 = tl.cast(kb, tl.int64) * BLOCK_N  # kb may be the constant 0
    offs_n, n_ok = block_offsets(kb * BLOCK_N, M, BLOCK_N)
    k = load_tile(k_head + key0 * stride_kn, stride_kn, offs_n, offs_d, n_ok, d_ok, not EVEN_N, MASK_D)
    v = load_tile(v_head + key0 * stride_vn, stride_vn, offs_n, offs_d, n_ok, d_ok, not EVEN_N, MASK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    num_blocks = tl.cdiv(row_end - row_start, BLOCK_M)
    for i in range(0, num_blocks):
        # Odd passes walk the chunk backwards: the rows the previous pass touched last (q, dO and
        # their dQ scratch) are read first, while they are most likely still in L2.
        j = i + (kb % 2) * (num_blocks - 1 - 2 * i)
        start = row_start + j * BLOCK_M
        # Rows addressed as (row0 + offs_m)·stride in int64: here fewer registers than a scalar base
        # plus int32 tile offsets, the other kernels' convention (sm_90a, ptxas: 238 vs 255 at 64×64).
        row0 = start.to(tl.int64)
        rows_m = row0 + offs_m
        m_ok = start + offs_m < row_end
        q = load_tile(q_head, stride_qm, rows_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        do = load_tile(do_head, stride_dom, rows_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
        # Rows past the chunk read lse = +inf → P = 0 and they add nothing.
        lse2 = load_lse2(lse_row + row0 + offs_m, m_ok, not EVEN_M)
        if FIRST:
            o = load_tile(o_head, stride_om, rows_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if not LAST:
                store_1d(delta_row + row0 + offs_m, delta, m_ok, not EVEN_M)
        else:
            delta = load_1d(delta_row + row0 + offs_m, m_ok, 0.0, not EVEN_M)
        ds, dv = _ds_dv(q, k, v, do, lse2, delta, dv, n_ok, qk_scale, not EVEN_N, PRECISION)
        if FIRST:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        else:
            dq_prev = load_tile(acc_head, stride_am, rows_m, offs_d, m_ok, d_ok, not EVEN_M, MASK_D)
            dq = tl.dot(ds.to(k.dtype), k, dq_prev, input_precision=PRECISION)
        if LAST:
            store_tile(dq_head, stride_dqm, rows_m, offs_d, dq * scale, m_ok, d_ok, not EVEN_M, MASK_D)
        else:
            store_tile(acc_head, stride_am, rows_m, offs_d, dq, m_ok, d_ok, not EVEN_M, MASK_D)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)

    # This pass's key rows of the program's partial slots (dK at part_slot, dV part_stride after).
    slot = part_slot + (key0 + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    _store_partial(slot, part_stride, dk * scale, dv, n_ok, d_ok, not EVEN_N, MASK_D)


@triton.jit
def _sr_split_bwd_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    Lse,
    DQ,
    DQacc,
    Delta,
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
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_ab,
    stride_ah,
    stride_am,
    H,
    N,
    M,
    rows,
    part_stride,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    """One program per (b·h, chunk of ``rows`` queries): ⌈M / BLOCK_N⌉ passes of ``_split_pass``.
    A CTA barrier between passes orders the scratch one pass stores (dQ, delta) before the next
    loads it: the threads that load a row need not be the ones that stored it."""
    bh, b, h, row_start, row_end = _program_rows(H, N, rows)
    chunks = tl.cdiv(N, rows)
    # Partial slots Part[0 or 1, chunk, b·h] (M, HEAD_DIM): one chunk of every head is contiguous.
    slot = (tl.program_id(0) % chunks).to(tl.int64) * (tl.num_programs(0) // chunks) + bh
    heads = (
        Q + b * stride_qb + h * stride_qh,
        K + b * stride_kb + h * stride_kh,
        V + b * stride_vb + h * stride_vh,
        Out + b * stride_ob + h * stride_oh,
        DO + b * stride_dob + h * stride_doh,
        DQ + b * stride_dqb + h * stride_dqh,
        DQacc + b * stride_ab + h * stride_ah,
        Lse + bh.to(tl.int64) * N,  # Lse and Delta: contiguous (B·H, N)
        Delta + bh.to(tl.int64) * N,
        Part + slot * M * HEAD_DIM,
    )
    row_strides = (stride_qm, stride_kn, stride_vn, stride_om, stride_dom, stride_dqm, stride_am)
    args = (heads, row_strides, (row_start, row_end, M, part_stride, qk_scale, scale))
    _split_pass(*args, 0, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N, True, ONE_PASS)
    if not ONE_PASS:
        last = tl.cdiv(M, BLOCK_N) - 1
        tl.debug_barrier()
        for kb in range(1, last):
            _split_pass(*args, kb, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N, False, False)
            tl.debug_barrier()
        _split_pass(*args, last, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N, False, True)


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------

_EVEN = {
    "EVEN_M": lambda a: a["N"] % a["BLOCK_M"] == 0 and a["rows"] % a["BLOCK_M"] == 0,
    "EVEN_KV": lambda a: a["M"] == a["BLOCK_KV"],
}


def _pruner(max_tile):
    """Drop configs whose score tile BLOCK_M × BLOCK_KV exceeds ``max_tile`` fp32 elements."""

    def prune(configs, named_args, **kwargs):
        bkv = int(kwargs.get("BLOCK_KV", named_args.get("BLOCK_KV")))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * bkv <= max_tile]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    return prune


# (BLOCK_M, num_warps, num_stages). The chunk size ``rows`` is a multiple of 128 on a GPU, so any
# BLOCK_M here divides it. Chosen from an offline sm_90a compile (bf16, ptxas -v): none of these
# spills at the (M, D) of PVTv2 (49, 64) and SegFormer (256, 32) once the pruner has dropped the
# tiles above the per-kernel BLOCK_M·BLOCK_KV cap; 4-warp 128-row forward tiles and 4-warp
# backward tiles above 16 rows spilled and were left out.
_CONFIGS = {  # per family: (forward, backward)
    "half": (
        launch.configs(["BLOCK_M"], [(128, 8, 3), (128, 8, 2), (64, 8, 3), (64, 4, 3), (32, 4, 2)]),
        launch.configs(["BLOCK_M"], [(64, 8, 2), (32, 8, 2), (16, 8, 2), (16, 4, 2)]),
    ),
    "fp32": (
        launch.configs(["BLOCK_M"], [(64, 4, 2), (32, 4, 2), (64, 8, 2)]),
        launch.configs(["BLOCK_M"], [(32, 8, 2), (16, 4, 2), (16, 8, 2)]),
    ),
}

_SPLIT_EVEN = {
    "EVEN_M": _EVEN["EVEN_M"],
    "EVEN_N": lambda a: a["M"] % a["BLOCK_N"] == 0,
    "ONE_PASS": lambda a: a["M"] <= a["BLOCK_N"],
}


# Split backward tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) → the BLOCK_D values it compiles at
# for sm_90a without spilling (bf16, ptxas -v; registers in docs/sr_attention.md; BLOCK_D 16 counts
# as 32). Spills do not follow the tile size: 32×128 spills at BLOCK_D 32 but not at 64, 64×128 the
# other way round; at BLOCK_D 128 only 32×64 with 8 warps fits. fp32 ("ieee" dots on CUDA cores):
# from BLOCK_D 64 on every fused fp32 backward spills on sm_90 (the on-chip one too); these spill
# least (≤ 0.25 / 0.5–0.8 / 2.5–5.4 KB at BLOCK_D 32 / 64 / 128). BLOCK_M divides the 128-row unit.
_SPLIT_TILES = {
    "half": {
        (64, 64, 8, 2): (32, 64),
        (32, 128, 8, 2): (64,),
        (16, 128, 8, 2): (32, 64),
        (64, 128, 8, 2): (32,),
        (32, 64, 8, 2): (32, 64, 128),
        (16, 64, 4, 2): (32, 64),
    },
    "fp32": {(16, 32, 8, 2): (32, 64, 128), (16, 16, 4, 2): (32, 64, 128), (16, 64, 8, 2): (32, 64, 128)},
}


def _split_pruner(tiles):
    """The split backward's tiles checked at this BLOCK_D, without key blocks longer than
    next_pow2(M) (when M is below all of them: the shortest ones, a single masked pass)."""

    def prune(configs, named_args, **kwargs):
        bd = max(32, int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))))
        cap_n = launch.pow2_at_least(int(named_args["M"]))
        fits = [
            c for c in configs if bd in tiles[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
        ]
        kept = [c for c in fits if c.kwargs["BLOCK_N"] <= cap_n]
        return kept or [c for c in fits if c.kwargs["BLOCK_N"] == min(f.kwargs["BLOCK_N"] for f in fits)]

    return prune


_CONFIGS = {fam: (*_CONFIGS[fam], launch.configs(["BLOCK_M", "BLOCK_N"], list(_SPLIT_TILES[fam]))) for fam in _CONFIGS}

_KEY = ["N", "M", "BLOCK_D", "PRECISION"]
_fwd_fixed = triton.heuristics(_EVEN)(_sr_fwd_kernel)
_bwd_fixed = triton.heuristics(_EVEN)(_sr_bwd_kernel)
_split_fixed = triton.heuristics(_SPLIT_EVEN)(_sr_split_bwd_kernel)
_INTERPRETED = launch.is_interpreted(_sr_fwd_kernel)

_TUNED = launch.tuned_table(
    _CONFIGS,
    [
        (_fwd_fixed, dict(key=_KEY, prune=launch.PerFamily(half=_pruner(16384), fp32=_pruner(8192)))),
        (_bwd_fixed, dict(key=_KEY, prune=launch.PerFamily(half=_pruner(4096), fp32=_pruner(2048)))),
        (
            _split_fixed,
            dict(
                key=_KEY,
                prune=launch.PerFamily(
                    half=_split_pruner(_SPLIT_TILES["half"]), fp32=_split_pruner(_SPLIT_TILES["fp32"])
                ),
            ),
        ),
    ],
)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _rows_per_program(
    n: int, bh: int, device: torch.device, fixed: bool, block_m: int, waves: int, resident: int | None = None
) -> int:
    """Query rows per program: a multiple of every BLOCK_M the tuner may pick (128 on a GPU). With
    ``resident`` programs of the kernel per SM (``occupancy``): one wave, each head's N rows split
    into ⌊resident·SMs / (B·heads)⌋ chunks (at least 1). Without (VITKERNELS_GRID=fixed, no compiled
    kernel): the old ``waves`` programs per SM, ⌈waves·SMs / (B·heads)⌉ chunks."""
    if ROWS_PER_PROGRAM is not None:
        return int(ROWS_PER_PROGRAM)
    if fixed:
        return 2 * block_m
    unit = 128
    if resident is None:
        chunks = max(1, launch.cdiv(waves * sm_count(device), max(bh, 1)))
        rows = launch.cdiv(n, chunks)
    else:
        rows = launch.one_wave_split(n, bh, resident * sm_count(device))
    return max(unit, launch.cdiv(rows, unit) * unit)


def _planned_rows(fixed: bool, index: int, q, make_args, meta, rows_for, tensors, sizes) -> int:
    """Rows per program of a launch of tuned kernel ``index`` (0 forward, 1 backward, 2 split):
    ``rows_for(resident)`` with the kernel's occupancy (``rows_for(None)``: the fallback), read once
    per call signature before the first launch: ``make_args(rows)`` builds the positional
    arguments at the fallback's rows (a multiple of 128 like every GPU choice, so the kernel
    compiled is the one launched), only when the occupancy is not cached yet. The signature
    (``launch.signature``): ``tensors``, the launch's tensors other than its fresh float32
    scratch (dtypes, alignment, strides), ``sizes`` and the rows, from which make_args builds
    every other non-float argument."""
    mode = launch.grid_mode()
    rows = rows_for(None)
    if fixed or mode == "fixed" or ROWS_PER_PROGRAM is not None:
        return rows
    signature = launch.signature(tensors, rows, *sizes)
    tuned = _TUNED[launch.family(q.dtype)][index]
    resident = occupancy(tuned, lambda: make_args(rows), meta, q.device, signature=signature)
    return rows if resident is None else rows_for(resident)


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must be (B, H, N, D) / (B, H, M, D) views; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, N, D = q.shape
    M = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)}")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("sr_attention Triton kernel: the last dim of every view must be contiguous")
    return B, H, N, M, D


def _strides(*tensors):
    """The (B, H, rows) strides of each (B, H, rows, D) view, in order: the kernels' stride arguments."""
    return launch.strides(*tensors, dims=3)


def sr_attention_forward(q, k, v, scale, out):
    """softmax(q kᵀ·scale) v into ``out`` (a (B, H, N, D) view of q's dtype); returns lse (B, H, N) fp32.

    q (B, H, N, D), k and v (B, H, M, D): strided views with a unit last stride; 1 ≤ M, as
    ``supports_forward``."""
    B, H, N, M, D = _check(q, k, v)
    if not supports_forward(M, D):
        raise ValueError(
            f"sr_attention Triton kernel: M={M}, D={D} exceed the on-chip limit "
            f"(M ≤ {MAX_KEYS}, next_pow2(M)·next_pow2(D) ≤ {_FWD_TILE})"
        )
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if B * H * N == 0:
        return lse
    fixed = use_fixed(q, _INTERPRETED, "sr_attention")
    bm = INTERPRET_BLOCK_M["fwd"]

    def make_args(rows):
        return (q, k, v, out, lse, *_strides(q, k, v, out), H, N, M, rows, float(scale) * launch.LOG2E)

    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_KV=_block_kv(M), PRECISION=launch.precision(q.dtype))
    with launch.device_ctx(q):
        rows_for = lambda r: _rows_per_program(N, B * H, q.device, fixed, bm, FIXED_WAVES["fwd"], r)  # noqa: E731
        rows = _planned_rows(fixed, 0, q, make_args, meta, rows_for, (q, k, v, out, lse), (H, N, M))
        kernel = launch.pick(fixed, _fwd_fixed, _TUNED, q.dtype, 0)
        kernel[(launch.cdiv(N, rows) * B * H,)](*make_args(rows), **meta, **launch.fixed_meta(fixed, BLOCK_M=bm))
    return lse


def _backward_plan(q, k, v, supported, error: str):
    """(B, H, N, M, D, fixed) of a backward call after the checks; ``error`` (formatted with M and D): the
    message when ``supported(M, D)`` does not hold."""
    B, H, N, M, D = _check(q, k, v)
    if not supported(M, D):
        raise ValueError(error.format(M=M, D=D))
    return B, H, N, M, D, use_fixed(q, _INTERPRETED, "sr_attention")


def _run_backward(kernel, programs, args, meta, part, chunk_dim, dk, dv):
    """Launch a backward kernel over ``programs`` (args: the tensors, their ``_strides``, then ``_tail``),
    then write dk, dv from its fp32 (2, ...) partials ``part``, summed over their chunk dim by torch."""
    with launch.device_ctx(dk):
        kernel[(programs,)](*args, **meta)
        sums = part.sum(dim=chunk_dim).view(2, *dk.shape)
        dk.copy_(sums[0])
        dv.copy_(sums[1])


def _tail(H, N, M, rows, programs, D, scale):
    """The scalar arguments every backward kernel ends with: sizes, rows per program, the partials' (dK → dV)
    stride, the base-2 and plain softmax scales."""
    return (H, N, M, rows, programs * M * D, float(scale) * launch.LOG2E, float(scale))


def _zero(*grads) -> None:
    for g in grads:
        g.zero_()


def sr_attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv):
    """Write dq (B, H, N, D), dk and dv (B, H, M, D) (views of q's dtype, any strides with a unit last
    stride) for ``sr_attention_forward``; ``supports_backward(M, D)`` must hold. Deterministic."""
    error = (
        "sr_attention Triton backward: M={M}, D={D} exceed the on-chip limit "
        f"(M ≤ {MAX_KEYS}, next_pow2(M)·next_pow2(D) ≤ {_BWD_TILE}); the split backward has none"
    )
    B, H, N, M, D, fixed = _backward_plan(q, k, v, supports_backward, error)
    if B * H * N == 0:
        return _zero(dq, dk, dv)
    bm = INTERPRET_BLOCK_M["bwd"]
    lse = lse.to(torch.float32).contiguous()

    def make_args(rows, part=None):
        programs = launch.cdiv(N, rows) * B * H
        if part is None:  # a stand-in while the occupancy is read: the partials follow the grid
            part = torch.empty(1, device=q.device, dtype=torch.float32)
        args = (q, k, v, out, dout, lse, dq, part)
        return (*args, *_strides(q, k, v, out, dout, dq), *_tail(H, N, M, rows, programs, D, scale))

    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_KV=_block_kv(M), PRECISION=launch.precision(q.dtype))
    with launch.device_ctx(q):
        rows_for = lambda r: _rows_per_program(N, B * H, q.device, fixed, bm, FIXED_WAVES["bwd"], r)  # noqa: E731
        rows = _planned_rows(fixed, 1, q, make_args, meta, rows_for, (q, k, v, out, dout, lse, dq), (B, H, N, M, D))
    chunks = launch.cdiv(N, rows)
    programs = chunks * B * H
    # Part[0] = dK partials, Part[1] = dV partials, one (M, D) fp32 slot per program.
    part = torch.empty((2, B * H, chunks, M, D), device=q.device, dtype=torch.float32)
    kernel = launch.pick(fixed, _bwd_fixed, _TUNED, q.dtype, 1)
    meta = dict(meta, **launch.fixed_meta(fixed, BLOCK_M=bm))
    _run_backward(kernel, programs, make_args(rows, part), meta, part, 2, dk, dv)


def _split_rows(n: int, bh: int, device: torch.device, fixed: bool, block_m: int, resident: int | None = None) -> int:
    """Query rows per program of the split backward. On a GPU: chunks = ⌊resident·SMs / (B·heads)⌋
    (at least 1) per head, ``resident`` the compiled kernel's programs per SM (one: it takes an SM;
    ``SPLIT_WAVES`` without it), so the grid fills the SMs without a partial last wave, and rows =
    ⌈N / chunks⌉ rounded up to a multiple of 128 (every BLOCK_M the tuner may pick divides it).
    Fewer, longer chunks write fewer partials: 8·M·D bytes per program (docs/sr_attention.md)."""
    if ROWS_PER_PROGRAM is not None:
        return int(ROWS_PER_PROGRAM)
    if fixed:
        return 2 * block_m
    unit = 128
    waves = SPLIT_WAVES if resident is None else resident
    chunks = max(1, waves * sm_count(device) // max(bh, 1))
    return max(unit, launch.cdiv(launch.cdiv(n, chunks), unit) * unit)


def sr_attention_split_backward(dout, q, k, v, out, lse, scale, dq, dk, dv):
    """``sr_attention_backward`` for any M (``supports_split_backward``: M ≥ 1, D ≤ 128), the keys
    streamed. Each program takes a chunk of one head's queries: its dq rows directly, its dK/dV as
    an fp32 partial in a (2, chunks, B·H, M, D) workspace that torch sums over the chunks in fp32 (a
    fixed order, no atomics: bitwise deterministic). Scratch: dQ in fp32 (B, H, N, D) (an fp32 dq
    is its own scratch) and delta (B, H, N)."""
    error = "sr_attention Triton split backward: needs M ≥ 1 and D ≤ 128, got M={M}, D={D}"
    B, H, N, M, D, fixed = _backward_plan(q, k, v, supports_split_backward, error)
    if B * H * N == 0:
        return _zero(dq, dk, dv)
    acc = dq if dq.dtype == torch.float32 else torch.empty((B, H, N, D), device=q.device, dtype=torch.float32)
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    lse = lse.to(torch.float32).contiguous()

    def make_args(rows, part=None):
        programs = launch.cdiv(N, rows) * B * H
        if part is None:  # a stand-in while the occupancy is read: the partials follow the grid
            part = torch.empty(1, device=q.device, dtype=torch.float32)
        args = (q, k, v, out, dout, lse, dq, acc, delta, part)
        return (*args, *_strides(q, k, v, out, dout, dq, acc), *_tail(H, N, M, rows, programs, D, scale))

    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), PRECISION=launch.precision(q.dtype))
    with launch.device_ctx(q):
        rows_for = lambda r: _split_rows(N, B * H, q.device, fixed, INTERPRET_SPLIT_BLOCKS["BLOCK_M"], r)  # noqa: E731
        tensors = (q, k, v, out, dout, lse, dq, acc, delta)
        rows = _planned_rows(fixed, 2, q, make_args, meta, rows_for, tensors, (B, H, N, M, D))
    chunks = launch.cdiv(N, rows)
    programs = chunks * B * H
    part = torch.empty((2, chunks, B * H, M, D), device=q.device, dtype=torch.float32)
    kernel = launch.pick(fixed, _split_fixed, _TUNED, q.dtype, 2)
    meta = dict(meta, **launch.fixed_meta(fixed, **INTERPRET_SPLIT_BLOCKS))
    _run_backward(kernel, programs, make_args(rows, part), meta, part, 1, dk, dv)
