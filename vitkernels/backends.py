"""Backend selection: which implementation ("triton", "cuda", "reference") runs each op.

Every op registers one `Kernel` per backend that implements it. A kernel declares *why* it cannot run
on given arguments (`reasons`), so that

* "auto" picks the first kernel of the op's priority list whose reasons are empty
  (on CPU tensors that is always the reference: fused kernels there only run when forced);
* forcing a backend that cannot run raises one error listing every reason;
* `python -m vitkernels.info` can print, per op, which backends can run here.

The priority lists are decided by GPU measurements (docs/benchmarks.md); until an op has been
measured, its fused kernels are tried in the order below.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("triton", "cuda", "reference")
_CHOICES = ("auto",) + BACKENDS

# "auto" order on CUDA tensors, per op. Ops missing here use the default order.
_DEFAULT_PRIORITY = ("triton", "cuda", "reference")
PRIORITY: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run an op on the given arguments."""


@dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    forward: Callable
    backward: Optional[Callable]
    reasons: Callable[..., list]  # same arguments as forward -> list of human-readable reasons


_KERNELS: dict[str, dict[str, Kernel]] = {}
# Ops implemented as a composition of other ops: a backend runs them where it runs their parts.
# Each entry maps the composite's arguments to the (part, part arguments) it will call; the op
# file that defines the composite registers it (see ops/mix_ffn.py).
COMPOSITES: dict[str, Callable[..., list]] = {}


def register_kernel(op: str, backend: str, *, forward: Callable, backward: Optional[Callable] = None,
                    reasons: Optional[Callable[..., list]] = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _KERNELS.setdefault(op, {})[backend] = Kernel(
        op, backend, without_autocast(forward), None if backward is None else without_autocast(backward),
        reasons or (lambda *a, **k: []))


def without_autocast(fn: Callable) -> Callable:
    """`fn` (a backend kernel) run with autocast off: the kernels compute in their inputs' dtypes with
    float32 accumulation, and torch ops inside them (the reference math, small index tensors) must
    not be re-cast by a surrounding autocast region, which stays active inside custom ops."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for d in active:
                stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*args, **kwargs)
    return run


def ops() -> list[str]:
    return sorted(_KERNELS)


# ----------------------------------------------------------------------------- the current choice

def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name.lower()


# A process-wide stack, not thread-local: autograd runs CUDA backward passes on its own device
# threads, and `with use_backend(...): loss.backward()` must reach the backward kernels there too.
_stack: list = []
_global_default: Optional[str] = None


def _default() -> str:
    if _global_default is not None:
        return _global_default
    env = os.environ.get("VITKERNELS_BACKEND")
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"VITKERNELS_BACKEND: {e}") from None
    return "auto"


def get_backend() -> str:
    """The backend in force: the innermost `use_backend`, else `set_backend`, else $VITKERNELS_BACKEND, else "auto"."""
    return _stack[-1] if _stack else _default()


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "triton", "cuda" or "reference"."""
    global _global_default
    _global_default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside (forward and backward) with backend `name`."""
    _stack.append(_check_name(name))
    try:
        yield
    finally:
        _stack.pop()


# ----------------------------------------------------------------------------- choosing a kernel

def _with_defaults(op: str, args: tuple, kwargs: dict) -> tuple:
    """args completed from kwargs and the defaults of the public op's schema
    (torch.ops.vitkernels.<op>), so callers may leave optional arguments out as in the op itself."""
    try:
        schema = getattr(torch.ops.vitkernels, op).default._schema
    except (AttributeError, RuntimeError):
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for a in schema.arguments[len(args):]:
        if a.name in kwargs:
            args.append(kwargs.pop(a.name))
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            break
    return tuple(args), kwargs


def not_supported_reasons(op: str, backend: str, *args, **kwargs) -> list:
    """Why `backend` cannot run `op` on these arguments ([] when it can). Arguments follow the
    public op (`vitkernels.<op>`); optional ones may be left out."""
    args, kwargs = _with_defaults(op, args, kwargs)
    return _reasons(op, backend, args, kwargs)


def _reasons(op: str, backend: str, args: tuple, kwargs: dict) -> list:
    """not_supported_reasons for complete arguments (select's path: no schema lookup per call)."""
    if op in COMPOSITES:
        return [f"{op} runs {part}: {reason}" for part, part_args in COMPOSITES[op](*args, **kwargs)
                for reason in _reasons(part, backend, tuple(part_args), {})]
    kernels = _KERNELS.get(op)
    if kernels is None:
        raise ValueError(f"unknown op {op!r}; ops: {ops()}")
    kernel = kernels.get(backend)
    if kernel is None:
        return [f"the {backend} backend has no kernel for {op} yet"]
    return list(kernel.reasons(*args, **kwargs))


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def select(op: str, *args, backward: bool = False, **kwargs) -> Kernel:
    """The kernel that runs `op` on these arguments under the current backend choice.

    With `backward=True` the kernel must also implement the backward; a forced backend that has no
    backward for `op` defers to the "auto" choice (so a forward-only CUDA kernel can still be trained
    with), one that cannot run raises.
    """
    kernels = _KERNELS[op]
    choice = get_backend()
    if choice != "auto" and not (backward and (choice not in kernels or kernels[choice].backward is None)):
        reasons = _reasons(op, choice, args, kwargs)
        if reasons:
            raise BackendUnavailableError(
                f"vitkernels.{op}: backend {choice!r} cannot run these arguments: " + "; ".join(reasons))
        return kernels[choice]
    order = PRIORITY.get(op, _DEFAULT_PRIORITY) if _on_cuda(args) else ("reference",)
    why = []
    for name in order:
        kernel = kernels.get(name)
        if kernel is None or (backward and kernel.backward is None):
            continue
        reasons = list(kernel.reasons(*args, **kwargs))
        if not reasons:
            return kernel
        why.append(f"{name}: {'; '.join(reasons)}")
    raise BackendUnavailableError(f"vitkernels.{op}: no backend can run these arguments ({' | '.join(why)})")
