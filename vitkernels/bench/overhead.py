"""`vitkernels-bench overhead`: host time per op call before any kernel runs (issue: batch-1 inference
pays it in every layer).

Each op's kernels are swapped for an allocation-only stand-in (it returns empty tensors of the real
kernel's output shapes), so a call's time is the op layer's own cost: argument checks, autocast,
the public and private ops, the backend choice, the output allocation. Measured on this process's
CPU with `time.perf_counter` over many calls (median of repeats), in plain eager inference
(`torch.no_grad`), with the eager fast path on (default) and off (the dispatcher path every call took
before), next to `F.scaled_dot_product_attention` on tiny tensors and a bare `torch.empty`.
The goal: <= 10 µs per call of the op layer's own cost ("own µs"): mix_ffn's body also runs its two
F.linear (and ReLU) on the tiny sample for real, so their time, measured alone, is taken off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from .. import backends
from .._samples import samples
from ..ops import _common

GOAL_US = 10.0


def _stand_in(real_forward):
    """A kernel forward that runs `real_forward` once, then only allocates outputs of its shapes
    (the benchmark calls each op with the same arguments every time).

    Each output is one `torch.empty(shape, dtype=, device=)` from its (shape as a tuple of ints,
    dtype, device), noted on the first call, as a kernel allocates its outputs: reading them off the
    first outputs on every call (torch.Size arguments parse slower than int tuples) cost ~0.6 µs
    per output that no kernel pays."""
    made = None

    def forward(*args, **kwargs):
        nonlocal made
        if made is None:
            out = real_forward(*args, **kwargs)
            outs = (out,) if isinstance(out, torch.Tensor) else out
            made = (isinstance(out, torch.Tensor), [(tuple(o.shape), o.dtype, o.device) for o in outs])
        single, specs = made
        if single:
            shape, dtype, device = specs[0]
            return torch.empty(shape, dtype=dtype, device=device)
        return tuple([torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in specs])

    return forward


@contextlib.contextmanager
def allocation_only(op: str, args: tuple):
    """Every kernel of `op` (and of its parts, for a composite) runs for real on its first call,
    then allocates only."""
    parts = backends.COMPOSITES.get(op)
    names = [op] + ([] if parts is None else [part for part, _ in parts(*backends.complete_args(op, args, {})[0])])
    swapped = {}
    try:
        for name in names:
            for backend, k in backends.kernels(name).items():
                swapped[(name, backend)] = k
                backends._KERNELS[name][backend] = dataclasses.replace(k, forward=_stand_in(k.forward))
        yield
    finally:
        for (name, backend), k in swapped.items():
            backends._KERNELS[name][backend] = k


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `calls` calls, in µs (after a warm-up)."""
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


@contextlib.contextmanager
def fast_path(enabled: bool):
    old = _common.EAGER_FAST_PATH
    _common.EAGER_FAST_PATH = enabled
    try:
        yield
    finally:
        _common.EAGER_FAST_PATH = old


def _torch_work(name: str, args: tuple):
    """The torch compute an op's body runs for real under `allocation_only` (not the op layer's cost),
    as a callable to time alone, or None."""
    if name != "mix_ffn":
        return None
    x, _hw, w1, b1, _dw, _db, w2, b2 = args[:8]
    relu = len(args) > 8 and bool(args[8])

    def work():
        y = F.linear(x, w1, b1)
        if relu:
            y = F.relu(y)
        return F.linear(y, w2, b2)  # fc2 on the dwconv output, of fc1's shape

    return work


def run(ops=None, calls: int = 2000, repeats: int = 5) -> list:
    """One record per op (and per baseline): µs per call with the fast path on and off."""
    import vitkernels as vk

    records = []
    q = torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        sdpa = per_call_us(lambda: F.scaled_dot_product_attention(q, q, q), calls, repeats)
        empty = per_call_us(lambda: torch.empty(1, 9, 16), calls, repeats)
    records.append({"op": "F.scaled_dot_product_attention", "fast_us": sdpa, "dispatcher_us": sdpa})
    records.append({"op": "torch.empty", "fast_us": empty, "dispatcher_us": empty})
    for name, args in samples(batch=1).items():
        if ops and name not in ops:
            continue
        fn = getattr(vk, name)
        with torch.no_grad(), allocation_only(name, args):
            with fast_path(True):
                fast = per_call_us(lambda fn=fn, args=args: fn(*args), calls, repeats)
            with fast_path(False):
                slow = per_call_us(lambda fn=fn, args=args: fn(*args), calls, repeats)
        work = _torch_work(name, args)
        with torch.no_grad():
            torch_us = per_call_us(work, calls, repeats) if work is not None else 0.0
        records.append({"op": name, "fast_us": fast, "dispatcher_us": slow, "own_us": max(0.0, fast - torch_us)})
    return records


def format_table(records: list) -> str:
    lines = [f"{'op':34s} {'fast path µs':>13s} {'dispatcher µs':>14s} {'own µs':>8s}  goal <= {GOAL_US:g} µs (own)"]
    for r in records:
        own = r.get("own_us", r["fast_us"])
        mark = "" if r["op"].startswith(("F.", "torch.")) else ("  ok" if own <= GOAL_US else "  over")
        lines.append(f"{r['op']:34s} {r['fast_us']:13.2f} {r['dispatcher_us']:14.2f} {own:8.2f}{mark}")
    return "\n".join(lines)
