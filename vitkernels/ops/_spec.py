"""One spec per op: what the package knows about an op, in one object defined next to it.

Each `ops/<op>.py` starts with `SPEC = define(OpSpec(...))`, before it registers anything else:
`define` defines the public schema in the torch library (ops/_library.py), declares the op to the
dispatcher (how its arguments read as `backends.KernelInputs`, or the parts of a composite) and adds
the spec to the registry. The op file then registers its kernels with their declared
`backends.Capabilities` (`backends.register_kernel`).

Everything that lists ops iterates over `specs()` (ordered by SPEC.md's op number): `__all__` of
`vitkernels` and `vitkernels.ops`, `vitkernels._samples` (the sample arguments of the API tests,
`vitkernels.info` and the self-check), the bench cases and baselines (`vitkernels.bench`), and the
tests that run every op (tests/ops/test_ops_api.py, test_errors.py, test_triton_configs.py, and the
offline sm_90a compile tests/triton/triton_sm90.py). CONTRIBUTING.md ("Adding an op") lists what else a
new op touches.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .. import backends
from ._library import define as _define_schema


@dataclass(frozen=True)
class BenchSpec:
    """Where `vitkernels-bench ops` finds the op ("module:function" pointers, resolved on use so
    that importing the ops never imports the bench)."""

    cases: str  # fn(add): adds the op's catalogue entries, built by its case factory (shapes
    #                             from the real models; the factory holds the op's FLOP count, and
    #                             Case.bytes_for the byte model) — vitkernels/bench/cases.py
    baseline: str  # fn(case, *, core, core_name, dtype, device) -> the eager composition (timm's
    #                             code path) with attention core "eager", "sdpa" or "flex" — bench/baselines.py
    sdpa: bool = True  # the composition has a softmax-attention core SDPA / FlexAttention can run
    no_flex: Optional[str] = None  # why FlexAttention cannot run it although SDPA can
    composite_label: Optional[str] = None  # a composite: how results name what it runs ("linear+dwconv")


@dataclass(frozen=True)
class OpSpec:
    """An op's spec. Sample builders get a `vitkernels._samples.Sampler` `s`: `s(*shape)` draws a
    seeded tensor, `s.b`, `s.heads`, `s.d`, `s.c` are the sample sizes."""

    number: int  # its number in SPEC.md: orders every listing
    name: str  # torch.ops.vitkernels.<name>, vitkernels.<name>, ops/<name>.py
    schema: str  # torch.library schema of the public op
    samples: Callable  # s -> positional arguments of the public op (the main path, SPEC order)
    variants: Mapping[str, Callable] = field(default_factory=dict)  # label -> s -> arguments with options on
    private: Optional[Callable] = None  # (public args, resolved scale) -> arguments of _<name>_fwd; None: none
    inputs: Optional[Callable] = None  # the arguments `backends.select` gets -> backends.KernelInputs
    parts: Optional[Callable] = None  # a composite: public args -> [(part op, part args)] it runs
    batched: tuple = (0,)  # positions of the arguments with a batch dim (the empty-batch test)
    triton_modules: tuple = ()  # vitkernels.triton modules its Triton kernels launch from
    inductor: bool = False  # tests/ops/test_ops_api.py also compiles it with inductor (CPU time: a few ops)
    bench: Optional[BenchSpec] = None

    def kernels(self) -> dict:
        """Its registered backend kernels (with their declared capabilities), by backend."""
        return backends.kernels(self.name)


_SPECS: dict[str, OpSpec] = {}


def define(spec: OpSpec) -> OpSpec:
    """Register `spec`: its schema in the torch library, its inputs / parts with the dispatcher."""
    if spec.name in _SPECS or any(s.number == spec.number for s in _SPECS.values()):
        raise ValueError(f"op {spec.name!r} (number {spec.number}) is defined twice")
    if (spec.private is None) == (spec.parts is None):
        raise ValueError(f"{spec.name}: a spec has either a private forward (`private`) or `parts` (a composite)")
    if spec.private is not None and spec.inputs is None:
        raise ValueError(f"{spec.name}: `inputs` is needed to check its kernels' capabilities")
    _define_schema(spec.name, spec.schema)
    backends.register_op(spec.name, inputs=spec.inputs, parts=spec.parts)
    _SPECS[spec.name] = spec
    return spec


def specs() -> list:
    """Every op's spec, in SPEC.md order."""
    return sorted(_SPECS.values(), key=lambda s: s.number)


def names() -> list:
    return [s.name for s in specs()]


def get(name: str) -> OpSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops: {names()}") from None


def resolve(pointer: str) -> Callable:
    """The function a "package.module:function" pointer names."""
    module, _, attr = pointer.partition(":")
    return getattr(importlib.import_module(module), attr)
