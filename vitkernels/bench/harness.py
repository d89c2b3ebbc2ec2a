"""Timing, peaks and the `ops` loop of `vitkernels-bench`.

Timing (docs/benchmarks.md, "How numbers are taken"):

* CUDA: `triton.testing.do_bench(fn, warmup=..., rep=..., return_mode="median")` — CUDA events around
  each call, the L2 cache cleared before each call, the median of as many calls as fit in `rep` ms
  after `warmup` ms of warm-up. Without triton: CUDA events, the same structure. Before any timing
  each implementation is called twice, so torch.compile, Triton autotuning and cuDNN/cuBLAS
  heuristics happen outside the timed region, and the inputs rotate among several copies (enough
  to exceed twice the L2 cache) so no call finds its inputs cached.
* CPU: `time.perf_counter` around each call, median of `--reps` calls after the warm-up. CPU rows
  are labelled "CPU timing": they run tiny shapes on the reference backend and say nothing about GPUs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import baselines
from .cases import Case, backend_that_runs, make_inputs
from .results import add_speedups

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtypes(values) -> list:
    out = []
    for v in values or []:
        for name in str(v).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
            if DTYPES[name] not in out:
                out.append(DTYPES[name])
    return out


# ----------------------------------------------------------------------------- peaks

# Datasheet peaks, dense (no sparsity): tensor-core TFLOP/s for bf16/fp16, fp32 CUDA-core TFLOP/s
# (no TF32), and HBM bandwidth in GB/s. Matched by substrings of the lower-cased device name, first hit.
PEAKS = (
    (("gh200",), {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "vector": 67.0, "gbps": 4000.0}),
    (("h200",), {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "vector": 67.0, "gbps": 4800.0}),
    (("h100", "pcie"), {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0, "vector": 51.0, "gbps": 2000.0}),
    (("h100", "nvl"), {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0, "vector": 60.0, "gbps": 3900.0}),
    (("h100",), {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "vector": 67.0, "gbps": 3350.0}),
    (("h800",), {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "vector": 67.0, "gbps": 3350.0}),
    (("b200",), {"bfloat16": 2250.0, "float16": 2250.0, "float32": 80.0, "vector": 80.0, "gbps": 8000.0}),
    (("a100", "80gb"), {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5, "vector": 19.5, "gbps": 2039.0}),
    (("a100",), {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5, "vector": 19.5, "gbps": 1555.0}),
    (("l40s",), {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6, "vector": 91.6, "gbps": 864.0}),
    (("a10g",), {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2, "vector": 31.2, "gbps": 600.0}),
    (("l4",), {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3, "vector": 30.3, "gbps": 300.0}),
    (("4090",), {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6, "vector": 82.6, "gbps": 1008.0}),
)


def lookup_peak(device_name: str) -> Optional[dict]:
    name = device_name.lower()
    for keys, peak in PEAKS:
        if all(k in name for k in keys):
            return dict(peak, source="datasheet")
    return None


def measure_peak(device) -> dict:
    """Measured ceilings on this GPU: a large device-to-device copy (bytes read + written) and large
    random matrix products per dtype (fp32 without TF32)."""
    peak = {"source": "measured"}
    n = 1 << 28  # 256 Mi bytes per buffer
    peak["gbps"] = 2 * n / (_time_copy(n // 4, device) * 1e-3) / 1e9
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype, size in ((torch.bfloat16, 8192), (torch.float16, 8192), (torch.float32, 4096)):
            peak[dtype_name(dtype)] = 2 * size**3 / (_time_matmul(size, dtype, device) * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    peak["vector"] = peak["float32"]
    torch.cuda.empty_cache()
    return peak


def _time_copy(numel: int, device) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), warmup_ms=20, rep_ms=100)


def _time_matmul(size: int, dtype, device) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return time_cuda(lambda: a @ b, warmup_ms=20, rep_ms=100)


def peak_for(peak: Optional[dict], dtype: torch.dtype, unit: str) -> tuple:
    """(TFLOP/s, GB/s) ceilings for a case, or (None, None)."""
    if not peak:
        return None, None
    tf = peak.get("vector") if unit == "vector" else peak.get(dtype_name(dtype))
    return tf, peak.get("gbps")


# ----------------------------------------------------------------------------- timers


def time_cuda(fn: Callable, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of `fn` on the current CUDA stream."""
    try:
        from triton.testing import do_bench
    except Exception:  # no triton: CUDA events, same structure (no L2 flush)
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / est))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def time_cuda_calls(fn: Callable, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds over a fixed number of calls (for long steps such as model training)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def time_cpu(fn: Callable, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- autotuning


@contextlib.contextmanager
def first_config_only():
    """Within the block, every Triton autotuner runs the first config its pruner keeps, without
    benchmarking the others: a correctness sweep then compiles one config per kernel instead of all
    of them (tests/triton/test_triton_configs.py checks every config). Nothing happens without triton."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        yield
        return
    original = Autotuner.run

    def run(tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        config = tuner.prune_configs(kwargs)[0]
        if config.pre_hook is not None:
            config.pre_hook({**tuner.nargs, **kwargs, **config.all_kwargs()})
        tuner.nargs = None
        tuner.best_config = config
        return tuner.fn.run(*args, **kwargs, **config.all_kwargs())

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original


# ----------------------------------------------------------------------------- progress


class Progress:
    """tqdm when installed and stderr is a terminal; else one line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True, desc: str = ""):
        self.total, self.n, self.enabled, self.t0 = total, 0, enabled, time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
            except Exception:
                self.bar = None

    def step(self, label: str, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(n)
        elif sys.stderr.isatty():
            print(
                f"\r[{self.n}/{self.total} {time.time() - self.t0:6.1f}s] {label[:70]:70s}",
                end="",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"[{self.n}/{self.total} {time.time() - self.t0:6.1f}s] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


# ----------------------------------------------------------------------------- the ops loop


@dataclass
class OpsOptions:
    device: str = "cpu"
    dtypes: list = field(default_factory=lambda: [torch.float32])
    modes: tuple = ("fwd", "fwd+bwd")
    impls: tuple = ("vitkernels", "eager", "sdpa")
    backend: str = "auto"
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    cpu_reps: int = 5
    budget_s: Optional[float] = None
    verify: bool = True
    max_copies: int = 4
    seed: int = 0
    peak: Optional[dict] = None
    vk_impl_name: str = "vitkernels"  # the impl name vitkernels' rows are recorded under (--as-impl)


TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # relative L2 error vs vitkernels


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def achieved(flops: float, nbytes: float, ms: float, peak_tf: Optional[float], peak_bw: Optional[float]) -> tuple:
    """(TFLOP/s, GB/s, % of the peak, "compute" or "memory") of one measurement: the % is of the nearer of
    the two peaks, when both are known (else None, None)."""
    tflops = flops / (ms * 1e-3) / 1e12
    gbps = nbytes / (ms * 1e-3) / 1e9
    if not (peak_tf and peak_bw):
        return tflops, gbps, None, None
    ct, mb = tflops / peak_tf, gbps / peak_bw
    return (tflops, gbps, 100 * ct, "compute") if ct >= mb else (tflops, gbps, 100 * mb, "memory")


def _rel_err(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            continue
        g, w = g.detach().float(), w.detach().float()
        if g.shape != w.shape:
            return float("inf")
        denom = w.norm().item()
        err = (g - w).norm().item()
        if not math.isfinite(err):
            return float("inf")
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


class _Sets:
    """`n` input copies of a case (leaves requiring grad) with fixed output gradients."""

    def __init__(self, case: Case, dtype, device, n: int, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        self.inputs = [make_inputs(case, dtype, device, g, requires_grad=True) for _ in range(n)]
        self.grads = [
            tuple(torch.randn(o, generator=g, device=device).to(dtype) for o in case.outputs) for _ in range(n)
        ]
        self.diff = [[t for name, t in s.items() if case.tensors[name].diff] for s in self.inputs]


def _runner(fn, sets: _Sets, mode: str):
    """A zero-argument callable that runs the next input copy: forward under no_grad, or forward +
    autograd.grad of every differentiable input with fixed output gradients."""
    order = itertools.cycle(range(len(sets.inputs)))
    if mode == "fwd":

        def run():
            i = next(order)
            with torch.no_grad():
                return _as_tuple(fn(sets.inputs[i]))
    else:

        def run():
            i = next(order)
            outs = _as_tuple(fn(sets.inputs[i]))
            return torch.autograd.grad(outs, sets.diff[i], sets.grads[i][: len(outs)], allow_unused=True)

    return run


def _first(fn, sets: _Sets, mode: str):
    """Outputs (fwd) or input gradients (fwd+bwd) on copy 0, for verification."""
    if mode == "fwd":
        with torch.no_grad():
            return _as_tuple(fn(sets.inputs[0]))
    outs = _as_tuple(fn(sets.inputs[0]))
    return torch.autograd.grad(outs, sets.diff[0], sets.grads[0][: len(outs)], allow_unused=True)


def _copies(case: Case, dtype, device, max_copies: int) -> int:
    if torch.device(device).type != "cuda":
        return 2
    set_bytes = sum(math.prod(s.shape) for s in case.tensors.values()) * torch.empty((), dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    n = max(1, math.ceil(2 * l2 / max(set_bytes, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    n = min(n, max(1, int(free * 0.25 // max(set_bytes, 1))))
    return max(1, min(max_copies, n))


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:300]


def run_ops(
    cases: list,
    opts: OpsOptions,
    progress: Optional[Progress] = None,
    on_case_done: Optional[Callable[[list, list], None]] = None,
) -> tuple:
    """Time every case × dtype × mode × implementation. Returns (records, skipped).

    A record carries the fields of the results schema (results.py) plus `case`, `model`, `backend`,
    `pct_peak`, `bound`, `vk_speedup`, `verify_err`, `copies`, `timing`. `skipped` lists what did
    not run and why (unsupported baseline, backend unavailable, error, time budget)."""
    records, skipped = [], []
    device = torch.device(opts.device)
    on_cuda = device.type == "cuda"
    t_start = time.time()
    for case in cases:
        for dtype in opts.dtypes:
            group_records = []
            base = {
                "kind": "op",
                "name": case.op,
                "case": case.label,
                "model": case.model,
                "dtype": dtype_name(dtype),
                "shape": dict(case.shape),
            }
            impls = [i for i in opts.impls if baselines.applies(i, case.op) is None]
            for i in opts.impls:
                if i not in impls:
                    for mode in opts.modes:
                        skipped.append(dict(base, mode=mode, impl=i, reason=baselines.applies(i, case.op)))
            if opts.budget_s is not None and time.time() - t_start > opts.budget_s:
                for mode in opts.modes:
                    for i in impls:
                        skipped.append(dict(base, mode=mode, impl=i, reason="time budget exhausted"))
                if progress:
                    progress.step(f"{case.op} {case.label} (budget)", len(opts.modes) * len(impls))
                continue
            if any(i in baselines.COMPILED for i in impls):
                torch._dynamo.reset()  # one compiled graph per case; no recompile limit across cases
            try:
                n_copies = _copies(case, dtype, device, opts.max_copies)
                sets = _Sets(case, dtype, device, n_copies, opts.seed)
            except Exception as e:  # e.g. out of memory
                for mode in opts.modes:
                    for i in impls:
                        skipped.append(dict(base, mode=mode, impl=i, reason=f"inputs: {_short(e)}"))
                if progress:
                    progress.step(f"{case.op} {case.label}", len(opts.modes) * len(impls))
                continue
            built = {}
            for i in impls:
                try:
                    built[i] = baselines.build(i, case, dtype, device, backend=opts.backend)
                except baselines.Unsupported as e:
                    built[i] = str(e)
                except Exception as e:
                    built[i] = _short(e)
            for mode in opts.modes:
                flops = case.flops_for(mode)
                nbytes = case.bytes_for(mode, torch.empty((), dtype=dtype).element_size())
                peak_tf, peak_bw = peak_for(opts.peak, dtype, case.unit)
                reference = None
                for i in impls:
                    label = f"{case.op} {case.label} {dtype_name(dtype)} {mode} {i}"
                    if progress:
                        progress.step(label)
                    impl = built[i]
                    rec = dict(base, mode=mode, impl=opts.vk_impl_name if i == "vitkernels" else i)
                    if isinstance(impl, str):
                        skipped.append(dict(rec, reason=impl))
                        continue
                    if opts.budget_s is not None and time.time() - t_start > opts.budget_s:
                        skipped.append(dict(rec, reason="time budget exhausted"))
                        continue
                    backend = None
                    try:
                        if i == "vitkernels":
                            backend = backend_that_runs(case, sets.inputs[0], opts.backend)
                            if mode == "fwd+bwd":
                                bwd = backend_that_runs(case, sets.inputs[0], opts.backend, backward=True)
                                backend = backend if bwd == backend else f"{backend}/{bwd}(bwd)"
                        run = _runner(impl.fn, sets, mode)
                        with impl.context():
                            first = _first(impl.fn, sets, mode)  # compile / autotune happen here
                            run()
                            if on_cuda:
                                torch.cuda.synchronize()
                                ms = time_cuda(run, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
                            else:
                                ms = time_cpu(run, reps=opts.cpu_reps, warmup=0)
                    except Exception as e:
                        skipped.append(dict(rec, reason=_short(e)))
                        if on_cuda:
                            with contextlib.suppress(Exception):
                                torch.cuda.synchronize()
                        continue
                    verify_err = None
                    if opts.verify:
                        if i == "vitkernels":
                            reference = first
                        elif reference is not None:
                            verify_err = _rel_err(first, reference)
                            if verify_err > TOLERANCE[dtype] * (2 if mode == "fwd+bwd" else 1):
                                print(
                                    f"warning: {label}: differs from vitkernels by {verify_err:.2e} (relative L2)",
                                    file=sys.stderr,
                                )
                    del first
                    tflops, gbps, pct, bound = achieved(flops, nbytes, ms, peak_tf, peak_bw)
                    rec.update(ms=ms, tflops=tflops, gbps=gbps, backend=backend, pct_peak=pct, bound=bound)
                    rec.update(
                        verify_err=verify_err, copies=n_copies, timing="cuda-events" if on_cuda else "CPU timing"
                    )
                    group_records.append(rec)
            add_speedups(group_records)
            records.extend(group_records)
            del sets, built
            if on_cuda:
                torch.cuda.empty_cache()  # large cases follow small ones: keep fragmentation down
            if on_case_done:
                on_case_done(records, skipped)
    return records, skipped
