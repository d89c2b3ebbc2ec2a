"""Launch-side helpers shared by the Triton kernel files (vitkernels/triton/<op>.py).

One home for what every launcher repeats: autotune configs and the per-dtype-family tables of tuned
kernels, the interpreter flag and the fixed-config choice, unit-stride and dtype checks, stride
arguments, tile sizes, matmul precision, the device context, the SM count, the occupancy of a compiled
kernel (programs resident per SM, for the persistent grids) and the base-2 softmax constants.

A kernel file imports ``use_fixed``, ``sm_count`` and ``occupancy`` into its own namespace and calls
them from there: tests replace ``<module>.use_fixed`` / ``<module>.sm_count`` / ``<module>.occupancy``
to drive the autotuned GPU path in the interpreter (tests/triton/test_triton_configs.py,
tests/triton/test_triton_grid.py, tests/triton/triton_sm90.py).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton

from .. import _env

# Softmax in base 2: scores are scaled by log2(e) once so kernels use exp2; lse is stored as ln.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Autotune config families: one config list for 16-bit inputs (tensor-core tiles), one for fp32.
FAMILIES = ("half", "fp32")
# Under the interpreter every kernel runs with a fixed config: these warps and stages.
INTERPRET_LAUNCH = {"num_warps": 4, "num_stages": 1}


# --------------------------------------------------------------------------------------- configs


def configs(keys: Sequence[str], shapes, num_stages: int | None = None) -> list:
    """``triton.Config`` list from tuples ``(*blocks, num_warps[, num_stages][, maxnreg])``: the
    first ``len(keys)`` values are the block sizes named by ``keys``. With ``num_stages`` given the
    tuples leave it out: ``(*blocks, num_warps[, maxnreg])``."""
    out = []
    for shape in shapes:
        blocks, rest = shape[: len(keys)], list(shape[len(keys) :])
        warps = rest.pop(0)
        stages = rest.pop(0) if num_stages is None else num_stages
        maxnreg = rest.pop(0) if rest else None
        if rest:
            raise ValueError(f"config {shape} has more values than {tuple(keys)} + warps, stages, maxnreg")
        out.append(
            triton.Config(dict(zip(keys, blocks, strict=True)), num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        )
    return out


def autotuned(kernel, configs: list, key: Sequence[str], prune: Callable | None = None, **options):
    """``triton.autotune(configs, key=key, **options)(kernel)``; ``prune`` is the early config pruner
    ``prune(configs, named_args, **kwargs) -> configs``."""
    if prune is not None:
        options["prune_configs_by"] = {"early_config_prune": prune}
    return triton.autotune(configs, key=list(key), **options)(kernel)


class PerFamily(dict):
    """An autotune option whose value depends on the config family: ``PerFamily(half=..., fp32=...)``."""


def tuned_table(configs: dict, tuners: Sequence[tuple]) -> dict:
    """A launcher's autotuned kernels, ``{family: (tuned_0, tuned_1, ...)}``.

    ``tuners[i] = (kernel, options)``; ``tuned_i`` of a family is ``autotuned(kernel,
    configs[family][i], **options)``, an option given as ``PerFamily(...)`` taking that family's
    value. Launchers pick ``table[family(dtype)][i]`` (see ``pick``)."""
    return {
        fam: tuple(
            autotuned(
                kernel, configs[fam][i], **{k: (v[fam] if isinstance(v, PerFamily) else v) for k, v in options.items()}
            )
            for i, (kernel, options) in enumerate(tuners)
        )
        for fam in FAMILIES
    }


def family(dtype) -> str:
    """Autotune config family of a dtype."""
    return "fp32" if dtype == torch.float32 else "half"


def pick(fixed: bool, fixed_kernel, table: dict, dtype, index: int):
    """The kernel a launch runs: ``fixed_kernel`` (the interpreter's fixed config, launched with
    explicit blocks and ``INTERPRET_LAUNCH``) or entry ``index`` of the tuned table for ``dtype``."""
    return fixed_kernel if fixed else table[family(dtype)][index]


def fixed_meta(fixed: bool, **blocks) -> dict:
    """Launch options of the interpreter's fixed config (its ``blocks`` and ``INTERPRET_LAUNCH``);
    ``{}`` for a tuned launch, whose tuner supplies them."""
    return {**blocks, **INTERPRET_LAUNCH} if fixed else {}


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the launchers' host arithmetic (``triton.cdiv`` is a ConstexprFunction: ~1.5 µs
    per host call, several per launch)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` (the smallest power of two ≥ n; 0 for 0) in plain Python: the
    Triton one is a ConstexprFunction, ~1.5 µs per host call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Tile extent covering ``n``: the next power of two, at least ``floor`` (tl.dot wants >= 16)."""
    return max(floor, next_pow2(n))


# ------------------------------------------------------------------------ interpreter, device


def is_interpreted(kernel) -> bool:
    """triton.jit decides at decoration (import) time whether a kernel runs in the interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_fixed(t: torch.Tensor, interpreted: bool, what: str) -> bool:
    """True -> interpreter path with a fixed small config; False -> autotuned GPU path."""
    if interpreted:
        return True
    if t.device.type != "cuda":
        raise RuntimeError(
            f"vitkernels triton {what}: tensors are on {t.device}, but Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is first imported)"
        )
    return False


def device_ctx(t: torch.Tensor):
    """Launches go to ``t``'s device (Triton launches on the current device's current stream)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------- occupancy, persistent grids


class SMLimits(NamedTuple):
    """What one streaming multiprocessor holds, as the CUDA occupancy calculator counts it."""

    sms: int  # multiprocessors of the device
    regs: int = 65536  # 32-bit registers per SM
    threads: int = 2048  # resident threads per SM
    shared: int = 233472  # shared memory per SM in bytes (228 KiB on sm_90)
    ctas: int = 32  # resident CTAs per SM (sm_80 / sm_90)
    reserved_shared: int = 1024  # shared memory the driver reserves per CTA (sm_80 on)
    reg_unit: int = 256  # registers are allocated per warp in units of this many


H100 = SMLimits(sms=132)  # H100 SXM (H200: the same SM)

# Resident CTAs per SM by compute capability where it is not 32 (CUDA programming guide, table 21).
_MAX_CTAS = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24, (12, 0): 24}


def resident_programs(n_regs: int, shared_bytes: int, num_warps: int, limits: SMLimits) -> int:
    """CTAs (programs) of one kernel resident per SM: the least of what its registers, its threads,
    its shared memory and the CTA cap allow; 0 when one CTA does not fit. Registers are allocated
    per warp, ``n_regs``·32 rounded up to ``reg_unit``: 255 registers × 4 warps → 2 CTAs on an
    H100, 168 × 4 → 3, 128 × 4 → 4."""
    warps = max(1, int(num_warps))
    fits = [limits.ctas, limits.threads // (32 * warps)]
    if n_regs > 0:
        per_warp = -(-int(n_regs) * 32 // limits.reg_unit) * limits.reg_unit
        fits.append((limits.regs // per_warp) // warps)
    fits.append(limits.shared // (max(0, int(shared_bytes)) + limits.reserved_shared))
    return max(0, min(fits))


@functools.cache
def _sm_limits(index: int) -> SMLimits:
    p = torch.cuda.get_device_properties(index)
    ctas = _MAX_CTAS.get((p.major, p.minor), 32 if p.major >= 8 else 16)
    return SMLimits(
        sms=p.multi_processor_count,
        regs=getattr(p, "regs_per_multiprocessor", SMLimits._field_defaults["regs"]),
        threads=getattr(p, "max_threads_per_multi_processor", SMLimits._field_defaults["threads"]),
        shared=getattr(p, "shared_memory_per_multiprocessor", SMLimits._field_defaults["shared"]),
        ctas=ctas,
        reserved_shared=1024 if p.major >= 8 else 0,
    )


def sm_limits(device: torch.device) -> SMLimits:
    """The SM limits of a CUDA device (cached)."""
    return _sm_limits(device.index if device.index is not None else torch.cuda.current_device())


GRID_MODES = ("auto", "fixed")


def _grid_mode(value: str) -> str:
    mode = value.lower()
    if mode not in GRID_MODES:
        raise ValueError(f"VITKERNELS_GRID={mode!r} is not one of {', '.join(GRID_MODES)}")
    return mode


def grid_mode() -> str:
    """VITKERNELS_GRID: "auto" sizes the persistent grids (window, sr, xca) from the compiled
    kernel's occupancy, "fixed" from the programs per SM each launcher assumed before (read on every
    launch)."""
    return _env.checked("VITKERNELS_GRID", _grid_mode)


class KernelInfo(NamedTuple):
    """What occupancy needs from a compiled kernel."""

    n_regs: int
    shared: int
    num_warps: int


def kernel_info(compiled) -> KernelInfo | None:
    """(registers per thread, static shared memory, warps) of a ``CompiledKernel``, or None when
    they cannot be read (no kernel, or its registers unknown until it is loaded on a GPU)."""
    if compiled is None:
        return None
    try:
        n_regs = getattr(compiled, "n_regs", None)
        if not n_regs:
            compiled._init_handles()  # loads the cubin: ptxas' register count comes with it
            n_regs = getattr(compiled, "n_regs", None)
        meta = compiled.metadata
        if not n_regs:
            return None
        return KernelInfo(int(n_regs), int(meta.shared), int(meta.num_warps))
    except Exception:  # a driver without the attribute, a kernel that does not load: the fallback
        return None


def _call_key(args: Sequence) -> tuple:
    """What Triton specialises a launch on, exactly: a tensor's dtype and 16-byte alignment, a float's
    type (floats are not specialised), any other value itself (ints whole: heuristics and pruners
    read their values).

    On every launch without a launcher ``signature``, so kept cheap: the arguments' types (one C-level
    pass) select a cached layout, which picks the tensors and the other values out with
    ``operator.itemgetter``; the layout (one object per types tuple) is part of the key: that is where
    floats count. The alignment is one flag when every tensor is aligned, else one flag per tensor."""
    types = tuple(map(type, args))
    layout = _LAYOUTS.get(types)
    if layout is None:
        layout = _LAYOUTS[types] = _layout(types)
    pick_tensors, pick_values = layout
    tensors = pick_tensors(args)
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    aligned = ptrs % 16 == 0 or tuple([t.data_ptr() % 16 == 0 for t in tensors])
    return (layout, tuple(map(_DTYPE, tensors)), aligned, pick_values(args))  # (one layout per types tuple)


_LAYOUTS: dict = {}  # the types of a launch's arguments -> (pick its tensors, pick its other non-float values)
_DTYPE = operator.attrgetter("dtype")


def _layout(types: tuple) -> tuple:
    tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
    values = [i for i, t in enumerate(types) if not issubclass(t, torch.Tensor) and t is not float]
    return _picker(tensors), _picker(values)


def _picker(positions: list) -> Callable:
    """args -> the tuple of args[i] for i in positions."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if positions:
        i = positions[0]
        return lambda args: (args[i],)
    return lambda args: ()


def signature(tensors: Sequence, *values) -> tuple:
    """A launcher's summary of a launch for ``occupancy`` (cheaper than reading every argument):
    ``tensors``, every tensor it passes that is not a fresh allocation of a fixed dtype (their dtypes,
    16-byte alignment and strides), and ``values``, hashables that fix every other non-float argument
    and the launcher's choices (sizes, rows per program). Two launches with equal signatures (and
    equal constexprs) must compile alike: equal ``_call_key`` of their arguments."""
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    aligned = ptrs % 16 == 0 or tuple([t.data_ptr() % 16 == 0 for t in tensors])
    return ("signature", tuple(map(_DTYPE, tensors)), aligned, tuple([t.stride() for t in tensors]), values)


def reference_config(tuned, args: Sequence, kwargs: dict):
    """The first config ``tuned``'s pruner keeps for this call: the one whose occupancy sizes the
    grid of every config of the key (``occupancy``)."""
    tuned.nargs = dict(zip(tuned.arg_names, args))
    try:
        return tuned.prune_configs(kwargs)[0]
    finally:
        tuned.nargs = None


def _innermost(kernel):
    """The JIT (or interpreted) function under an autotuner / heuristics wrapper."""
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel


_OCCUPANCY: dict = {}
_UNKNOWN = object()  # not in _OCCUPANCY yet (None, an unknown occupancy, is cached too)


def occupancy(
    tuned, args: Sequence | Callable[[], Sequence], kwargs: dict, device: torch.device, signature: tuple | None = None
) -> int | None:
    """Programs per SM that ``tuned`` (an autotuned kernel of ``tuned_table``) keeps resident at a
    call with positional ``args`` and constexpr ``kwargs``, or None when unknown (interpreter,
    VITKERNELS_GRID=fixed, a kernel whose registers cannot be read): the caller then keeps its old
    assumption.

    Decided once per call signature (argument values and dtypes: what selects the tuner's key and
    Triton's specialisation) before the first launch and cached, so a given call always gets the
    same grid and its per-program partial sums add up in the same order. The grid cannot follow
    the config the tuner picks: that happens inside the launch, after the partials are allocated;
    so it follows the key's reference config (``reference_config``, the first one its pruner
    keeps), compiled here by ``warmup`` (the tuner compiles it anyway), and the tuner then times
    every config on that grid.

    The call signature is ``_call_key(args)`` (a pass over the arguments), or the launcher's
    ``signature`` (see ``signature``: the few things its arguments are built from). ``args`` may be a
    function that builds them: it is then called only when the occupancy is not cached yet (or no
    ``signature`` is given)."""
    if grid_mode() == "fixed":
        return None
    if signature is None:
        if callable(args):
            args = args()
        signature = _call_key(args)
    key = (id(tuned), device.index, signature, tuple(kwargs.items()))  # launchers pass kwargs in a fixed order
    resident = _OCCUPANCY.get(key, _UNKNOWN)
    if resident is not _UNKNOWN:
        return resident
    if callable(args):
        args = args()
    resident = None
    try:
        if not is_interpreted(_innermost(tuned)):
            config = reference_config(tuned, args, kwargs)
            info = kernel_info(tuned.fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs()))
            if info is not None:
                resident = max(1, resident_programs(*info, sm_limits(device)))
    except Exception as e:  # occupancy only sizes the grid: never fail a launch over it
        name = getattr(_innermost(tuned), "__name__", tuned)
        warnings.warn(f"vitkernels: no occupancy for {name} ({e}); the grid keeps its old assumption", stacklevel=3)
    _OCCUPANCY[key] = resident
    return resident


def one_wave_split(units: int, lanes: int, slots: int) -> int:
    """Work units per program for a persistent grid: ``units`` spread over ``lanes`` independent
    rows of programs (heads, b·heads) so that all programs fit in ``slots`` resident programs:
    ⌈units / max(1, ⌊slots / lanes⌋)⌉, each program of a lane taking that many consecutive units."""
    return -(-int(units) // max(1, int(slots) // max(1, int(lanes))))


# ------------------------------------------------------------------------------ tensor checks


def is_unit_last(t: torch.Tensor) -> bool:
    """The kernels address the last dim with stride 1 (a size-1 last dim is never stepped)."""
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its last dim is strided."""
    return t if is_unit_last(t) else t.contiguous()


def strides(*tensors: torch.Tensor, dims: int = 2) -> tuple:
    """The first ``dims`` strides of each tensor, in order: a kernel's stride arguments (token layouts (B, N,
    ·) take 2, head views (B, H, N, D) 3)."""
    return tuple(t.stride(i) for t in tensors for i in range(dims))


def head_dims(t: torch.Tensor) -> tuple:
    """(B, G, H) of a (B, H, N, D) or (B, G, H, N, D) head view; G = 1 for 4-D views."""
    return tuple(t.shape[:3]) if t.dim() == 5 else (t.shape[0], 1, t.shape[1])


def head_strides(t: torch.Tensor) -> tuple:
    """(batch, group, head, row) strides of a head view as ``head_dims`` reads it; the group stride
    is 0 for a 4-D view."""
    return tuple(t.stride()[:4]) if t.dim() == 5 else (t.stride(0), 0, t.stride(1), t.stride(2))


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


# ---------------------------------------------------------------------------- matmul precision


def fp32_precision() -> str:
    """'tf32' only if the user allowed TF32 for fp32 matmuls in PyTorch, else exact 'ieee'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixing the legacy and new TF32 APIs warns
        p = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
        if p in ("tf32", "ieee"):
            return p
        try:
            return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        except (AttributeError, RuntimeError):
            return "ieee"


def precision(dtype) -> str:
    """tl.dot input_precision: it only affects fp32 operands; fp16/bf16 always use tensor cores
    (and fp32 copies of 16-bit values are exact in tf32)."""
    return fp32_precision() if dtype == torch.float32 else "tf32"
