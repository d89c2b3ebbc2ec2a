"""Helpers shared by the op files: the eager fast path, autocast, reference backward (the argument checks
are in _checks.py)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import backends as _backends

# Backend capabilities are declared per kernel (backends.Capabilities) and checked by one function
# (backends.standard_reasons); these two helpers stay importable from here.
from ..backends import ext_op_reasons, int32_reasons  # noqa: F401

_any_autocast = _backends.any_autocast
NOT_TENSORS = _backends.NOT_TENSORS

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
# Set (per thread) while a composite body runs on the fast path: its private op calls, on tensors
# derived from arguments that passed `plain_eager`, skip the second check.
_in_fast_body = threading.local()
_PRIVATE_IMPLS: dict = {}
_TORCH_OPS: dict = {}  # name -> torch.ops.vitkernels.<name>, looked up once


def private_op(qualname: str, schema: Optional[str] = None):
    """`torch.library.custom_op(qualname, mutates_args=(), schema=schema)` that also keeps the undecorated
    function, for `call_private` on the eager fast path (forward private ops)."""

    def register(fn):
        op = torch.library.custom_op(qualname, mutates_args=(), schema=schema)(fn)
        _PRIVATE_IMPLS[qualname.split("::")[-1]] = fn
        return op

    return register


def plain_eager(*args) -> bool:
    """True when calling the kernels directly is indistinguishable from the dispatcher path (see above)."""
    return _plain_eager(args)


# The state queries of `_plain_eager`, bound once (it runs on every op call: host time).
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_profiler = torch.autograd.profiler  # its _is_profiler_enabled flag is read on each call
_grad_enabled = torch.is_grad_enabled
_Parameter = torch.nn.Parameter


def _plain_eager(args: tuple) -> bool:
    if (
        not EAGER_FAST_PATH
        or _is_compiling()
        or _tracing_state() is not None
        or _torch_function_mode()
        or _dispatch_stack_len() > 0
        or _functorch_stack() is not None
        or _profiler._is_profiler_enabled
    ):
        return False
    grad = _grad_enabled()
    for a in args:
        t = type(a)
        if t is Tensor or t is _Parameter:
            if grad and a.requires_grad:
                return False
        elif t not in NOT_TENSORS and isinstance(a, Tensor):  # a tensor subclass (NOT_TENSORS: backends.py)
            return False
    return True


def call_private(name: str, *args):
    """torch.ops.vitkernels.<name>(*args), or its Python implementation on the eager fast path."""
    if getattr(_in_fast_body, "on", False) or _plain_eager(args):
        return _PRIVATE_IMPLS[name](*args)
    return _torch_op(name)(*args)


def call_public(name: str, body: Callable, *args):
    """torch.ops.vitkernels.<name>(*args), or its composite `body` on the eager fast path."""
    if _plain_eager(args):
        was = getattr(_in_fast_body, "on", False)
        _in_fast_body.on = True
        try:
            return body(*args)
        finally:
            _in_fast_body.on = was
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
    if not _any_autocast():
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
