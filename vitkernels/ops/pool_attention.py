"""vitkernels.pool_attention: the MViTv2 pooling-attention core (timm `MultiScaleAttention` after its
pooling convs and norms), q (B, heads, Nq, D), k, v (B, heads, Nk, D) -> token layout (B, Nq, heads·D).

out[b, i, h·D + d] = Σ_j softmax_j(scale·q_i·k_j + R[i, j])·v[j, d] + (q[b, h, i, d] if residual), with the
decomposed relative-position term R[i, j] = q_i·rel_pos_h[dh] + q_i·rel_pos_w[dw] (q unscaled) between
spatial tokens (SPEC.md op 9; the index rule in reference/pool_attention.py). Nq = q_h·q_w (+1), Nk =
k_h·k_w (+1) with the class token first when `has_cls_token`.

Layers: public op (schema in SPEC, validation here) -> `_pool_attention_fwd` (out and the float32
natural-log row logsumexp, the same from every backend, so any backward can follow any forward) ->
`_pool_attention_bwd` (dq with the residual term, dk, dv, and the tables' grads, None without tables).
Backends: "triton" (fused forward and backward, triton/pool_attention.py: the rel terms are computed
from q on chip, no Nq×Nk tensor), "cuda" (csrc/kernels/pool_attention.cu, forward only; its backward
runs on the "auto" choice) and "reference" (materialised scores, reference/pool_attention.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ..reference.pool_attention import rel_pos_length
from ._checks import FLOAT_DTYPES, FUSED_MAX_HEAD_DIM, check_same, check_tensor, default_scale, describe
from ._common import autocast_inputs, call_private, call_public, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define

OP = "pool_attention"


def _samples(s, q_hw=(3, 4), k_hw=(2, 2), cls=True, residual=True, tables=True, scale=None):
    """Sample arguments: 2 heads of D = 16, tables of timm's length 2·max(q, k) − 1 per axis."""
    d, sp = 2 * s.d, 1 if cls else 0
    nq, nk = q_hw[0] * q_hw[1] + sp, k_hw[0] * k_hw[1] + sp
    lh, lw = 2 * max(q_hw[0], k_hw[0]) - 1, 2 * max(q_hw[1], k_hw[1]) - 1
    return (
        s(s.b, s.heads, nq, d),
        s(s.b, s.heads, nk, d),
        s(s.b, s.heads, nk, d),
        list(q_hw),
        list(k_hw),
        s(lh, d, scale=0.3) if tables else None,
        s(lw, d, scale=0.3) if tables else None,
        cls,
        residual,
        scale,
    )


def _inputs(q, k, v, q_hw, k_hw, rel_pos_h=None, rel_pos_w=None, *_):
    return KernelInputs(
        (q, k, v, rel_pos_h, rel_pos_w),
        head_dim=q.shape[-1],
        sizes={"q elements": q.numel(), "k elements": k.numel()},
    )


SPEC = define(
    OpSpec(
        number=9,
        name=OP,
        schema=(
            "pool_attention(Tensor q, Tensor k, Tensor v, int[2] q_hw, int[2] k_hw, Tensor? rel_pos_h=None, "
            "Tensor? rel_pos_w=None, bool has_cls_token=True, bool residual=True, float? scale=None) -> Tensor"
        ),
        samples=_samples,
        variants={
            # no class token, no residual, q pooled more than k (k bigger), a given scale
            "no_cls+no_residual": lambda s: _samples(s, (2, 3), (4, 3), cls=False, residual=False, scale=0.3),
            "no_tables": lambda s: _samples(s, (4, 4), (1, 1), tables=False),
        },
        private=lambda a, scale: (*a[:9], scale),
        inputs=_inputs,
        batched=(0, 1, 2),
        triton_modules=("pool_attention",),
        bench=BenchSpec(
            cases="vitkernels.bench.cases:pool_attention_cases",
            baseline="vitkernels.bench.baselines:pool_attention_composition",
        ),
    )
)

# triton/pool_attention.py masks any D <= its MAX_HEAD_DIM (MViTv2 runs D = 96 everywhere).
TRITON_CAPS = Capabilities("Triton pool_attention kernel", backward=True, head_dims=range(1, FUSED_MAX_HEAD_DIM + 1))
# csrc/kernels/pool_attention.cu; what it takes beyond this is asked from C++ (cuda_supports).
CUDA_CAPS = Capabilities(
    "CUDA pool_attention kernel",
    head_dims=range(8, FUSED_MAX_HEAD_DIM + 1, 8),
    min_capability=SM80,
    int32=True,
    ext_op="pool_attention_fwd",
)


# ----------------------------------------------------------------------------- validation


_TABLE_ROWS: dict = {}  # (q, k) -> rows a table needs (rel_pos_length), cached outside torch.compile


def _table_rows(q: int, k: int) -> int:
    if torch.compiler.is_compiling():
        return rel_pos_length(q, k)
    rows = _TABLE_ROWS.get((q, k))
    if rows is None:
        rows = _TABLE_ROWS[(q, k)] = rel_pos_length(q, k)
    return rows


def _err(msg: str) -> ValueError:
    return ValueError(f"vitkernels.pool_attention: {msg}")


def _size(s) -> bool:
    return (type(s) is int or isinstance(s, torch.SymInt)) and s >= 1


def check_hw(name: str, hw) -> tuple[int, int]:
    """(H, W) of positive ints (not bools)."""
    if isinstance(hw, (list, tuple)) and len(hw) == 2 and _size(hw[0]) and _size(hw[1]):
        return hw[0], hw[1]
    raise _err(f"{name} must be (H, W) with ints H, W >= 1, got {hw!r}")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"vitkernels.pool_attention: {name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def validate(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual) -> int:
    """Checks the arguments of `pool_attention`; returns the head dim.

    Valid arguments pass in a few inline comparisons (this runs on every call: host time); anything
    they do not accept goes through `_validate`, whose checks raise the errors."""
    if (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and isinstance(v, Tensor)
        and type(has_cls_token) is bool
        and type(residual) is bool
        and type(q_hw) in _HW_TYPES
        and type(k_hw) in _HW_TYPES
        and len(q_hw) == 2
        and len(k_hw) == 2
    ):
        (qh, qw), (kh, kw) = q_hw, k_hw
        qs, ks = q.shape, k.shape
        dt, dev = q.dtype, q.device
        sp = 1 if has_cls_token else 0
        if (
            type(qh) is int
            and type(qw) is int
            and type(kh) is int
            and type(kw) is int
            and qh >= 1
            and qw >= 1
            and kh >= 1
            and kw >= 1
            and len(qs) == 4
            and len(ks) == 4
            and dt in FLOAT_DTYPES
            and k.dtype == dt
            and v.dtype == dt
            and k.device == dev
            and v.device == dev
            and v.shape == ks
            and qs[1] >= 1
            and qs[3] >= 1
            and ks[0] == qs[0]
            and ks[1] == qs[1]
            and ks[3] == qs[3]
            and qs[2] == qh * qw + sp
            and ks[2] == kh * kw + sp
        ):
            d = qs[3]
            if rel_pos_h is None and rel_pos_w is None:
                return d
            if (
                isinstance(rel_pos_h, Tensor)
                and isinstance(rel_pos_w, Tensor)
                and rel_pos_h.dtype == dt
                and rel_pos_w.dtype == dt
                and rel_pos_h.device == dev
                and rel_pos_w.device == dev
            ):
                hs, ws = rel_pos_h.shape, rel_pos_w.shape
                if (
                    len(hs) == 2
                    and len(ws) == 2
                    and hs[1] == d
                    and ws[1] == d
                    and hs[0] >= (_TABLE_ROWS.get((qh, kh)) or _table_rows(qh, kh))  # (ints here: cached)
                    and ws[0] >= (_TABLE_ROWS.get((qw, kw)) or _table_rows(qw, kw))
                ):
                    return d
    return _validate(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual)


_HW_TYPES = (list, tuple)


def _validate(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual) -> int:
    """`validate`, check by check: raises the error that names the first bad argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4)
    check_same(OP, "q", q, k=k, v=v)
    (qh, qw), (kh, kw) = check_hw("q_hw", q_hw), check_hw("k_hw", k_hw)
    cls = check_flag("has_cls_token", has_cls_token)
    check_flag("residual", residual)
    b, h, nq, d = q.shape
    if h < 1 or d < 1:
        raise _err(f"q must be (B, heads, Nq, D) with heads >= 1 and D >= 1, got {describe(q)}")
    if k.shape != v.shape:
        raise _err(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise _err(
            f"k must be (B, heads, Nk, D) = ({b}, {h}, Nk, {d}) to match q {tuple(q.shape)}, got k {describe(k)}"
        )
    sp, token = (1, " + 1 (class token)") if cls else (0, "")
    if nq != qh * qw + sp:
        raise _err(
            f"q has Nq = {nq} tokens but q_hw = ({qh}, {qw}) needs {qh}*{qw}{token} = {qh * qw + sp} (q {describe(q)})"
        )
    if k.shape[2] != kh * kw + sp:
        raise _err(
            f"k has Nk = {k.shape[2]} tokens but k_hw = ({kh}, {kw}) needs {kh}*{kw}{token} = {kh * kw + sp} "
            f"(k {describe(k)})"
        )
    if (rel_pos_h is None) != (rel_pos_w is None):
        given = "rel_pos_h" if rel_pos_w is None else "rel_pos_w"
        raise _err(f"rel_pos_h and rel_pos_w must be given together (or both None), got only {given}")
    if rel_pos_h is not None:
        for name, t, qn, kn in (("rel_pos_h", rel_pos_h, qh, kh), ("rel_pos_w", rel_pos_w, qw, kw)):
            check_tensor(OP, name, t, ndim=2)
            check_same(OP, "q", q, **{name: t})
            need = _table_rows(qn, kn)
            if t.shape[1] != d:
                raise _err(f"{name} must be (L, D) with D = {d} (the head dim of q), got {describe(t)}")
            if t.shape[0] < need:
                raise _err(
                    f"{name} table too short: q_hw {(qh, qw)} against k_hw {(kh, kw)} needs L >= {need} rows "
                    f"(timm: 2*max({qn}, {kn}) - 1 = {2 * max(qn, kn) - 1}), got {describe(t)}"
                )
    return d


# ----------------------------------------------------------------------------- public op


@composite(OP)
def _pool_attention(q, k, v, q_hw, k_hw, rel_pos_h=None, rel_pos_w=None, has_cls_token=True, residual=True, scale=None):
    q, k, v, rel_pos_h, rel_pos_w = autocast_inputs(q, k, v, rel_pos_h, rel_pos_w)
    d = validate(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual)
    scale = default_scale(scale, d)
    return call_private(
        "_pool_attention_fwd", q, k, v, list(q_hw), list(k_hw), rel_pos_h, rel_pos_w, has_cls_token, residual, scale
    )[0]


def pool_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_hw: Sequence[int],
    k_hw: Sequence[int],
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    has_cls_token: bool = True,
    residual: bool = True,
    scale: Optional[float] = None,
) -> Tensor:
    """MViTv2 pooling attention: q (B, heads, Nq, D) of the pooled q map q_hw, k, v (B, heads, Nk, D) of
    the pooled kv map k_hw (class token first when has_cls_token) -> (B, Nq, heads·D), ready for proj.
    rel_pos_h / rel_pos_w (L, D): timm's decomposed relative-position tables (both or neither);
    residual adds q (timm's residual_pooling). Differentiable in q, k, v and both tables."""
    q_hw, k_hw = _hw_list("q_hw", q_hw), _hw_list("k_hw", k_hw)  # the torch op would broadcast an int
    if type(has_cls_token) is not bool or type(residual) is not bool:
        check_flag("has_cls_token", has_cls_token)
        check_flag("residual", residual)
    return call_public(OP, _pool_attention, q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale)


def _hw_list(name: str, hw) -> list:
    """[H, W] of a valid (H, W) (`check_hw`, in a few comparisons where it is valid)."""
    if type(hw) in _HW_TYPES and len(hw) == 2:
        h, w = hw
        if type(h) is int and type(w) is int and h >= 1 and w >= 1:
            return [h, w]
    return list(check_hw(name, hw))


# ----------------------------------------------------------------------------- private ops


def _new_out(q: Tensor) -> Tensor:
    b, h, n, d = q.shape
    return q.new_empty(b, n, h * d)


def _new_lse(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@private_op("vitkernels::_pool_attention_fwd")
def _pool_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_hw: list[int],
    k_hw: list[int],
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    has_cls_token: bool,
    residual: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    if q.numel() == 0:  # an empty batch
        return _new_out(q).zero_(), _new_lse(q).fill_(float("inf"))
    args = (q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale)
    out, lse = backends.select(OP, *args).forward(*args)
    return out.contiguous(), lse


@_pool_attention_fwd.register_fake
def _(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    return _new_out(q), _new_lse(q)


# Explicit schema: the tables' gradients are None without tables (custom_op cannot infer Tensor? returns).
@torch.library.custom_op(
    "vitkernels::_pool_attention_bwd",
    mutates_args=(),
    schema=(
        "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[2] q_hw, int[2] k_hw, "
        "Tensor? rel_pos_h, Tensor? rel_pos_w, bool has_cls_token, bool residual, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor?, Tensor?)"
    ),
)
def _pool_attention_bwd(dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    if q.numel() == 0:
        dh = None if rel_pos_h is None else torch.zeros_like(rel_pos_h, memory_format=torch.contiguous_format)
        dw = None if rel_pos_w is None else torch.zeros_like(rel_pos_w, memory_format=torch.contiguous_format)
        return (*(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), dh, dw)
    args = (q, k, v, list(q_hw), list(k_hw), rel_pos_h, rel_pos_w, has_cls_token, residual, scale)
    kernel = backends.select(OP, *args, backward=True)
    dq, dk, dv, dh, dw = kernel.backward(dout, q, k, v, out, lse, *args[3:])
    if rel_pos_h is not None:
        dh, dw = dh.to(rel_pos_h.dtype).contiguous(), dw.to(rel_pos_w.dtype).contiguous()
    else:
        dh = dw = None
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dh, dw


@_pool_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    for t in (rel_pos_h, rel_pos_w):
        grads.append(None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format))
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_pos_h, rel_pos_w, out, lse)
    ctx.config = (list(q_hw), list(k_hw), has_cls_token, residual, scale)


def _backward(ctx, dout, _dlse):
    q, k, v, rel_pos_h, rel_pos_w, out, lse = ctx.saved_tensors
    q_hw, k_hw, has_cls_token, residual, scale = ctx.config
    dq, dk, dv, dh, dw = torch.ops.vitkernels._pool_attention_bwd(
        dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale
    )
    return dq, dk, dv, None, None, dh, dw, None, None, None


_pool_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernels
# Kernel signature: forward(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale)
# -> (out, lse); backward(dout, q, k, v, out, lse, <the same from q_hw on>) -> (dq, dk, dv, drel_h, drel_w).


def _reference_forward(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    out, lse = ref.pool_attention_with_lse(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale)
    return fresh(out), lse


def _reference_backward(dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    def f(q, k, v, th, tw):
        return ref.pool_attention(q, k, v, q_hw, k_hw, th, tw, has_cls_token, residual, scale)

    return tuple(reference_vjp(f, (q, k, v, rel_pos_h, rel_pos_w), (0, 1, 2, 3, 4), (dout,)))


def _triton_forward(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    from ..triton import pool_attention as tk

    return tk.pool_attention_fwd(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale)


def _triton_backward(dout, q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    from ..triton import pool_attention as tk

    return tk.pool_attention_bwd(
        dout.to(q.dtype), q, k, v, out, lse, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale
    )


def cuda_supports(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query of the CUDA pool_attention kernel, the one adapter to it (called once the
    declared capabilities pass, so the extension is loaded)."""
    from .. import _ext

    return _ext.load_cuda_ext().supports(OP, head_dim, dtype=dtype, device=device)


# The CUDA kernel stages each query row's rel terms (k_h + k_w floats) in shared memory; up to this
# key-map side they always fit (MViTv2 up to ~2048 px), beyond it the glue may refuse.
CUDA_MAX_KEY_SIDE_WITH_TABLES = 64


def _cuda_check(q, k, v, q_hw, k_hw, rel_pos_h=None, *_):
    d = q.shape[-1]
    if not cuda_supports(d, q.dtype, q.device):
        return [
            f"head dim {d} in {str(q.dtype).replace('torch.', '')} is not supported by the CUDA pool_attention "
            f"kernel (torch.ops.vitkernels_C.pool_attention_supports)"
        ]
    if rel_pos_h is not None and max(k_hw) > CUDA_MAX_KEY_SIDE_WITH_TABLES:
        return [
            f"k_hw {tuple(k_hw)}: with rel-pos tables the CUDA pool_attention kernel takes key maps up to "
            f"{CUDA_MAX_KEY_SIDE_WITH_TABLES} per side"
        ]
    return []


def _cuda_forward(q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, has_cls_token, residual, scale):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tables = [None if t is None else t.contiguous() for t in (rel_pos_h, rel_pos_w)]
    out, lse = torch.ops.vitkernels_C.pool_attention_fwd(
        q, k, v, list(q_hw), list(k_hw), *tables, has_cls_token, residual, scale
    )
    return out, lse


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)
# Forward only: the backward of a forced "cuda" forward runs on the "auto" choice (Triton).
backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
