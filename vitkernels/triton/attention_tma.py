"""Hopper variant of the attention forward: q, k, v and out move by TMA (tensor descriptors).

Math: that of ``_attn_fwd_kernel`` (vitkernels/triton/attention.py): softmax(q kᵀ·scale + bias) v
per (b, [g,] h), the online softmax in base 2, lse in natural log, a row of all -inf scores giving
out = 0 and lse = +inf.

Layout: q, k, v and out are read and written through host tensor descriptors over their 5-D
(B, G, H, N, D) views (a 4-D view gets G = 1), one [1, 1, 1, rows, BLOCK_D] box per tile. The TMA
unit zero-fills the rows past N and the columns past D, so no tile takes a mask; keys past Nk are
set to -inf in the last key block, and out rows past Nq are clipped by the store. The bias (any
strides) and lse are addressed with pointers as in the pointer kernel. ``_attn_fwd_tma_kernel``:
one program per query block; the key loop is a ``tl.range``, which Triton's pipeliner runs
``num_stages`` deep with the loads issued by TMA.

Taken where the calls are eligible (``eligible``): VITKERNELS_ATTN_TMA=on, fp16 / bf16 views whose
base and every stride but the last are 16-byte multiples, no prefix key and no extra query row, on
an sm_90+ GPU (or in the interpreter). "off", the default, keeps the pointer kernel until a GPU
run decides. Design and sm_90a numbers: docs/attention.md ("Hopper: ...").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from . import _launch as launch
from ._launch import use_fixed  # module global: tests patch it here
from ._tiles import accumulate_pv
from ._tiles import store_1d as _store_1d
from .attention import _query_program, _scores, _softmax_finish, _softmax_step

try:  # triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the TMA path is never eligible
    TensorDescriptor = None

__all__ = ["eligible", "tma_forward"]

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
# Tuning: the pointer kernel's 16-bit forward tiles; a pre-hook sizes the descriptors' boxes.
# ---------------------------------------------------------------------------------------------


def _set_boxes(nargs):
    """Give each descriptor the box of the config about to run (the tuner calls this per config)."""
    bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    for name, rows in (("QD", bm), ("OD", bm), ("KD", bn), ("VD", bn)):
        nargs[name].block_shape = [1, 1, 1, rows, bd]


def _configs():
    from .attention import _CONFIGS  # the forward tiles of the pointer kernel, so the A/B is like for like

    return [
        triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_boxes)
        for c in _CONFIGS["half"][0]
    ]


_EVEN = {
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Nk"] % a["BLOCK_N"] == 0,
}
_fixed = triton.heuristics(_EVEN)(_attn_fwd_tma_kernel)


def _prune(configs, named_args, **kwargs):
    from .attention import _prune as prune_like_pointer_kernel

    return prune_like_pointer_kernel(configs, named_args, **kwargs)


_tuned = launch.autotuned(_fixed, _configs(), key=["Nq", "Nk", "BLOCK_D", "HAS_BIAS", "PRECISION"], prune=_prune)
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
    """A view the TMA unit can address: 16-byte aligned base and strides, unit last stride."""
    size = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % TMA_ALIGN == 0
        and all((st * size) % TMA_ALIGN == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    )


def eligible(q, k, v, out, bias, prefix, extra_q) -> bool:
    """True when ``tma_forward`` runs this call (the switch, dtype, device, alignment, no prefix or extra row)."""
    if TensorDescriptor is None or prefix is not None or extra_q is not None or not enabled():
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not _hopper(q):
        return False
    return all(_tma_ready(t) for t in (q, k, v, out))


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
        _fixed[(triton.cdiv(Nq, bm) * heads,)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, **launch.INTERPRET_LAUNCH)
    else:
        _tuned[lambda META: (triton.cdiv(Nq, META["BLOCK_M"]) * heads,)](*args, **meta)
