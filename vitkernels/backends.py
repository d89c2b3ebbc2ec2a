"""Backend selection: which implementation ("triton", "cuda", "reference") runs each op.

Every op registers one `Kernel` per backend that implements it, with its `Capabilities` declared as
data: the devices and dtypes it takes, the head dims it is built for, the compute capability it
needs, whether it has a backward, the extension op it calls. One generic function,
`standard_reasons`, turns a declaration and the call's `KernelInputs` (the tensors, head dim and
index sizes the op's spec reads off its arguments, `register_op`) into human-readable reasons why
the kernel cannot run; only op-specific limits (window size, kernel size, what fits in shared
memory: the `check` of a registration) stay code. Then

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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import torch

from . import _env

BACKENDS = ("triton", "cuda", "reference")
_CHOICES = ("auto",) + BACKENDS
_BACKEND_NAMES = {"triton": "Triton", "cuda": "CUDA", "reference": "reference"}

# "auto" order on CUDA tensors, per op. Ops missing here use the default order.
_DEFAULT_PRIORITY = ("triton", "cuda", "reference")
PRIORITY: dict[str, tuple[str, ...]] = {}

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
SM80 = (8, 0)  # Ampere: cp.async, mma.sync bf16 (the CUDA C++ kernels' floor)
INT32_MAX = 2**31 - 1


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run an op on the given arguments."""


# ----------------------------------------------------------------------------- declared capabilities


@dataclass(frozen=True)
class Capabilities:
    """What one backend kernel can run, as data. `standard_reasons` checks a call against it.

    The Triton interpreter (TRITON_INTERPRET=1) and the vkemu emulator (VITKERNELS_CUDA_EMULATOR) run
    "cuda"-device kernels on CPU tensors: that is a property of the backend, not of the kernel.
    """

    kernel: str  # how reasons name it: "CUDA xca kernel"
    backward: bool = False  # it implements the backward too
    devices: Optional[tuple[str, ...]] = ("cuda",)  # device types of its tensors (None: any)
    dtypes: Optional[tuple[torch.dtype, ...]] = HALF_AND_FLOAT  # of its floating inputs (None: any)
    head_dims: Optional[range] = None  # e.g. range(8, 129, 8) (None: any)
    head_dim_note: str = ""  # why that range, appended to its reason
    min_capability: Optional[tuple[int, int]] = None  # CUDA compute capability of its tensors' device
    int32: bool = False  # indexes with 32-bit ints: KernelInputs.sizes must fit
    ext_op: Optional[str] = None  # the torch.ops.vitkernels_C op it calls ("cuda")

    def describe(self) -> str:
        """One line for docs and tooling: "fwd + bwd, head dim 1..128"."""
        parts = ["fwd + bwd" if self.backward else "fwd only"]
        if self.head_dims is not None:
            r = self.head_dims
            parts.append(f"head dim {r[0]}..{r[-1]}" + (f" step {r.step}" if r.step > 1 else ""))
        if self.min_capability is not None:
            parts.append(f"sm_{self.min_capability[0]}{self.min_capability[1]}+")
        return ", ".join(parts)


# The reference math runs everything: any device, any float dtype (float64 included), forward and backward.
REFERENCE = Capabilities("reference math", backward=True, devices=None, dtypes=None)


@dataclass(frozen=True)
class KernelInputs:
    """What the declared capabilities are checked against, read off a call's arguments by the op's
    spec (`OpSpec.inputs`): its tensors (None entries allowed), its head dim, and the sizes a
    kernel indexing with 32-bit ints must keep below 2^31 (by name, for the reason)."""

    tensors: tuple
    head_dim: Optional[int] = None
    sizes: Mapping[str, int] = field(default_factory=dict)


@functools.cache
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_interpreting() -> bool:
    return _env.enabled("TRITON_INTERPRET")


def cuda_emulated() -> bool:
    """Whether the "cuda" backend is the vkemu CPU build (VITKERNELS_CUDA_EMULATOR, see _ext)."""
    return bool(_env.get("VITKERNELS_CUDA_EMULATOR"))


def ext_op_reasons(name: str) -> list:
    """[] when the loaded CUDA extension registers torch.ops.vitkernels_C.<name>; else why not (an
    extension built from older sources lacks the newer ops)."""
    try:
        getattr(torch.ops.vitkernels_C, name)
    except Exception:  # AttributeError / RuntimeError depending on the torch version
        return [f"the loaded CUDA extension has no {name} (built from older sources; rebuild it)"]
    return []


def ext_op_args(name: str) -> Optional[set]:
    """The argument names of torch.ops.vitkernels_C.<name>'s schema, or None when the loaded extension
    has no such op (an extension built from older sources may lack an op or its newer arguments)."""
    try:
        return {a.name for a in getattr(torch.ops.vitkernels_C, name).default._schema.arguments}
    except Exception:  # AttributeError / RuntimeError depending on the torch version
        return None


CUDA_KERNEL_VERSIONS = {"auto": 0, "v1": 1}  # a VITKERNELS_*_CUDA_KERNEL value -> the C++ op's `version`


def cuda_kernel_version(flag: str) -> int:
    """The C++ op's `version` argument from the switch ``flag``: "auto" -> 0 (the newest kernels),
    "v1" -> 1 (the first ones); anything else raises."""
    value = _env.get(flag)
    if value not in CUDA_KERNEL_VERSIONS:
        raise ValueError(f"{flag}={value!r}: expected one of {', '.join(CUDA_KERNEL_VERSIONS)}")
    return CUDA_KERNEL_VERSIONS[value]


def int32_reasons(**sizes: int) -> list:
    """The CUDA kernels index with 32-bit ints: one reason per size past INT_MAX."""
    return [f"{name} = {v} exceeds the CUDA kernel's 32-bit limit" for name, v in sizes.items() if v > INT32_MAX]


def _off_device(caps: Capabilities, ts: list) -> bool:
    # Loops, not any(generator): a kernel's reasons are asked on every call on CUDA tensors ("auto").
    devices = caps.devices
    if devices is None:
        return False
    if devices == ("cuda",):
        for t in ts:
            if not t.is_cuda:
                return True
        return False
    for t in ts:
        if t.device.type not in devices:
            return True
    return False


def _dtype_reasons(caps: Capabilities, ts: list) -> list:
    dtypes = caps.dtypes
    if dtypes is None:
        return []
    for t in ts:
        if t.dtype not in dtypes and t.is_floating_point():
            break
    else:
        return []  # the common case, in one pass
    bad = sorted({t.dtype for t in ts if t.is_floating_point() and t.dtype not in caps.dtypes}, key=str)
    return [
        "float64 runs on the reference backend only"
        if d == torch.float64
        else f"{str(d).replace('torch.', '')} is not supported by the {caps.kernel}"
        for d in bad
    ]


def _capability_reasons(backend: str, caps: Capabilities, ts: list) -> list:
    need = caps.min_capability
    if need is None or not any(t.is_cuda and torch.cuda.get_device_capability(t.device) < need for t in ts):
        return []
    return [
        f"the {_BACKEND_NAMES[backend]} kernels need compute capability {need[0]}.{need[1]} "
        f"(sm_{need[0]}{need[1]}) or newer"
    ]


def _head_dim_reasons(caps: Capabilities, d: Optional[int]) -> list:
    r = caps.head_dims
    if r is None or d is None or d in r:
        return []
    note = f" ({caps.head_dim_note})" if caps.head_dim_note else ""
    if r.step == 1 and d > r[-1]:
        return [f"head dim {d} > {r[-1]} is not supported by the {caps.kernel}{note}"]
    rule = f"{r[0]} <= D <= {r[-1]}" + (f" and D % {r.step} == 0" if r.step > 1 else "")
    return [f"head dim {d} is not supported by the {caps.kernel} (it needs {rule}){note}"]


def _size_reasons(caps: Capabilities, sizes: Mapping[str, int]) -> list:
    return int32_reasons(**sizes) if caps.int32 else []


def standard_reasons(backend: str, caps: Capabilities, inputs: KernelInputs) -> list:
    """Why a kernel with capabilities `caps` cannot run on `inputs` ([] when it can): the checks
    every kernel shares, from data. Op-specific limits are the registration's `check`.

    * "triton": triton not importable is the only reason then; else every failing check is listed:
      device (off CUDA: the interpreter, which computes bfloat16 dots wrongly), dtypes, compute
      capability, head dim, 32-bit sizes.
    * "cuda": the first failing of device (CUDA tensors; CPU ones under the emulator), dtypes,
      compute capability, the extension (loaded, and with `ext_op`) is the only reason, as each
      later one needs the earlier; then every failing head-dim and 32-bit size check is listed.
    * "reference": none.
    """
    ts = [t for t in inputs.tensors if t is not None]
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return [err]
        why = []
        if _off_device(caps, ts):
            if not triton_interpreting():
                why.append("tensors are on CPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU)")
            elif any(t.dtype == torch.bfloat16 for t in ts):
                why.append("the Triton interpreter computes bfloat16 dots wrongly; use float32/float16 on CPU")
        return (
            why
            + _dtype_reasons(caps, ts)
            + _capability_reasons(backend, caps, ts)
            + _head_dim_reasons(caps, inputs.head_dim)
            + _size_reasons(caps, inputs.sizes)
        )
    if backend == "cuda":
        from . import _ext

        # The emulated kernels run on CPU tensors (like the Triton interpreter), the compiled ones on CUDA.
        emulated = cuda_emulated() and not torch.cuda.is_available()
        if emulated and any(t.device.type != "cpu" for t in ts):
            return ["the emulated cuda backend (VITKERNELS_CUDA_EMULATOR) runs on CPU tensors"]
        if not emulated and _off_device(caps, ts):
            return ["the cuda backend needs CUDA tensors"]
        first = _dtype_reasons(caps, ts) or ([] if emulated else _capability_reasons(backend, caps, ts))
        if first:
            return first[:1]
        if _ext.load_cuda_ext() is None:
            return [f"the CUDA extension is unavailable: {_ext.cuda_ext_unavailable_reason()}"]
        if caps.ext_op is not None and ext_op_reasons(caps.ext_op):
            return ext_op_reasons(caps.ext_op)
        return _head_dim_reasons(caps, inputs.head_dim) + _size_reasons(caps, inputs.sizes)
    return []


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    forward: Callable
    backward: Optional[Callable]
    reasons: Callable[..., list]  # same arguments as `select` gets -> list of human-readable reasons
    caps: Optional[Capabilities] = None


_KERNELS: dict[str, dict[str, Kernel]] = {}
# Per op (from its spec, ops/_spec.py): the call's arguments -> the KernelInputs its kernels' declared
# capabilities are checked against.
_INPUTS: dict[str, Callable[..., KernelInputs]] = {}
# Ops implemented as a composition of other ops: a backend runs them where it runs their parts.
# Each entry maps the composite's arguments to the (part, part arguments) it will call (the op's
# spec `parts`, e.g. ops/mix_ffn.py).
COMPOSITES: dict[str, Callable[..., list]] = {}


def register_op(
    op: str, *, inputs: Optional[Callable[..., KernelInputs]] = None, parts: Optional[Callable[..., list]] = None
) -> None:
    """Declare an op to the dispatcher (ops/_spec.define does it from the op's spec): how its
    arguments read as KernelInputs, or, for a composite, the parts it calls."""
    if inputs is not None:
        _INPUTS[op] = inputs
    if parts is not None:
        COMPOSITES[op] = parts


def _no_reasons(*args, **kwargs) -> list:
    return []


def _reasons_for(op: str, backend: str, caps: Capabilities, check: Optional[Callable[..., list]]) -> Callable:
    """A kernel's `reasons`: the standard ones from its capabilities, then (only when those are
    empty) its op-specific `check`."""
    if backend == "reference" and check is None:
        return _no_reasons
    inputs = _INPUTS.get(op)

    def reasons(*args, **kwargs) -> list:
        why = standard_reasons(backend, caps, inputs(*args, **kwargs)) if inputs is not None else []
        if why or check is None:
            return why
        return list(check(*args, **kwargs))

    return reasons


def register_kernel(
    op: str,
    backend: str,
    *,
    forward: Callable,
    backward: Optional[Callable] = None,
    caps: Optional[Capabilities] = None,
    check: Optional[Callable[..., list]] = None,
) -> None:
    """Register `backend`'s kernel for `op`. `caps` declares what it runs (the reference's default:
    everything; its `backward` must say whether a backward is given); `check(*args)` returns the
    op-specific reasons, if any, and runs only when the standard ones are empty. Arguments of
    `check` and of the op's inputs are those the op's private forward passes to `select`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if caps is None:
        if backend != "reference":
            raise ValueError(f"{op} on {backend}: declare the kernel's capabilities (caps=Capabilities(...))")
        caps = REFERENCE
    if caps.backward != (backward is not None):
        raise ValueError(
            f"{op} on {backend}: the capabilities declare backward={caps.backward}, "
            f"but a backward is {'given' if backward is not None else 'missing'}"
        )
    if backend != "reference" and op not in _INPUTS:
        raise ValueError(f"{op} on {backend}: define the op's spec (its inputs) before registering kernels")
    _KERNELS.setdefault(op, {})[backend] = Kernel(
        op,
        backend,
        without_autocast(forward),
        None if backward is None else without_autocast(backward),
        _reasons_for(op, backend, caps, check),
        caps,
    )


# Whether any autocast region is on: one call (0.09 µs) where is_autocast_enabled("cuda") or
# is_autocast_enabled("cpu") takes 0.3; the common case, no region at all, is decided by it on every
# op call (ops/_common.autocast_inputs, without_autocast).
any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
)


def without_autocast(fn: Callable) -> Callable:
    """`fn` (a backend kernel) run with autocast off: the kernels compute in their inputs' dtypes with
    float32 accumulation, and torch ops inside them (the reference math, small index tensors) must
    not be re-cast by a surrounding autocast region, which stays active inside custom ops."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not any_autocast():
            return fn(*args, **kwargs)
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        with contextlib.ExitStack() as stack:
            for d in active:
                stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*args, **kwargs)

    return run


def ops() -> list[str]:
    return sorted(_KERNELS)


def kernels(op: str) -> dict[str, Kernel]:
    """The registered kernels of `op`, by backend."""
    return dict(_KERNELS.get(op, {}))


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
    return _env.checked("VITKERNELS_BACKEND", _env_backend)  # read on every op call


def _env_backend(value: str) -> str:
    try:
        return _check_name(value)
    except ValueError as e:
        raise ValueError(f"VITKERNELS_BACKEND: {e}") from None


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


def complete_args(op: str, args: tuple, kwargs: dict) -> tuple:
    """args completed from kwargs and the defaults of the public op's schema
    (torch.ops.vitkernels.<op>), so callers may leave optional arguments out as in the op itself."""
    try:
        schema = getattr(torch.ops.vitkernels, op).default._schema
    except (AttributeError, RuntimeError):
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for a in schema.arguments[len(args) :]:
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
    args, kwargs = complete_args(op, args, kwargs)
    return _reasons(op, backend, args, kwargs)


def _reasons(op: str, backend: str, args: tuple, kwargs: dict) -> list:
    """not_supported_reasons for complete arguments (select's path: no schema lookup per call)."""
    if op in COMPOSITES:
        return [
            f"{op} runs {part}: {reason}"
            for part, part_args in COMPOSITES[op](*args, **kwargs)
            for reason in _reasons(part, backend, tuple(part_args), {})
        ]
    kernels = _KERNELS.get(op)
    if kernels is None:
        raise ValueError(f"unknown op {op!r}; ops: {ops()}")
    kernel = kernels.get(backend)
    if kernel is None:
        return [f"the {backend} backend has no kernel for {op} yet"]
    return list(kernel.reasons(*args, **kwargs))


def _on_cuda(args) -> bool:
    for a in args:  # a loop, not any(generator): this runs on every op call
        t = type(a)
        if (t is _Tensor or (t not in NOT_TENSORS and isinstance(a, _Tensor))) and a.is_cuda:
            return True
    return False


_Tensor = torch.Tensor
# Argument types that are never tensors: skipped without isinstance(a, Tensor), which takes ~60 ns
# for a non-tensor (torch.Tensor's metaclass), 3x the type test.
NOT_TENSORS = frozenset({int, float, bool, str, type(None), list, tuple})


def select(op: str, *args, backward: bool = False, **kwargs) -> Kernel:
    """The kernel that runs `op` on these arguments under the current backend choice.

    With `backward=True` the kernel must also implement the backward; a forced backend that has no
    backward for `op` defers to the "auto" choice (so a forward-only CUDA kernel can still be trained
    with), one that cannot run raises.
    """
    kernels = _KERNELS[op]
    choice = _stack[-1] if _stack else _default()  # get_backend(), inline: this runs on every op call
    if choice != "auto" and not (backward and (choice not in kernels or kernels[choice].backward is None)):
        reasons = _reasons(op, choice, args, kwargs)
        if reasons:
            raise BackendUnavailableError(
                f"vitkernels.{op}: backend {choice!r} cannot run these arguments: " + "; ".join(reasons)
            )
        return kernels[choice]
    if _on_cuda(args):
        order = PRIORITY.get(op, _DEFAULT_PRIORITY)
    else:
        kernel = kernels.get("reference")
        if kernel is not None and kernel.reasons is _no_reasons and not (backward and kernel.backward is None):
            return kernel  # the loop below, in short: the reference runs everything off CUDA
        order = ("reference",)
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
