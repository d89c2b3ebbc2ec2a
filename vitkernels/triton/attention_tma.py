"""Hopper variant of the attention forward and backward: q, k, v, out, dO, dq, dk, dv move by TMA
(tensor descriptors).

Math: that of the pointer kernels (vitkernels/triton/attention.py): softmax(q kᵀ·scale + bias) v
per (b, [g,] h), the online softmax in base 2, lse in natural log, a row of all -inf scores giving
out = 0 and lse = +inf; the FA2 backward (delta from ``_attn_bwd_preprocess``, which stays as it is).

Layout: q, k, v, out, dO, dq, dk and dv are read and written through host tensor descriptors over
their 5-D (B, G, H, N, D) views (a 4-D view gets G = 1), one [1, 1, 1, rows, BLOCK_D] box per tile.
The TMA unit zero-fills the rows past N and the columns past D, so no tile takes a mask; keys past Nk
are set to -inf in the last key block, and rows past N are clipped by the stores. The bias (any
strides), lse, delta, dbias and the single-kernel backward's fp32 dQ (atomics, or per-key-block
partials) are addressed with pointers as in the pointer kernels. Kernels:
``_attn_fwd_tma_kernel`` (one program per query block), ``_attn_bwd_dkdv_tma_kernel`` (per key
block; DQ_MODE 1 / 2: the single-kernel backward) and ``_attn_bwd_dq_tma_kernel`` (per query
block, + dbias). Each streams its other side in a ``tl.range``, which Triton's pipeliner runs
``num_stages`` deep with the loads issued by TMA; the per-tile math is the pointer kernels' jit
helpers (``_scores``, ``_softmax_step``, ``_dkdv_step``, ``_dq_step``).

Taken where the calls are eligible (``eligible``, ``eligible_backward``): VITKERNELS_ATTN_TMA=on,
fp16 / bf16 views whose base and every stride but the last are 16-byte multiples (and not 0), no
prefix key and no extra query row, on an sm_90+ GPU (or in the interpreter). "off", the default,
keeps the pointer kernels until a GPU run decides. Design and sm_90a numbers: docs/attention.md
("Hopper: ...").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from . import _launch as launch
from ._launch import use_fixed  # module global: tests patch it here
from ._tiles import accumulate_pv, load_lse2
from ._tiles import load_1d as _load_1d
from ._tiles import store_1d as _store_1d
from .attention import _dkdv_step, _dq_step, _query_program, _scores, _softmax_finish, _softmax_step, _split_bh

try:  # triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the TMA path is never eligible
    TensorDescriptor = None

__all__ = ["eligible", "eligible_backward", "tma_dkdv", "tma_dq", "tma_forward"]

TMA_ALIGN = 16  # bytes: the TMA unit's alignment of a tensor's base address and of its strides


@triton.jit
def _tile(desc, b, g, h, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (ROWS, BLOCK_D) tile at row ``row`` of head (b, g, h), zero past the view's rows and D."""
    return desc.load([b.to(tl.int32), g.to(tl.int32), h.to(tl.int32), row, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def _tma_step(
    state,
    q,
    KD,
    VD,
    head,
    start_n,
    bias,
    offs,
    m_ok,
    Nk,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The key block at start_n of the online softmax (state = (acc, l_i, m_i)), k and v by TMA; head =
    (b, g, h), bias = (the query block's bias base, row stride, column stride), offs = (m, n) offsets."""
    acc, l_i, m_i = state
    b, g, h = head
    b_base, stride_bm, stride_bn = bias
    BLOCK_N: tl.constexpr = offs[1].shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    k = _tile(KD, b, g, h, start_n, BLOCK_N, BLOCK_D)
    oks = (m_ok, start_n + offs[1] < Nk)
    s = _scores(
        q,
        k,
        b_base + start_n * stride_bn,
        offs,
        stride_bm,
        stride_bn,
        oks,
        qk_scale,
        HAS_BIAS,
        MASK_M,
        MASK_N,
        PRECISION,
    )
    p, alpha, l_i, m_i = _softmax_step(s, l_i, m_i)
    return accumulate_pv(acc, alpha, p, _tile(VD, b, g, h, start_n, BLOCK_N, BLOCK_D), PRECISION), l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    QD,
    KD,
    VD,
    OD,
    Bias,
    Lse,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    G,
    H,
    Nq,
    Nk,
    qk_scale,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    bh, b, g, h, start_m = _query_program(G, H, Nq, BLOCK_M)
    offs = (tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N))
    m_ok = start_m + offs[0] < Nq
    q = _tile(QD, b, g, h, start_m, BLOCK_M, BLOCK_D)
    b_base = Bias + b * stride_bb + h * stride_bh + start_m.to(tl.int64) * stride_bm

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    state = (acc, l_i, m_i)
    head = (b, g, h)
    bias = (b_base, stride_bm, stride_bn)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    # Full key blocks without masks, pipelined; then the ragged tail with the keys past Nk at -inf.
    for start_n in tl.range(0, n_full, BLOCK_N):
        state = _tma_step(
            state, q, KD, VD, head, start_n, bias, offs, m_ok, Nk, qk_scale, HAS_BIAS, not EVEN_M, False, PRECISION
        )
    if not EVEN_N:
        state = _tma_step(
            state, q, KD, VD, head, n_full, bias, offs, m_ok, Nk, qk_scale, HAS_BIAS, not EVEN_M, True, PRECISION
        )
    out, lse = _softmax_finish(state)
    o_at = [b.to(tl.int32), g.to(tl.int32), h.to(tl.int32), start_m, 0]
    OD.store(o_at, out.to(q.dtype).reshape(1, 1, 1, BLOCK_M, BLOCK_D))  # out has q's dtype
    _store_1d(Lse + bh.to(tl.int64) * Nq + start_m + offs[0], lse, m_ok, not EVEN_M)


# ---------------------------------------------------------------------------------------------
# Backward: the dK/dV kernel (split, or the single kernel with dQ by fp32 atomics / partials) and
# the dQ kernel, q, k, v and dO by TMA; the math is the pointer kernels' (_dkdv_step, _dq_step,
# given the tiles).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _store_tile(desc, b, g, h, row, x):
    """Store the (rows, BLOCK_D) tile x at row ``row`` of head (b, g, h); rows past the view's are clipped."""
    desc.store([b.to(tl.int32), g.to(tl.int32), h.to(tl.int32), row, 0], x.reshape(1, 1, 1, x.shape[0], x.shape[1]))


@triton.jit
def _attn_bwd_dkdv_tma_kernel(
    QD,
    KD,
    VD,
    DOD,
    DKD,
    DVD,
    Bias,
    Lse,
    Delta,
    DQ,
    DBias,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dqp,
    stride_dqb,
    stride_dqg,
    stride_dqh,
    stride_dqm,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    stride_dbn,
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
    DQ_MODE: tl.constexpr = 0,
    DBIAS: tl.constexpr = False,
    DB_SUM_M: tl.constexpr = False,
    DB_SUM_N: tl.constexpr = False,
    DB_ATOMIC: tl.constexpr = False,
):
    """dK, dV of one key block (k, v resident, by TMA), streaming the query blocks (q, dO by TMA)
    through the pointer kernel's ``_dkdv_step``. As ``_attn_bwd_dkdv_kernel`` without the prefix key
    and the extra query row; DQ_MODE 1 / 2 (the single-kernel backward): dQ by fp32 atomics into DQ
    or as this key block's partial at DQ + key_block · stride_dqp, and dbias, by pointers."""
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
    k = _tile(KD, b, g, h, start_n, BLOCK_N, BLOCK_D)
    v = _tile(VD, b, g, h, start_n, BLOCK_N, BLOCK_D)

    lse_base = Lse + bh.to(tl.int64) * Nq
    delta_base = Delta + bh.to(tl.int64) * Nq
    bT_base = Bias + b * stride_bb + h * stride_bh + col0 * stride_bn
    dq_base = DQ + block_n.to(tl.int64) * stride_dqp + b * stride_dqb + g * stride_dqg + h * stride_dqh
    db_base = DBias + b * stride_dbb + h * stride_dbh + col0 * stride_dbn
    no_prefix = (None, None)  # HAS_PREFIX is False: no prefix key, its partial slot unused

    grads = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32))
    offs = (offs_m, offs_n, offs_d)
    # q and dO come as tiles: their bases and row strides (None) are unused
    strides = (None, None, stride_bm, stride_bn, stride_dqm, stride_dbm, stride_dbn)
    m_full = (Nq // BLOCK_M) * BLOCK_M
    # Full query blocks without masks, pipelined; then the ragged tail (rows past Nq: zero tiles,
    # lse = +inf, so they add nothing). One loop for both would mask every block's rows: 20–60 more
    # registers on sm_90a at N = 577.
    for start_m in tl.range(0, m_full, BLOCK_M):
        qdo = (_tile(QD, b, g, h, start_m, BLOCK_M, BLOCK_D), _tile(DOD, b, g, h, start_m, BLOCK_M, BLOCK_D))
        grads = _dkdv_step(
            grads,
            (k, v),
            (None, None, bT_base, lse_base, delta_base, dq_base, db_base, None),
            no_prefix,
            offs,
            strides,
            (offs_m < Nq, n_ok, d_ok),
            (qk_scale, scale),
            False,
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
            False,
            BLOCK_D,
            qdo,
        )
        lse_base += BLOCK_M
        delta_base += BLOCK_M
        bT_base += BLOCK_M * stride_bm
        dq_base += BLOCK_M * stride_dqm
        db_base += BLOCK_M * stride_dbm
    if not EVEN_M:
        qdo = (_tile(QD, b, g, h, m_full, BLOCK_M, BLOCK_D), _tile(DOD, b, g, h, m_full, BLOCK_M, BLOCK_D))
        grads = _dkdv_step(
            grads,
            (k, v),
            (None, None, bT_base, lse_base, delta_base, dq_base, db_base, None),
            no_prefix,
            offs,
            strides,
            (m_full + offs_m < Nq, n_ok, d_ok),
            (qk_scale, scale),
            False,
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
            False,
            BLOCK_D,
            qdo,
        )
    dk, dv = grads
    _store_tile(DKD, b, g, h, start_n, (dk * scale).to(k.dtype))  # dk, dv have q's dtype
    _store_tile(DVD, b, g, h, start_n, dv.to(k.dtype))


@triton.jit
def _attn_bwd_dq_tma_kernel(
    QD,
    KD,
    VD,
    DOD,
    DQD,
    Bias,
    Lse,
    Delta,
    DBias,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    stride_dbn,
    G,
    H,
    Nq,
    Nk,
    qk_scale,
    scale,
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
):
    """dQ (and dbias) of one query block (q, dO resident, by TMA), streaming the key blocks (k, v by
    TMA) through the pointer kernel's ``_dq_step``. As ``_attn_bwd_dq_kernel`` without the prefix
    key and the extra query row."""
    bh, b, g, h, start_m = _query_program(G, H, Nq, BLOCK_M)
    row0 = start_m.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = start_m + offs_m < Nq
    q = _tile(QD, b, g, h, start_m, BLOCK_M, BLOCK_D)
    do = _tile(DOD, b, g, h, start_m, BLOCK_M, BLOCK_D)
    row_base = bh.to(tl.int64) * Nq + row0
    lse2 = load_lse2(Lse + row_base + offs_m, m_ok, not EVEN_M)
    delta = _load_1d(Delta + row_base + offs_m, m_ok, 0.0, not EVEN_M)
    b_base = Bias + b * stride_bb + h * stride_bh + row0 * stride_bm
    db_base = DBias + b * stride_dbb + h * stride_dbh + row0 * stride_dbm

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rows = (q, do, lse2, delta)
    offs = (offs_m, offs_n, None)  # k and v come as tiles: their bases, strides, offs_d and d_ok (None) unused
    strides = (None, None, stride_bm, stride_bn, stride_dbm, stride_dbn)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    # Full key blocks without masks, pipelined; then the ragged tail with the keys past Nk at -inf.
    for start_n in tl.range(0, n_full, BLOCK_N):
        kv = (_tile(KD, b, g, h, start_n, BLOCK_N, BLOCK_D), _tile(VD, b, g, h, start_n, BLOCK_N, BLOCK_D))
        dq = _dq_step(
            dq,
            rows,
            (None, None, b_base, db_base),
            offs,
            strides,
            (m_ok, offs_n < Nk, None),
            qk_scale,
            not EVEN_M,
            False,
            HAS_BIAS,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            False,
            PRECISION,
            kv,
        )
        b_base += BLOCK_N * stride_bn
        db_base += BLOCK_N * stride_dbn
    if not EVEN_N:
        kv = (_tile(KD, b, g, h, n_full, BLOCK_N, BLOCK_D), _tile(VD, b, g, h, n_full, BLOCK_N, BLOCK_D))
        dq = _dq_step(
            dq,
            rows,
            (None, None, b_base, db_base),
            offs,
            strides,
            (m_ok, n_full + offs_n < Nk, None),
            qk_scale,
            not EVEN_M,
            True,
            HAS_BIAS,
            DBIAS,
            DB_SUM_M,
            DB_SUM_N,
            DB_ATOMIC,
            False,
            PRECISION,
            kv,
        )
    _store_tile(DQD, b, g, h, start_m, (dq * scale).to(q.dtype))  # dq has q's dtype


# ---------------------------------------------------------------------------------------------
# Tuning: the pointer kernel's 16-bit forward tiles; a pre-hook sizes the descriptors' boxes.
# ---------------------------------------------------------------------------------------------


# Each descriptor argument of the kernels and the block that sizes its box's rows: query-side tiles
# BLOCK_M, key-side tiles BLOCK_N.
_BOX_ROWS = {"QD": "BLOCK_M", "OD": "BLOCK_M", "DOD": "BLOCK_M", "DQD": "BLOCK_M"}
_BOX_ROWS.update(KD="BLOCK_N", VD="BLOCK_N", DKD="BLOCK_N", DVD="BLOCK_N")


def _set_boxes(nargs):
    """Give each descriptor the box of the config about to run (the tuner calls this per config)."""
    for name, block in _BOX_ROWS.items():
        if name in nargs:
            nargs[name].block_shape = [1, 1, 1, nargs[block], nargs["BLOCK_D"]]


def _configs(index: int = 0):
    """The pointer kernels' 16-bit tiles (``attention._CONFIGS["half"][index]``: 0 forward, 1 dK/dV,
    2 dQ, 3 single-kernel backward), so the A/B is like for like, with the box pre-hook."""
    from .attention import _CONFIGS

    return [
        triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_boxes)
        for c in _CONFIGS["half"][index]
    ]


_EVEN = {
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Nk"] % a["BLOCK_N"] == 0,
}
_fixed = triton.heuristics(_EVEN)(_attn_fwd_tma_kernel)


def _prune(configs, named_args, **kwargs):
    from .attention import _prune as prune_like_pointer_kernel

    return prune_like_pointer_kernel(configs, named_args, **kwargs)


_KEY = ["Nq", "Nk", "BLOCK_D", "HAS_BIAS", "PRECISION"]
_DB_KEY = ["DBIAS", "DB_SUM_M", "DB_SUM_N"]
_tuned = launch.autotuned(_fixed, _configs(), key=_KEY, prune=_prune)
_dkdv_fixed = triton.heuristics(_EVEN)(_attn_bwd_dkdv_tma_kernel)
_dq_fixed = triton.heuristics(_EVEN)(_attn_bwd_dq_tma_kernel)
# As the pointer kernels' tuners: the dbias atomics and the single kernel's fp32 dQ are restored
# after each benchmark run.
_dkdv_tuned = launch.autotuned(_dkdv_fixed, _configs(1), key=_KEY, prune=_prune)
_dq_tuned = launch.autotuned(_dq_fixed, _configs(2), key=_KEY + _DB_KEY, prune=_prune, restore_value=["DBias"])
_fused_tuned = launch.autotuned(
    _dkdv_fixed, _configs(3), key=_KEY + ["DQ_MODE"] + _DB_KEY, prune=_prune, restore_value=["DQ", "DBias"]
)
_INTERPRETED = launch.is_interpreted(_attn_fwd_tma_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def enabled() -> bool:
    """VITKERNELS_ATTN_TMA: "off" (default: the pointer kernel until a GPU run decides) or "on"."""
    value = _env.get("VITKERNELS_ATTN_TMA")
    if value not in ("on", "off"):
        raise ValueError(f"VITKERNELS_ATTN_TMA={value!r}: expected on or off")
    return value == "on"


def _hopper(t: torch.Tensor) -> bool:
    """TMA needs an sm_90+ GPU; the interpreter emulates the descriptors on CPU tensors."""
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return _INTERPRETED


def _tma_ready(t: torch.Tensor) -> bool:
    """A view the TMA unit can address: 16-byte aligned base and strides, unit last stride, no 0 stride
    on an axis longer than 1 (an expanded dO, the gradient of a sum, takes the pointer kernels)."""
    size = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % TMA_ALIGN == 0
        and all(st > 0 and (st * size) % TMA_ALIGN == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    )


def eligible(q, k, v, out, bias, prefix, extra_q) -> bool:
    """True when ``tma_forward`` runs this call (the switch, dtype, device, alignment, no prefix or extra row)."""
    return _eligible((q, k, v, out), prefix, extra_q)


def eligible_backward(q, k, v, dout, dq, dk, dv, prefix, extra_q) -> bool:
    """True when ``tma_dkdv`` / ``tma_dq`` run this backward: as ``eligible``, for q, k, v, dO and the
    dq, dk, dv destinations (dk = dv = None: only dQ is wanted)."""
    return _eligible(tuple(t for t in (q, k, v, dout, dq, dk, dv) if t is not None), prefix, extra_q)


def _eligible(views, prefix, extra_q) -> bool:
    if TensorDescriptor is None or prefix is not None or extra_q is not None or not enabled():
        return False
    if views[0].dtype not in (torch.float16, torch.bfloat16) or not _hopper(views[0]):
        return False
    return all(_tma_ready(t) for t in views)


def _descriptor(t: torch.Tensor, rows: int, block_d: int):
    """Descriptor over the 5-D (B, G, H, N, D) view of a 4-D or 5-D head view, box [1, 1, 1, rows, block_d].
    A size-1 axis gets a placeholder stride that satisfies the alignment rule (its index is always 0)."""
    if t.dim() == 4:
        t = t.unsqueeze(1)
    strides = [st if n > 1 else TMA_ALIGN for st, n in zip(t.stride()[:-1], t.shape[:-1])] + [1]
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, 1, rows, block_d])


def tma_forward(q, k, v, bias, has_bias, bias_strides, out, lse, G, H, Nq, Nk, qk_scale, block_d, heads, blocks):
    """Launch the TMA forward; the caller (``attention.attention_forward``) has checked the arguments.
    ``blocks``: the (BLOCK_M, BLOCK_N) of the interpreter's fixed launch; a GPU launch is autotuned."""
    fixed_blocks = blocks if use_fixed(q, _INTERPRETED, "attention") else None
    bm, bn = fixed_blocks or (64, 64)  # the tuner's pre-hook resizes the boxes on a GPU
    descs = [_descriptor(t, rows, block_d) for t, rows in ((q, bm), (k, bn), (v, bn), (out, bm))]
    args = (*descs, bias if has_bias else lse, lse, *bias_strides, G, H, Nq, Nk, qk_scale)
    meta = dict(BLOCK_D=block_d, HAS_BIAS=has_bias, PRECISION=launch.precision(q.dtype))
    if fixed_blocks is not None:
        _fixed[(launch.cdiv(Nq, bm) * heads,)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, **launch.INTERPRET_LAUNCH)
    else:
        _tuned[lambda META: (launch.cdiv(Nq, META["BLOCK_M"]) * heads,)](*args, **meta)


def _launch(fixed_kernel, tuned, grid_rows, grid_block, args, meta, blocks, heads):
    """``blocks`` = (BLOCK_M, BLOCK_N): the interpreter's fixed launch; None: the tuned GPU launch."""
    if blocks is not None:
        bm, bn = blocks
        grid = (launch.cdiv(grid_rows, bm if grid_block == "BLOCK_M" else bn) * heads,)
        fixed_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, **launch.INTERPRET_LAUNCH)
    else:
        tuned[lambda META: (launch.cdiv(grid_rows, META[grid_block]) * heads,)](*args, **meta)


def _backward_args(tensors, meta):
    """(G, H, Nq, Nk, heads), the bias (a dummy without one) and its strides of a backward call."""
    q, k, _, bias, _, _, _ = tensors
    (B, G, H), Nq, Nk = launch.head_dims(q), q.shape[-2], k.shape[-2]
    bias_strides = tuple(bias.stride()) if meta["HAS_BIAS"] else (0, 0, 0, 0)
    return (G, H, Nq, Nk, B * G * H), bias_strides


def tma_dkdv(tensors, dk, dv, meta, fused, fixed, qk_scale, scale, blocks):
    """Launch the TMA dK/dV kernel; the caller (``attention.attention_backward``) has checked the
    arguments and ``eligible_backward``. tensors = (q, k, v, bias or a dummy, dO, lse, delta); meta:
    HEAD_DIM, BLOCK_D, HAS_BIAS, PRECISION, and for the single-kernel backward DQ_MODE and the dbias
    flags, with ``fused`` = (dQ buffer, its strides with the key-block stride first, dbias or a dummy,
    its strides). ``blocks``: the (BLOCK_M, BLOCK_N) of the interpreter's fixed launch (``fixed``)."""
    q, k, v, bias, dout, lse, delta = tensors
    (G, H, Nq, Nk, heads), bias_strides = _backward_args(tensors, meta)
    meta = {name: value for name, value in meta.items() if name != "HAS_PREFIX"}
    dq_buf, dq_strides, db_arg, db_strides = fused if fused is not None else (delta, (0,) * 5, delta, (0,) * 4)
    bm, bn = blocks if fixed else (64, 64)  # the tuner's pre-hook resizes the boxes on a GPU
    tiles = ((q, bm), (k, bn), (v, bn), (dout, bm), (dk, bn), (dv, bn))
    descs = [_descriptor(t, rows, meta["BLOCK_D"]) for t, rows in tiles]
    args = (*descs, bias, lse, delta, dq_buf, db_arg, *bias_strides, *dq_strides, *db_strides)
    args += (G, H, Nq, Nk, qk_scale, float(scale))
    tuned = _fused_tuned if meta.get("DQ_MODE", 0) else _dkdv_tuned
    _launch(_dkdv_fixed, tuned, Nk, "BLOCK_N", args, meta, blocks if fixed else None, heads)


def tma_dq(tensors, dq, meta, dbias, fixed, qk_scale, scale, blocks):
    """Launch the TMA dQ kernel (+ dbias: ``dbias`` = (dbias or a dummy, its strides), the flags in
    meta); the rest as ``tma_dkdv``."""
    q, k, v, bias, dout, lse, delta = tensors
    (G, H, Nq, Nk, heads), bias_strides = _backward_args(tensors, meta)
    meta = {name: value for name, value in meta.items() if name not in ("HAS_PREFIX", "HEAD_DIM")}
    bm, bn = blocks if fixed else (64, 64)
    descs = [_descriptor(t, rows, meta["BLOCK_D"]) for t, rows in ((q, bm), (k, bn), (v, bn), (dout, bm), (dq, bm))]
    db_arg, db_strides = dbias
    args = (*descs, bias, lse, delta, db_arg, *bias_strides, *db_strides, G, H, Nq, Nk, qk_scale, float(scale))
    _launch(_dq_fixed, _dq_tuned, Nq, "BLOCK_M", args, meta, blocks if fixed else None, heads)
