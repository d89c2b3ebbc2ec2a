"""Triton kernels for ``vitkernels.sr_attention`` specialised for N ≫ M (PVT / SegFormer).

Math
----
Per (batch b, head h), with q (N, D) from the full-resolution map and k, v (M, D) from the
spatially reduced map (scale chosen by the caller, default D^-1/2):

    S = q kᵀ · scale          (N, M)         one row per query; M ≤ 256 fits on chip whole
    P = softmax_rows(S),  lse = logsumexp_rows(S)
    O = P v                   (N, D)

Because every key of the row is on chip at once, the softmax is a single pass (row max, exp2,
row sum): no online rescaling of the accumulator as in FlashAttention. Scores are kept in base 2
(scale · log2 e folded in); lse is stored as a natural log, float32, (B, heads, N), as the
general kernels do. There is no bias and M ≥ 1 here (the op layer answers M = 0), so every row
has a finite maximum.

Backward, given dO (the FlashAttention-2 identities, in one kernel):

    delta = rowsum(dO ∘ O)             computed in the kernel from the O and dO tiles it loads
    P     = exp(S - lse)               recomputed from q, k and the saved lse
    dV    = Pᵀ dO,   dP = dO vᵀ,   dS = P ∘ (dP - delta)
    dQ    = dS k · scale              complete per query block → stored directly
    dK    = dSᵀ q · scale             a sum over all N queries → per-program partial sums

Design
------
* One program per (b·h, chunk of ``rows`` queries): it loads k and v of its head once
  (BLOCK_KV = next_pow2(M) ≥ 16 rows, zero-filled past M) and loops over the chunk's query
  blocks of BLOCK_M rows. The grid is 1-D (pid = bh·num_chunks + chunk): no 65,535 limit, and
  consecutive programs share one head's k/v in L2. The chunk size is a runtime multiple of every
  BLOCK_M the tuner may pick, chosen so the grid has a few programs per SM; k/v are then read
  from L2 once per chunk instead of once per query block.
* Backward: the same grid; each program keeps dK and dV (BLOCK_KV × BLOCK_D, fp32) on chip over
  its chunk and writes them as one fp32 partial slot; the launcher sums the slots over chunks with
  ``torch.sum`` (fixed order → bitwise deterministic, no atomics). dQ is written per block. The
  extra HBM traffic of the partials is 2·(B·heads·chunks)·M·D·4 bytes written and read once.
* Strided (B, heads, rows, D) views in and out (last dim contiguous), as the general kernels:
  q and kv are read straight from the token-layout projections, out / dq / dkv written in token
  layout, without copies in the op layer.
* Limits (``supports_forward`` / ``supports_backward``): BLOCK_KV ≤ 256 and
  BLOCK_KV·BLOCK_D ≤ 16384 forward (all of k and v resident), BLOCK_KV·BLOCK_D ≤ 8192 backward
  (k, v, dK, dV resident). Larger M (e.g. SegFormer at 1024 px, M = 1024) goes to the general
  FlashAttention kernels (vitkernels/triton/attention.py), which stream the keys.
* Matmul precision as in attention.py (fp16/bf16 tensor cores with fp32 accumulation; fp32
  operands "ieee" unless the user allowed TF32).

Cost (C = heads·D, e = element size; N ≫ M makes the op memory-bound for M ≲ 295 at 2 bytes):
    forward  FLOPs = 4·B·N·M·C      bytes ≈ e·(2·B·N·C + 2·B·M·C·chunks) + 4·B·heads·N
    backward FLOPs = 10·B·N·M·C     (5 GEMMs, nothing recomputed twice)
             bytes ≈ e·(4·B·N·C + 2·B·M·C·chunks + 2·B·M·C) + 4·B·heads·N + 16·B·M·C·chunks

Versions (GPU timings go in docs/sr_attention.md once measured):
* v1 — the design above; tested in the interpreter, compiled offline for sm_90; not yet timed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_ctx as _device_ctx
from ._launch import family as _family
from ._launch import is_interpreted, sm_count, use_fixed
from ._launch import precision as _precision
from .attention import _load_1d, _load_2d, _store_1d, _store_2d

__all__ = ["sr_attention_backward", "sr_attention_forward", "supports_backward", "supports_forward"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
MAX_KEYS = 256
_FWD_TILE = 16384  # BLOCK_KV · BLOCK_D resident in the forward
_BWD_TILE = 8192   # ... in the backward (k, v, dK, dV)

# Interpreter (CPU) configuration; tests may monkeypatch these to exercise other tilings.
INTERPRET_BLOCK_M = {"fwd": 32, "bwd": 16}
# Query rows per program; None = chosen from the GPU's SM count (interpreter: 2 blocks).
ROWS_PER_PROGRAM: int | None = None


def _block_kv(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def supports_forward(m: int, d: int) -> bool:
    return 1 <= m <= MAX_KEYS and d <= 128 and _block_kv(m) * _block_d(d) <= _FWD_TILE


def supports_backward(m: int, d: int) -> bool:
    return 1 <= m <= MAX_KEYS and d <= 128 and _block_kv(m) * _block_d(d) <= _BWD_TILE


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_kv(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, M,
             HEAD_DIM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
             EVEN_KV: tl.constexpr):
    """All M keys and values of head (b, h), zero-filled to BLOCK_KV rows and BLOCK_D columns."""
    offs_kv = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = offs_kv < M
    d_ok = offs_d < HEAD_DIM
    k = _load_2d(K + b * stride_kb + h * stride_kh + offs_kv[:, None] * stride_kn + offs_d[None, :],
                 kv_ok, d_ok, not EVEN_KV, HEAD_DIM != BLOCK_D)
    v = _load_2d(V + b * stride_vb + h * stride_vh + offs_kv[:, None] * stride_vn + offs_d[None, :],
                 kv_ok, d_ok, not EVEN_KV, HEAD_DIM != BLOCK_D)
    return k, v


@triton.jit
def _program_rows(H, N, rows):
    """(b·h, b, h, first row, end row) of this program; pid = bh·num_chunks + chunk, 1-D grid."""
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(N, rows)
    bh = pid // num_chunks
    row_start = (pid % num_chunks) * rows
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), row_start, tl.minimum(row_start + rows, N)


@triton.jit
def _sr_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, N, M, rows, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_KV: tl.constexpr,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, row_start, row_end = _program_rows(H, N, rows)
    k, v = _load_kv(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, M,
                    HEAD_DIM, BLOCK_KV, BLOCK_D, EVEN_KV)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = tl.arange(0, BLOCK_KV) < M
    d_ok = offs_d < HEAD_DIM

    row0 = row_start.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
    o_base = Out + b * stride_ob + h * stride_oh + row0 * stride_om
    lse_base = Lse + bh.to(tl.int64) * N + row0
    for start in range(row_start, row_end, BLOCK_M):
        m_ok = start + offs_m < row_end
        q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if not EVEN_KV:
            s = tl.where(kv_ok[None, :], s, float("-inf"))
        # Single-pass softmax: the whole row is on chip (M ≥ 1 real key → finite row max).
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        out = acc / l_i[:, None]
        _store_2d(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
                  m_ok, d_ok, not EVEN_M, MASK_D)
        _store_1d(lse_base + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, m_ok, not EVEN_M)
        q_base += BLOCK_M * stride_qm
        o_base += BLOCK_M * stride_om
        lse_base += BLOCK_M


@triton.jit
def _sr_bwd_kernel(
    Q, K, V, Out, DO, Lse, DQ, Part,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, N, M, rows, part_stride, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_KV: tl.constexpr,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, row_start, row_end = _program_rows(H, N, rows)
    k, v = _load_kv(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, M,
                    HEAD_DIM, BLOCK_KV, BLOCK_D, EVEN_KV)
    offs_m = tl.arange(0, BLOCK_M)
    offs_kv = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = offs_kv < M
    d_ok = offs_d < HEAD_DIM

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
        q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
        o = _load_2d(o_base + offs_m[:, None] * stride_om + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
        do = _load_2d(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
        # Rows past the chunk read lse = +inf → P = 0 and they add nothing.
        lse2 = _load_1d(lse_base + offs_m, m_ok, float("inf"), not EVEN_M) * 1.4426950408889634
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if not EVEN_KV:
            p = tl.where(kv_ok[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        _store_2d(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                  m_ok, d_ok, not EVEN_M, MASK_D)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        q_base += BLOCK_M * stride_qm
        o_base += BLOCK_M * stride_om
        do_base += BLOCK_M * stride_dom
        dq_base += BLOCK_M * stride_dqm
        lse_base += BLOCK_M

    # This program's partial (dK, dV) slot: Part[0 or 1, pid] is a contiguous (M, HEAD_DIM) fp32 block.
    slot = Part + tl.program_id(0).to(tl.int64) * M * HEAD_DIM + offs_kv[:, None] * HEAD_DIM + offs_d[None, :]
    _store_2d(slot, dk * scale, kv_ok, d_ok, not EVEN_KV, MASK_D)
    _store_2d(slot + part_stride, dv, kv_ok, d_ok, not EVEN_KV, MASK_D)


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------

_EVEN = {
    "EVEN_M": lambda a: a["N"] % a["BLOCK_M"] == 0 and a["rows"] % a["BLOCK_M"] == 0,
    "EVEN_KV": lambda a: a["M"] == a["BLOCK_KV"],
}


def _cfgs(shapes):
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for (m, w, s) in shapes]


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
_FWD_CONFIGS = _cfgs([(128, 8, 3), (128, 8, 2), (64, 8, 3), (64, 4, 3), (32, 4, 2)])
_BWD_CONFIGS = _cfgs([(64, 8, 2), (32, 8, 2), (16, 8, 2), (16, 4, 2)])
_FWD_CONFIGS_FP32 = _cfgs([(64, 4, 2), (32, 4, 2), (64, 8, 2)])
_BWD_CONFIGS_FP32 = _cfgs([(32, 8, 2), (16, 4, 2), (16, 8, 2)])

_KEY = ["N", "M", "BLOCK_D", "PRECISION"]
_fwd_fixed = triton.heuristics(_EVEN)(_sr_fwd_kernel)
_bwd_fixed = triton.heuristics(_EVEN)(_sr_bwd_kernel)
_INTERPRETED = is_interpreted(_sr_fwd_kernel)


def _tuned(kernel, configs, max_tile, **kw):
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _pruner(max_tile)},
                           **kw)(kernel)


_TUNED = {
    "half": (_tuned(_fwd_fixed, _FWD_CONFIGS, 16384), _tuned(_bwd_fixed, _BWD_CONFIGS, 4096)),
    "fp32": (_tuned(_fwd_fixed, _FWD_CONFIGS_FP32, 8192), _tuned(_bwd_fixed, _BWD_CONFIGS_FP32, 2048)),
}


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _rows_per_program(n: int, bh: int, device: torch.device, fixed: bool, block_m: int,
                      waves: int) -> int:
    """Query rows per program: a multiple of every BLOCK_M the tuner may pick (128 on a GPU),
    sized so the grid has about ``waves`` programs per SM."""
    if ROWS_PER_PROGRAM is not None:
        return int(ROWS_PER_PROGRAM)
    if fixed:
        return 2 * block_m
    unit = 128
    chunks = max(1, triton.cdiv(waves * sm_count(device), max(bh, 1)))
    return max(unit, triton.cdiv(triton.cdiv(n, chunks), unit) * unit)


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, H, N, D) / (B, H, M, D) views; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    M = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)}")
    if not supports_forward(M, D):
        raise ValueError(f"sr_attention Triton kernel: M={M}, D={D} exceed the on-chip limit "
                         f"(M ≤ {MAX_KEYS}, next_pow2(M)·next_pow2(D) ≤ {_FWD_TILE})")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("sr_attention Triton kernel: the last dim of every view must be contiguous")
    return B, H, N, M, D


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def sr_attention_forward(q, k, v, scale, out):
    """softmax(q kᵀ·scale) v into ``out`` (a (B, H, N, D) view of q's dtype); returns lse (B, H, N) fp32.

    q (B, H, N, D), k and v (B, H, M, D): strided views with a unit last stride; 1 ≤ M, as
    ``supports_forward``."""
    B, H, N, M, D = _check(q, k, v)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if B * H * N == 0:
        return lse
    fixed = use_fixed(q, _INTERPRETED, "sr_attention")
    bm = INTERPRET_BLOCK_M["fwd"]
    rows = _rows_per_program(N, B * H, q.device, fixed, bm, waves=4)
    args = (q, k, v, out, lse, *_s3(q), *_s3(k), *_s3(v), *_s3(out), H, N, M, rows, float(scale) * _LOG2E)
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_KV=_block_kv(M), PRECISION=_precision(q.dtype))
    grid = (triton.cdiv(N, rows) * B * H,)
    with _device_ctx(q):
        if fixed:
            _fwd_fixed[grid](*args, **meta, BLOCK_M=bm, num_warps=4, num_stages=1)
        else:
            _TUNED[_family(q.dtype)][0][grid](*args, **meta)
    return lse


def sr_attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv):
    """Write dq (B, H, N, D), dk and dv (B, H, M, D) (views of q's dtype, any strides with a unit last
    stride) for ``sr_attention_forward``; ``supports_backward(M, D)`` must hold. Deterministic."""
    B, H, N, M, D = _check(q, k, v)
    if not supports_backward(M, D):
        raise ValueError(f"sr_attention Triton backward: M={M}, D={D} exceed the on-chip limit "
                         f"(next_pow2(M)·next_pow2(D) ≤ {_BWD_TILE})")
    lse = lse.to(torch.float32).contiguous()
    if B * H * N == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    fixed = use_fixed(q, _INTERPRETED, "sr_attention")
    bm = INTERPRET_BLOCK_M["bwd"]
    rows = _rows_per_program(N, B * H, q.device, fixed, bm, waves=2)
    chunks = triton.cdiv(N, rows)
    programs = chunks * B * H
    # Part[0] = dK partials, Part[1] = dV partials, one (M, D) fp32 slot per program.
    part = torch.empty((2, B * H, chunks, M, D), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, dout, lse, dq, part, *_s3(q), *_s3(k), *_s3(v), *_s3(out), *_s3(dout),
            *_s3(dq), H, N, M, rows, programs * M * D, float(scale) * _LOG2E, float(scale))
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_KV=_block_kv(M), PRECISION=_precision(q.dtype))
    with _device_ctx(q):
        if fixed:
            _bwd_fixed[(programs,)](*args, **meta, BLOCK_M=bm, num_warps=4, num_stages=1)
        else:
            _TUNED[_family(q.dtype)][1][(programs,)](*args, **meta)
        sums = part.sum(dim=2).view(2, B, H, M, D)
        dk.copy_(sums[0])
        dv.copy_(sums[1])
