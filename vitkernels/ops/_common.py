"""Helpers shared by the op files: argument checks, autocast, reference backward."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# Backend capabilities are declared per kernel (backends.Capabilities) and checked by one function
# (backends.standard_reasons); these two helpers stay importable from here.
from ..backends import ext_op_reasons, int32_reasons  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Head dims the fused attention kernels are built and tested for (the Triton kernels mask any D <= 128;
# the CUDA C++ ones take D % 8 == 0 up to it).
FUSED_MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------- argument checks
# Every message names the op, the argument and what it got, so a user can fix the call site.


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(op: str, name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"vitkernels.{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"vitkernels.{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference "
            f"backend), got {describe(t)}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"vitkernels.{op}: {name} must be {ndim}-D, got {describe(t)}")


def check_same(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    """All given tensors share ref's dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(
                f"vitkernels.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {describe(t)}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"vitkernels.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {describe(t)}"
            )


def check_int(op: str, name: str, value, minimum: int = 1) -> int:
    """An int argument (not a bool, not a float) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vitkernels.{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"vitkernels.{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_heads(op: str, name: str, channels: int, num_heads: int, what: str = "C", t: Optional[Tensor] = None) -> int:
    """Head dim D = channels / num_heads, with a clear error when it does not divide."""
    check_int(op, "num_heads", num_heads)
    if channels % num_heads:
        where = f"{name} shape {tuple(t.shape)}" if t is not None else name
        raise ValueError(
            f"vitkernels.{op}: {what} = {channels} (from {where}) is not divisible by num_heads = {num_heads}"
        )
    return channels // num_heads


def check_hw(op: str, x: Tensor, name: str, hw) -> tuple[int, int]:
    if len(hw) != 2 or any(int(s) < 1 for s in hw):
        raise ValueError(f"vitkernels.{op}: hw must be (H, W) with H, W >= 1, got {tuple(hw)}")
    h, w = int(hw[0]), int(hw[1])
    if x.shape[1] != h * w:
        raise ValueError(
            f"vitkernels.{op}: {name} has {x.shape[1]} tokens but hw = ({h}, {w}) needs H*W = {h * w} "
            f"({name} {describe(x)})"
        )
    return h, w


def default_scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- eager fast path
# A public op call goes public function -> dispatcher -> CompositeImplicitAutograd body -> private
# custom op (autograd wrapper, dynamo guard, alias checks) -> backend choice -> kernel: ~14 µs of host
# time on a CPU core before any kernel runs, ~3x F.scaled_dot_product_attention's whole call. In plain
# eager inference nothing above the kernel does any work (no graph to record, no mode or tracer to
# see the op), so there the public function calls the composite body, and the body calls the private
# op's Python implementation, directly: the same validation, backend choice and kernels. Any tensor
# that needs a gradient, torch.compile / export / jit tracing, a torch function or dispatch mode
# (FlopCounterMode, FakeTensorMode), a functorch transform, the profiler, or a tensor subclass
# (DTensor, FakeTensor) takes the dispatcher path as before.

EAGER_FAST_PATH = True  # False: every call takes the dispatcher path (`vitkernels-bench overhead` compares)
_PRIVATE_IMPLS: dict = {}
_TORCH_OPS: dict = {}  # name -> torch.ops.vitkernels.<name>, looked up once


def private_op(qualname: str):
    """`torch.library.custom_op(qualname, mutates_args=())` that also keeps the undecorated function,
    for `call_private` on the eager fast path (forward private ops)."""

    def register(fn):
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        _PRIVATE_IMPLS[qualname.split("::")[-1]] = fn
        return op

    return register


def plain_eager(*args) -> bool:
    """True when calling the kernels directly is indistinguishable from the dispatcher path (see above)."""
    if (
        not EAGER_FAST_PATH
        or torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor and type(a) is not torch.nn.Parameter:
                return False
            if grad and a.requires_grad:
                return False
    return True


def call_private(name: str, *args):
    """torch.ops.vitkernels.<name>(*args), or its Python implementation on the eager fast path."""
    if plain_eager(*args):
        return _PRIVATE_IMPLS[name](*args)
    return _torch_op(name)(*args)


def call_public(name: str, body: Callable, *args):
    """torch.ops.vitkernels.<name>(*args), or its composite `body` on the eager fast path."""
    if plain_eager(*args):
        return body(*args)
    return _torch_op(name)(*args)


def _torch_op(name: str):
    op = _TORCH_OPS.get(name)
    if op is None:
        op = _TORCH_OPS[name] = getattr(torch.ops.vitkernels, name)
    return op


# ----------------------------------------------------------------------------- autocast


def autocast_inputs(*tensors):
    """The op's inputs as `torch.autocast` hands them to F.scaled_dot_product_attention and F.linear.

    Inside an autocast region of the inputs' device type, every floating input except float64
    (weights, biases, bias tables and temperatures included) is cast to the autocast dtype; other
    inputs (None, boolean masks) pass unchanged. Outside autocast the inputs are returned as given,
    so mixed dtypes still reach the clear error of `check_same`. The public ops call this first, in
    their CompositeImplicitAutograd body, above autograd: the casts are recorded, so each input's
    gradient comes back in that input's own dtype (float32 parameters get float32 grads), and
    torch.compile / torch.export trace them as ordinary casts.
    """
    if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
        return tensors  # the common case, on every call: no autocast region at all
    ref = next((t for t in tensors if isinstance(t, Tensor)), None)
    if ref is None:
        return tensors
    device_type = ref.device.type
    if not _autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype)
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type
        else t
        for t in tensors
    )


def _autocast_enabled(device_type: str) -> bool:
    if device_type not in ("cpu", "cuda"):  # meta and others: no autocast region of their own
        return False
    return torch.is_autocast_enabled(device_type)


# ----------------------------------------------------------------------------- reference backward


@contextlib.contextmanager
def _autograd_in_kernel():
    """Autograd recording inside a custom op's kernel. The dispatcher runs a kernel below the autograd
    keys (they are in the thread's excluded set), so ops there record no graph; this re-admits them
    for the block. torch.func.vjp would also work there, but not under a TorchDispatchMode such as
    FlopCounterMode (which excludes functorch's keys too)."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


_AUTOGRAD_KEYS = [
    k
    for name, k in torch._C.DispatchKey.__members__.items()
    if name.startswith("Autograd") or name == "ADInplaceOrView"
]


def reference_vjp(fn: Callable, args: Sequence, diff: Sequence[int], grads: Sequence[Optional[Tensor]]) -> list:
    """Gradients of `fn(*args)` w.r.t. args[i] for i in `diff`, given the output gradients.

    Records `fn` with autograd inside the backward op's kernel (_autograd_in_kernel). Returns one entry
    per argument: the gradient for the indices in `diff`, None elsewhere and where the argument is None.
    """
    diff = [i for i in diff if args[i] is not None]
    with _autograd_in_kernel():
        prim = [args[i].detach().requires_grad_() for i in diff]
        full = list(args)
        for i, p in zip(diff, prim):
            full[i] = p
        outs = fn(*full)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [
            (o, g.to(o.dtype))
            for o, g in zip(outs, grads)
            if g is not None and isinstance(o, Tensor) and o.requires_grad
        ]
        got = (
            torch.autograd.grad([o for o, _ in pairs], prim, [g for _, g in pairs], allow_unused=True)
            if pairs
            else [None] * len(prim)
        )
    # A gradient may be a view of another buffer; a custom op's outputs must not alias each other or
    # its inputs, so each gets its own memory. An input no output depends on gets zeros.
    out = {
        i: (torch.zeros_like(p) if g is None else g).clone(memory_format=torch.contiguous_format)
        for i, p, g in zip(diff, prim, got)
    }
    return [out.get(i) for i in range(len(args))]


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


def fresh(t: Tensor) -> Tensor:
    """A contiguous result that cannot alias a custom op's inputs (reshapes of empty tensors can)."""
    t = t.contiguous()
    return t.clone() if t.numel() == 0 else t
