"""Packed Triton kernels for many short attention sequences (the time axis of TimeSformer / ViViT).

Math as in vitkernels/triton/attention.py, per sequence s = (batch b, group g) and head h with
Nq = Nk = N ≤ ROWS / 2: S = q kᵀ·scale, P = softmax(S), O = P v, lse = logsumexp(S); backward
delta = rowsum(dO ∘ O), dV = Pᵀ dO, dS = P ∘ (dO vᵀ − delta), dQ = dS k·scale, dK = dSᵀ q·scale.

One program holds ROWS // N whole sequences of one head as the rows of a (ROWS, ROWS) tile: row
r is token r % N of sequence tile·(ROWS // N) + r // N, and a block-diagonal mask keeps every score
inside its own sequence. So a 64-row tile carries eight 8-frame sequences instead of one 8-row
sequence padded to 32, the softmax needs no online rescaling (the whole row is on chip), and the
backward computes dQ, dK and dV in the same program (no atomics, deterministic). Rows are addressed
through the (batch, group, head, row) strides of 4-D (B, H, N, D) or 5-D (B, G, H, N, D) views;
lse is float32 (B, [G,] H, N). No bias, no prefix row. Design and cost: docs/attention.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _env
from . import _launch as launch
from ._launch import use_fixed  # module global: tests patch it here

__all__ = ["MAX_LEN", "packed_backward", "packed_forward", "packs"]

MAX_LEN = 16  # the longest sequence packed: at least two per 32-row tile, eight per 128-row tile
INTERPRET_ROWS = 32  # the tile the interpreter runs (tests may change it)


@triton.jit
def _rows(X, s, t, h, G, stride_b, stride_g, stride_h, stride_m, offs_d):
    """(ROWS, BLOCK_D) pointers of the packed rows (sequence s = b·G + g, token t) of head h."""
    row = (s // G).to(tl.int64) * stride_b + (s % G).to(tl.int64) * stride_g + t.to(tl.int64) * stride_m
    return X + h * stride_h + row[:, None] + offs_d[None, :]


@triton.jit
def _packed_layout(BG, G, H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """A program's head, its rows' (sequence, token), the row / column validity and the
    block-diagonal "same sequence" mask of the score tile."""
    per = ROWS // N
    tiles = tl.cdiv(BG, per)
    pid = tl.program_id(0)
    h = (pid // tiles).to(tl.int64)
    r = tl.arange(0, ROWS)
    j = r // N
    s = (pid % tiles) * per + j
    ok = (j < per) & (s < BG)
    same = (j[:, None] == j[None, :]) & ok[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return h, s, r % N, ok, same, offs_d, mask


@triton.jit
def _packed_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
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
    stride_ob,
    stride_og,
    stride_oh,
    stride_om,
    BG,
    G,
    H,
    N,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h, s, t, ok, same, offs_d, mask = _packed_layout(BG, G, H, N, HEAD_DIM, BLOCK_D, ROWS)
    q = tl.load(_rows(Q, s, t, h, G, stride_qb, stride_qg, stride_qh, stride_qm, offs_d), mask=mask, other=0.0)
    k = tl.load(_rows(K, s, t, h, G, stride_kb, stride_kg, stride_kh, stride_kn, offs_d), mask=mask, other=0.0)
    v = tl.load(_rows(V, s, t, h, G, stride_vb, stride_vg, stride_vh, stride_vn, offs_d), mask=mask, other=0.0)
    scores = tl.where(same, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    # Every valid row has its own sequence's N keys; rows past the last sequence see only -inf.
    m = tl.where(ok, tl.max(scores, 1), 0.0)
    p = tl.math.exp2(scores - m[:, None])
    l_sum = tl.where(ok, tl.sum(p, 1), 1.0)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l_sum[:, None]
    o_ptrs = _rows(Out, s, t, h, G, stride_ob, stride_og, stride_oh, stride_om, offs_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    lse = (m + tl.math.log2(l_sum)) * 0.6931471805599453
    tl.store(Lse + (s.to(tl.int64) * H + h) * N + t, lse, mask=ok)


@triton.jit
def _packed_bwd_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    Lse,
    DQ,
    DK,
    DV,
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
    stride_ob,
    stride_og,
    stride_oh,
    stride_om,
    stride_dob,
    stride_dog,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqg,
    stride_dqh,
    stride_dqm,
    stride_dkb,
    stride_dkg,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvg,
    stride_dvh,
    stride_dvn,
    BG,
    G,
    H,
    N,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h, s, t, ok, same, offs_d, mask = _packed_layout(BG, G, H, N, HEAD_DIM, BLOCK_D, ROWS)
    q = tl.load(_rows(Q, s, t, h, G, stride_qb, stride_qg, stride_qh, stride_qm, offs_d), mask=mask, other=0.0)
    k = tl.load(_rows(K, s, t, h, G, stride_kb, stride_kg, stride_kh, stride_kn, offs_d), mask=mask, other=0.0)
    v = tl.load(_rows(V, s, t, h, G, stride_vb, stride_vg, stride_vh, stride_vn, offs_d), mask=mask, other=0.0)
    o = tl.load(_rows(Out, s, t, h, G, stride_ob, stride_og, stride_oh, stride_om, offs_d), mask=mask, other=0.0)
    do = tl.load(_rows(DO, s, t, h, G, stride_dob, stride_dog, stride_doh, stride_dom, offs_d), mask=mask, other=0.0)
    # Rows past the last sequence read lse = +inf: p = 0 there.
    lse2 = tl.load(Lse + (s.to(tl.int64) * H + h) * N + t, mask=ok, other=float("inf")) * 1.4426950408889634
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    scores = tl.where(same, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    p = tl.math.exp2(scores - lse2[:, None])
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
    dq_ptrs = _rows(DQ, s, t, h, G, stride_dqb, stride_dqg, stride_dqh, stride_dqm, offs_d)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
    dk_ptrs = _rows(DK, s, t, h, G, stride_dkb, stride_dkg, stride_dkh, stride_dkn, offs_d)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    dv_ptrs = _rows(DV, s, t, h, G, stride_dvb, stride_dvg, stride_dvh, stride_dvn, offs_d)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Tuning and launch
# ---------------------------------------------------------------------------------------------


def _prune(configs, named_args, **kwargs):
    """Keep the tiles that hold at least two sequences and no more rows than the sequences fill."""
    n, seqs = int(named_args["N"]), int(named_args["BG"])
    kept = [c for c in configs if 2 * n <= c.kwargs["ROWS"] <= max(32, launch.next_pow2(n * seqs))]
    return kept or [min(configs, key=lambda c: c.kwargs["ROWS"])]


# (ROWS, num_warps, num_stages): one tile per program, nothing to pipeline.
_CONFIGS = {
    "half": (launch.configs(("ROWS",), [(64, 4, 1), (128, 8, 1), (32, 4, 1)]),) * 2,
    "fp32": (launch.configs(("ROWS",), [(32, 4, 1), (64, 8, 1)]),) * 2,
}
_KEY = ["N", "BLOCK_D", "PRECISION"]
_TUNED = launch.tuned_table(
    _CONFIGS, [(_packed_fwd_kernel, dict(key=_KEY, prune=_prune)), (_packed_bwd_kernel, dict(key=_KEY, prune=_prune))]
)
_INTERPRETED = launch.is_interpreted(_packed_fwd_kernel)
_FIXED = (_packed_fwd_kernel, _packed_bwd_kernel)


_strides = launch.head_strides


def _launch(index, q, tensors_and_strides, scales):
    """Kernel ``index`` (0 forward, 1 backward) on ``H · ⌈B·G / (ROWS // N)⌉`` programs."""
    B, G, H = launch.head_dims(q)
    N = q.shape[-2]
    args = (*tensors_and_strides, B * G, G, H, N, *scales)
    meta = dict(HEAD_DIM=q.shape[-1], BLOCK_D=launch.pow2_at_least(q.shape[-1]), PRECISION=launch.precision(q.dtype))
    with launch.device_ctx(q):
        if use_fixed(q, _INTERPRETED, "attention"):
            grid = (H * launch.cdiv(B * G, INTERPRET_ROWS // N),)
            _FIXED[index][grid](*args, **meta, ROWS=INTERPRET_ROWS, **launch.INTERPRET_LAUNCH)
        else:
            _TUNED[launch.family(q.dtype)][index][lambda m: (H * launch.cdiv(B * G, m["ROWS"] // N),)](*args, **meta)


def packs(q, k, bias=None, prefix=None) -> bool:
    """Whether the packed kernels take this call: no bias or prefix row, Nq = Nk ≤ MAX_LEN (and
    ≤ half the interpreter's tile), and not switched off (VITKERNELS_ATTN_PACKED)."""
    if bias is not None or prefix is not None or q.shape[-2] != k.shape[-2] or q.shape[-2] == 0:
        return False
    limit = INTERPRET_ROWS // 2 if _INTERPRETED else MAX_LEN
    return q.shape[-2] <= limit and _switch() != "off"


def _switch() -> str:
    value = _env.get("VITKERNELS_ATTN_PACKED")
    if value not in ("auto", "off"):
        raise ValueError(f"VITKERNELS_ATTN_PACKED={value!r}: expected auto or off")
    return value


def packed_forward(q, k, v, out, lse, scale):
    """Write out and lse (float32 (B, [G,] H, N), contiguous) for views the launcher checked."""
    _launch(
        0, q, (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out)), (scale * launch.LOG2E,)
    )


def packed_backward(dout, q, k, v, out, lse, scale, dq, dk, dv):
    """Write dq, dk, dv from dout, the forward's out and lse (contiguous float32)."""
    tensors = (q, k, v, out, dout, lse, dq, dk, dv)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout))
    strides += (*_strides(dq), *_strides(dk), *_strides(dv))
    _launch(1, q, (*tensors, *strides), (scale * launch.LOG2E, float(scale)))
