"""vitkernels.window_attention: Swin W-MSA / SW-MSA on un-shifted, un-partitioned tokens.

qkv (B, H·W, 3C) -> (B, H·W, C); padding, cyclic shift, window partition, relative-position bias and
shift mask are defined in SPEC.md op 3, with its two options: `shift_first` (timm's order: shift the
unpadded map, then pad) and `logit_scale` (Swin V2 cosine attention, scores (q̂·k̂ᵀ)·exp(min(ls_h,
ln 100)) with q and k L2-normalised over D; `scale` unused). Backends: "triton" (fused forward and
backward: shift, partition, padding, bias gather, mask and the cosine normalisation are index math /
in-register work in the kernels, see triton/window_attention.py), "cuda" (csrc/kernels/
window_attention.cu: forward only, both options; its backward runs on the "auto" choice) and
"reference" (index-gather math, see reference/window_attention.py).

The private ops keep the simplest contract: `_window_attention_fwd` returns only `out` and autograd
saves only the inputs. The fused backward recomputes the softmax of each window (N = M² <= 256 keys
stay resident on chip), so no logsumexp or output needs to be saved, read or kept alive.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ._checks import FUSED_MAX_HEAD_DIM, check_heads, check_hw, check_tensor, default_scale, describe
from ._common import autocast_inputs, call_private, call_public, empty_if_none, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define

OP = "window_attention"


def _inputs(qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale=None, logit_scale=None, *_):
    return KernelInputs((qkv, table, qkv_bias, logit_scale), head_dim=(qkv.shape[-1] // 3) // num_heads)


SPEC = define(
    OpSpec(
        number=3,
        name=OP,
        schema=(
            "window_attention(Tensor qkv, int[2] hw, int num_heads, int window_size, int shift_size=0, "
            "Tensor? rel_pos_bias_table=None, Tensor? qkv_bias=None, float? scale=None, Tensor? logit_scale=None, "
            "bool shift_first=False) -> Tensor"
        ),
        samples=lambda s: (s(s.b, 5 * 7, 3 * s.c), [5, 7], s.heads, 3, 1, s(25, s.heads), s(3 * s.c), None),
        variants={
            # timm's shift-then-pad order and Swin V2 cosine attention (ln 10, Swin V2's init, and a head
            # past the ln 100 clamp) on a map that needs padding (5×7, window 3, shift 1)
            "shift_first+logit_scale": lambda s: (
                s(s.b, 5 * 7, 3 * s.c),
                [5, 7],
                s.heads,
                3,
                1,
                s(25, s.heads),
                s(3 * s.c),
                None,
                s.const([2.3, 4.9], (s.heads, 1, 1)),
                True,
            ),
            "logit_scale": lambda s: (
                s(s.b, 5 * 7, 3 * s.c),
                [5, 7],
                s.heads,
                3,
                1,
                None,
                s(3 * s.c),
                0.5,
                s(s.heads, scale=0.3, offset=2.3),
                False,
            ),
            "shift_first": lambda s: (
                s(s.b, 4 * 5, 3 * s.c),
                [4, 5],
                s.heads,
                3,
                2,
                s(25, s.heads),
                None,
                None,
                None,
                True,
            ),
        },
        private=lambda a, scale: (*a[:7], scale, *a[8:]),
        inputs=_inputs,
        triton_modules=("window_attention",),
        inductor=True,
        bench=BenchSpec(
            cases="vitkernels.bench.cases:window_attention_cases",
            baseline="vitkernels.bench.baselines:window_attention_composition",
        ),
    )
)


def validate(
    qkv, hw, num_heads, window_size, shift_size, rel_pos_bias_table, qkv_bias, logit_scale=None, shift_first=False
) -> int:
    check_tensor(OP, "qkv", qkv, ndim=3, packed="(B, H*W, 3C)")
    c = qkv.shape[-1] // 3
    d = check_heads(OP, "qkv", c, num_heads)
    check_hw(OP, qkv, "qkv", hw)
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"vitkernels.window_attention: window_size must be an int >= 1, got {window_size!r}")
    if not isinstance(shift_size, int) or not 0 <= shift_size < window_size:
        raise ValueError(
            f"vitkernels.window_attention: shift_size must be an int with 0 <= shift_size < "
            f"window_size = {window_size}, got {shift_size!r}"
        )
    if rel_pos_bias_table is not None:
        check_tensor(OP, "rel_pos_bias_table", rel_pos_bias_table, ndim=2, like=("qkv", qkv))
        want = ((2 * window_size - 1) ** 2, num_heads)
        if tuple(rel_pos_bias_table.shape) != want:
            raise ValueError(
                f"vitkernels.window_attention: rel_pos_bias_table must be ((2M-1)^2, heads) = {want}, "
                f"got {describe(rel_pos_bias_table)}"
            )
    if qkv_bias is not None:
        check_tensor(OP, "qkv_bias", qkv_bias, ndim=1, like=("qkv", qkv))
        if qkv_bias.shape[0] != 3 * c:
            raise ValueError(
                f"vitkernels.window_attention: qkv_bias must be (3C,) = ({3 * c},), got {describe(qkv_bias)}"
            )
    if logit_scale is not None:
        check_tensor(OP, "logit_scale", logit_scale, like=("qkv", qkv))
        if tuple(logit_scale.shape) not in ((num_heads,), (num_heads, 1, 1)):
            raise ValueError(
                f"vitkernels.window_attention: logit_scale must be (heads,) or (heads, 1, 1) with "
                f"heads = {num_heads}, got {describe(logit_scale)}"
            )
    if not isinstance(shift_first, bool):
        raise TypeError(
            f"vitkernels.window_attention: shift_first must be a bool, got {shift_first!r} "
            f"({type(shift_first).__name__})"
        )
    return d


@composite(OP)
def _window_attention(
    qkv,
    hw,
    num_heads,
    window_size,
    shift_size=0,
    rel_pos_bias_table=None,
    qkv_bias=None,
    scale=None,
    logit_scale=None,
    shift_first=False,
):
    qkv, rel_pos_bias_table, qkv_bias, logit_scale = autocast_inputs(qkv, rel_pos_bias_table, qkv_bias, logit_scale)
    d = validate(qkv, hw, num_heads, window_size, shift_size, rel_pos_bias_table, qkv_bias, logit_scale, shift_first)
    args = (qkv, list(hw), num_heads, window_size, shift_size, rel_pos_bias_table, qkv_bias)
    return call_private("_window_attention_fwd", *args, default_scale(scale, d), logit_scale, shift_first)


def window_attention(
    qkv: Tensor,
    hw,
    num_heads: int,
    window_size: int,
    shift_size: int = 0,
    rel_pos_bias_table: Optional[Tensor] = None,
    qkv_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    logit_scale: Optional[Tensor] = None,
    shift_first: bool = False,
) -> Tensor:
    """Swin (shifted-)window attention. qkv (B, H·W, 3C) is the qkv linear of the un-shifted tokens;
    returns (B, H·W, C) ready for proj. hw = (H, W); window_size M; 0 <= shift_size < M;
    rel_pos_bias_table ((2M-1)², heads); qkv_bias (3C,) is the qkv of a padded (zero) token.
    logit_scale (heads,) or (heads, 1, 1): Swin V2 cosine attention, scores (q̂·k̂ᵀ)·exp(min(ls, ln 100))
    (scale unused; pass Swin V2's 16·sigmoid(cpb_mlp(coords)) table as rel_pos_bias_table).
    shift_first: timm's order (cyclic shift of the unpadded H×W map, then pad); default: pad, then shift."""
    if not isinstance(shift_first, bool):  # the torch op would take 0 / 1 silently
        raise TypeError(
            f"vitkernels.window_attention: shift_first must be a bool, got {shift_first!r} "
            f"({type(shift_first).__name__})"
        )
    return call_public(
        OP,
        _window_attention,
        qkv,
        list(hw),
        num_heads,
        window_size,
        shift_size,
        rel_pos_bias_table,
        qkv_bias,
        scale,
        logit_scale,
        shift_first,
    )


# The private ops take the public op's arguments with the scale resolved (the backward: dout first).
_PRIVATE_ARGS = (
    "Tensor qkv, SymInt[] hw, SymInt num_heads, SymInt window_size, SymInt shift_size, Tensor? rel_pos_bias_table, "
    "Tensor? qkv_bias, float scale, Tensor? logit_scale=None, bool shift_first=False"
)


@private_op("vitkernels::_window_attention_fwd", schema=f"({_PRIVATE_ARGS}) -> Tensor")
def _window_attention_fwd(*args) -> Tensor:
    return backends.select(OP, *args).forward(*args)


@_window_attention_fwd.register_fake
def _(qkv, *_):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3)


@torch.library.custom_op(
    "vitkernels::_window_attention_bwd",
    mutates_args=(),
    schema=f"(Tensor dout, {_PRIVATE_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _window_attention_bwd(dout, qkv, *args):
    dqkv, dtable, dbias, dls = backends.select(OP, qkv, *args, backward=True).backward(dout, qkv, *args)
    return dqkv.contiguous(), empty_if_none(dtable, qkv), empty_if_none(dbias, qkv), empty_if_none(dls, qkv)


@_window_attention_bwd.register_fake
def _(dout, qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        qkv.new_empty(0) if table is None else torch.empty_like(table),
        qkv.new_empty(0) if qkv_bias is None else torch.empty_like(qkv_bias),
        qkv.new_empty(0) if logit_scale is None else torch.empty_like(logit_scale),
    )


def _setup_context(ctx, inputs, output):
    qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale, shift_first = inputs
    ctx.save_for_backward(qkv, table, qkv_bias, logit_scale)
    ctx.config = (hw, num_heads, window_size, shift_size, shift_first)
    ctx.scale = scale


def _backward(ctx, dout):
    qkv, table, qkv_bias, logit_scale = ctx.saved_tensors
    hw, num_heads, window_size, shift_size, shift_first = ctx.config
    dqkv, dtable, dbias, dls = torch.ops.vitkernels._window_attention_bwd(
        dout, qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, ctx.scale, logit_scale, shift_first
    )
    return (
        dqkv,
        None,
        None,
        None,
        None,
        None if table is None else dtable,
        None if qkv_bias is None else dbias,
        None,
        None if logit_scale is None else dls,
        None,
    )


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernels

# Kernel signature: (qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None,
# shift_first=False); backward returns (dqkv, dtable, dqkv_bias, dlogit_scale), None where absent.


def _reference_forward(
    qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    return fresh(
        ref.window_attention(
            qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale, shift_first
        )
    )


def _reference_backward(
    dout, qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    def f(x, t, bias, ls):
        return ref.window_attention(x, hw, num_heads, window_size, shift_size, t, bias, scale, ls, shift_first)

    return tuple(reference_vjp(f, (qkv, table, qkv_bias, logit_scale), (0, 1, 2, 3), (dout,)))


def _triton_forward(
    qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    from ..triton import window_attention as tk

    args = (qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale)
    return tk.window_attention_forward(*args, logit_scale=logit_scale, shift_first=shift_first)


def _triton_backward(
    dout, qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    from ..triton import window_attention as tk

    args = (dout, qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale)
    return tk.window_attention_backward(*args, logit_scale=logit_scale, shift_first=shift_first)


TRITON_CAPS = Capabilities("fused kernel", backward=True, head_dims=range(1, FUSED_MAX_HEAD_DIM + 1))
# csrc/kernels/window_attention.cu; its window limit (M <= 16) is asked from C++ (cuda_supports).
CUDA_CAPS = Capabilities(
    "CUDA window-attention kernel",
    head_dims=range(8, FUSED_MAX_HEAD_DIM + 1, 8),
    min_capability=SM80,
    ext_op="window_attention_fwd",
)

backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)


def cuda_supports(
    window_size: int, d: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
) -> bool:
    """The C++ capability query of the CUDA window-attention kernel, the one adapter to it."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("window_attention", window_size, d, dtype=dtype, device=device)


def cuda_window_reasons(
    window_size: int, d: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
) -> list:
    """Why the compiled window-attention kernel cannot take this window / head dim (asks C++)."""
    from .. import _ext

    if _ext.load_cuda_ext() is None:
        return []
    if not cuda_supports(window_size, d, dtype, device):
        return [
            f"window {window_size} / head dim {d} is not supported by the CUDA window-attention kernel "
            f"(needs window <= 16 and head dim % 8 == 0, 8 <= head dim <= 128)"
        ]
    return []


def cuda_window_option_reasons(logit_scale, shift_first) -> list:
    """An extension built from sources older than the logit_scale / shift_first options registers
    window_attention_fwd without them: then only the default path can run on it."""
    if logit_scale is None and not shift_first:
        return []
    names = backends.ext_op_args("window_attention_fwd")
    if names is None:
        return backends.ext_op_reasons("window_attention_fwd")
    if not {"logit_scale", "shift_first"} <= names:
        return [
            "the loaded CUDA extension's window_attention_fwd has no logit_scale / shift_first "
            "(built from older sources; rebuild it)"
        ]
    return []


def cuda_kernel_version() -> int:
    """The C++ op's `version` argument from VITKERNELS_WINDOW_CUDA_KERNEL: "auto" -> 0 (the newest
    kernels, v2: two windows per 8-warp CTA, Q loaded before the K/V barrier), "v1" -> 1 (the first
    kernels: one window per 4-warp CTA)."""
    return backends.cuda_kernel_version("VITKERNELS_WINDOW_CUDA_KERNEL")


def _cuda_has_version_arg() -> bool:
    """An extension built before the kernel versions has no `version` argument: it runs v1 only."""
    return "version" in (backends.ext_op_args("window_attention_fwd") or ())


def _cuda_check(
    qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    return cuda_window_reasons(
        window_size, (qkv.shape[-1] // 3) // num_heads, qkv.dtype, qkv.device
    ) or cuda_window_option_reasons(logit_scale, shift_first)


def _cuda_forward(
    qkv, hw, num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale=None, shift_first=False
):
    # "v1" passes version=1; "auto" keeps the schema's default (the newest kernels), so the calls
    # below also run on extensions built before the options / the versions (those run v1 only).
    extra = {"version": 1} if cuda_kernel_version() == 1 and _cuda_has_version_arg() else {}
    if logit_scale is None and not shift_first:  # also runs on an extension built before the options
        return torch.ops.vitkernels_C.window_attention_fwd(
            qkv, list(hw), num_heads, window_size, shift_size, table, qkv_bias, scale, **extra
        )
    return torch.ops.vitkernels_C.window_attention_fwd(
        qkv, list(hw), num_heads, window_size, shift_size, table, qkv_bias, scale, logit_scale, shift_first, **extra
    )


# Forward only: the backward of a forced "cuda" forward runs on the "auto" choice (as for attention).
backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
