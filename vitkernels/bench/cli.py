"""`vitkernels-bench` (also `python -m vitkernels.bench`): benchmarks and correctness sweep.

Subcommands:
  ops      every op at shapes from the real models, fwd and fwd+bwd, vs eager / SDPA / FlexAttention /
           torch.compile baselines: ms (median), speedup, TFLOP/s, GB/s, % of peak.
  models   images/s (clips/s) of every model in vitkernels.models, inference and a training step,
           vs timm eager and torch.compile, and vs Hugging Face transformers' counterpart (eager,
           sdpa, patched by vitkernels.patch_hf, compiled); mixed precision by default (--precision
           amp: float32 weights, torch.autocast, GradScaler for fp16), or --precision pure.
  check    correctness sweep of every op x fused backend on this device vs the float64 reference.
  report   merge results files and regenerate docs/benchmarks.md from them.

On a machine without a GPU, `ops` and `models` run tiny shapes on the reference backend, labelled
"CPU timing": a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

DESCRIPTION = __doc__


def _split(values) -> list:
    out = []
    for v in values or []:
        out += [s.strip() for s in str(v).split(",") if s.strip()]
    return out


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    g = p.add_argument_group("selection")
    if kind == "ops":
        g.add_argument("--op", action="append", metavar="NAME", help="only these ops (repeatable or comma-separated)")
        g.add_argument(
            "--case",
            action="append",
            metavar="TEXT",
            help="only cases whose label or model contains TEXT (repeatable), e.g. swin_t, s1@224",
        )
        g.add_argument(
            "--representative",
            action="store_true",
            help="only the representative case(s) of each op (fast; used for compile/flex and extra dtypes)",
        )
        g.add_argument("--mode", action="append", choices=("fwd", "fwd+bwd"), help="default: both")
    else:
        g.add_argument(
            "--model",
            action="append",
            metavar="NAME",
            help="only these models (repeatable or comma-separated; a substring selects every match)",
        )
        g.add_argument("--mode", action="append", choices=("inference", "train"), help="default: both")
        g.add_argument(
            "--precision",
            action="append",
            metavar="amp|pure",
            help="amp (default): float32 weights and inputs, forward and loss under "
            "torch.autocast(dtype), GradScaler for fp16, AdamW on the float32 weights; inference "
            "under the same autocast. pure: weights and inputs cast to the dtype, no autocast. "
            "Repeatable or comma-separated (amp,pure runs both). float32 rows are always pure",
        )
    g.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help="bf16, fp16, fp32 (repeatable or comma-separated). Default: "
        + ("bf16,fp16,fp32" if kind == "ops" else "bf16")
        + " on GPU, fp32 on CPU",
    )
    g.add_argument("--batch", type=int, metavar="B", help="batch size for every case (default: per case)")
    g.add_argument(
        "--impl",
        action="append",
        metavar="IMPL",
        help="implementations to time (repeatable or comma-separated); default: all that apply on GPU, "
        "vitkernels,eager,sdpa on CPU"
        if kind == "ops"
        else "implementations to time: vitkernels, eager, compile, vitkernels+compile, and the Hugging "
        "Face transformers baselines hf-eager, hf-sdpa, hf+patch_hf, hf+compile (default on GPU: "
        "vitkernels,eager,compile,hf-eager,hf-sdpa,hf+patch_hf; on CPU: vitkernels,eager)",
    )
    if kind == "ops":
        g.add_argument("--no-compile", action="store_true", help="drop the compiled baselines (flex, compile)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "triton", "cuda", "reference"),
        help="vitkernels backend (default auto; the backend that actually ran is recorded)",
    )
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny shapes at batch 1 (the default on CPU)")
    size.add_argument("--full", action="store_true", help="the real-model shapes even on CPU (slow)")

    t = p.add_argument_group("timing")
    if kind == "ops":
        t.add_argument("--warmup-ms", type=float, default=10.0, help="GPU warm-up per measurement (ms, default 10)")
        t.add_argument("--rep-ms", type=float, default=50.0, help="GPU timed period per measurement (ms, default 50)")
        t.add_argument("--no-verify", action="store_true", help="do not compare baselines' results with vitkernels'")
        t.add_argument(
            "--as-impl",
            default="vitkernels",
            metavar="NAME",
            help="record vitkernels' rows under this impl name, e.g. vitkernels-old when a kernel switch "
            "(VITKERNELS_SR_KERNEL=general, VITKERNELS_MIX_FFN_KERNEL=composite) selects the previous "
            "kernels; with --append its vk_speedup is then old / new",
        )
        t.add_argument(
            "--measure-peak",
            action="store_true",
            help="measure copy bandwidth and matmul TFLOP/s for %% of peak (else datasheet values)",
        )
    else:
        t.add_argument("--reps", type=int, default=10, help="timed steps per measurement on GPU (default 10)")
    t.add_argument("--cpu-reps", type=int, default=None, help="timed calls per measurement on CPU")
    t.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="stop starting new measurements after this many seconds (what is left is listed as skipped)",
    )

    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the results file (schema: docs/benchmarks.md)")
    o.add_argument("--csv", metavar="PATH", help="write one CSV row per measurement")
    o.add_argument(
        "--append",
        action="store_true",
        help="keep the records of an existing --json file (same GPU; a record of this run replaces "
        "one with the same name, mode, dtype, precision, impl and shape) and recompute speedups "
        "across both",
    )
    o.add_argument("--plot", metavar="PNG", help="bar chart of vitkernels' speedups (needs matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines on stderr")
    o.add_argument("--list", action="store_true", help="list what would run (and which backend) without timing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitkernels-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="{ops,models,check,overhead,report}")
    sub.required = True
    # each subcommand's description is its function's docstring
    ops = sub.add_parser(
        "ops", help="benchmark every op vs eager/SDPA/Flex/compile baselines", description=cmd_ops.__doc__
    )
    _common(ops, "ops")
    models = sub.add_parser(
        "models",
        help="images/s of every model in vitkernels.models vs timm / torch.compile / Hugging Face transformers",
        description=cmd_models.__doc__,
    )
    _common(models, "models")
    check = sub.add_parser(
        "check", help="correctness sweep of every op x backend on this device", description=cmd_check.__doc__
    )
    check.add_argument(
        "--quick", action="store_true", help="one dtype (bf16 on GPU, fp32 on CPU); under a minute on CPU"
    )
    check.add_argument("--op", action="append", metavar="NAME", help="only these ops")
    check.add_argument("--dtype", action="append", metavar="DTYPE", help="bf16, fp16, fp32")
    check.add_argument("--batch", type=int, default=2, metavar="B", help="leading dim of every sample (default 2)")
    check.add_argument(
        "--one-config",
        action="store_true",
        help="each Triton autotuner runs the first config its pruner keeps, unbenchmarked (one "
        "compile per kernel: much faster on a fresh GPU; tests/triton/test_triton_configs.py covers "
        "every config)",
    )
    check.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    check.add_argument("--json", metavar="PATH", help="write the results (stamped with GPU, versions, commit, time)")
    check.add_argument("--csv", metavar="PATH", help="write one CSV row per op x backend x dtype")
    check.add_argument("--plot", metavar="PNG", help="bar chart of each check's error / bound (needs matplotlib)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines on stderr")
    overhead = sub.add_parser(
        "overhead",
        help="host time per op call (allocation-only kernels), vs F.scaled_dot_product_attention",
        description=cmd_overhead.__doc__,
    )
    overhead.add_argument("--op", action="append", metavar="NAME", help="only these ops")
    overhead.add_argument("--calls", type=int, default=2000, help="calls per repeat (default 2000)")
    overhead.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported (default 5)")
    overhead.add_argument("--json", metavar="PATH", help="write the results (stamped with versions, commit, time)")
    from .results import add_report_args

    report = sub.add_parser(
        "report", help="merge results files; regenerate docs/benchmarks.md", description=cmd_report.__doc__
    )
    add_report_args(report)
    return p


# ----------------------------------------------------------------------------- helpers


def _device(arg) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("vitkernels-bench: --device cuda but no CUDA GPU is available")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_plot(path) -> None:
    if path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "vitkernels-bench: --plot needs matplotlib (pip install matplotlib, or pip install 'vitkernels[bench]')"
            ) from None


def _table(rows: list, columns: list) -> str:
    """A plain text table: columns = [(header, key, align)]."""
    cells = [[h for h, _, _ in columns]] + [[str(r.get(k, "")) for _, k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row):
        return "  ".join(
            c.rjust(w) if a == ">" else c.ljust(w) for c, w, (_, _, a) in zip(row, widths, columns)
        ).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _num(x, spec) -> str:
    return "" if x is None else format(x, spec)


def print_ops_table(records: list, skipped: list, cpu: bool, file=None) -> None:
    file = file or sys.stdout
    from .results import speedup_summary

    if cpu:
        print("CPU timing: tiny shapes, vitkernels on its reference backend; not GPU performance.", file=file)
    by_op = {}
    for r in records:
        by_op.setdefault(r["name"], []).append(r)
    cols = [
        ("case", "case", "<"),
        ("mode", "mode", "<"),
        ("dtype", "dtype", "<"),
        ("impl", "impl", "<"),
        ("backend", "backend", "<"),
        ("ms", "ms", ">"),
        ("TFLOP/s", "tflops", ">"),
        ("GB/s", "gbps", ">"),
        ("%peak", "pct", ">"),
        ("vk speedup", "speedup", ">"),
    ]
    for op, rs in by_op.items():
        rows, last = [], None
        for r in rs:
            group = (r.get("case"), r["mode"], r["dtype"])
            pct = f"{r['pct_peak']:.0f}% {r['bound'][:3]}" if r.get("pct_peak") is not None else ""
            rows.append(
                {
                    "case": r.get("case") if group != last else "",
                    "mode": r["mode"] if group != last else "",
                    "dtype": r["dtype"] if group != last else "",
                    "impl": r["impl"],
                    "backend": r.get("backend") or "",
                    "ms": _num(r["ms"], ".4g"),
                    "tflops": _num(r["tflops"], ".3g"),
                    "gbps": _num(r["gbps"], ".4g"),
                    "pct": pct,
                    "speedup": f"{r['vk_speedup']:.3g}x"
                    if r.get("vk_speedup")
                    else ("—" if r["impl"] == "vitkernels" else ""),
                }
            )
            last = group
        print(f"\n== {op}", file=file)
        print(_table(rows, cols), file=file)
    summary = speedup_summary(records)
    if summary:
        print("\nvk speedup = baseline ms / vitkernels ms (>1: vitkernels is faster); geometric means:", file=file)
        for name, mode, dtype, s in summary:
            print(
                f"  {name:22s} {mode:8s} {dtype:9s} "
                + ", ".join(f"vs {i} {v[0]:.2f}x ({v[1]})" for i, v in s.items() if v[0]),
                file=file,
            )
    _print_skipped(skipped, file)


def _print_skipped(skipped: list, file) -> None:
    if not skipped:
        return
    reasons = {}
    for s in skipped:
        reasons.setdefault((s["impl"], s["reason"]), []).append(s)
    print(f"\nnot run ({len(skipped)}):", file=file)
    for (impl, reason), ss in sorted(reasons.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        names = sorted({s["name"] for s in ss})
        print(f"  {impl:16s} x{len(ss):<4d} {', '.join(names)[:60]}: {reason}", file=file)


def print_models_table(records: list, skipped: list, cpu: bool, file=None) -> None:
    file = file or sys.stdout
    if cpu:
        print("CPU timing: batch 1, vitkernels on its reference backend; not GPU performance.", file=file)
    cols = [
        ("model", "name", "<"),
        ("mode", "mode", "<"),
        ("dtype", "dtype", "<"),
        ("precision", "precision", "<"),
        ("batch", "batch", ">"),
        ("impl", "impl", "<"),
        ("ms/step", "ms", ">"),
        ("throughput", "tp", ">"),
        ("vk speedup", "speedup", ">"),
    ]
    patched = any(r.get("patch_hf_speedup") for r in records)
    if patched:
        cols.append(("patch_hf speedup", "patch", ">"))
    rows = [
        {
            "name": r["name"],
            "mode": r["mode"],
            "dtype": r["dtype"],
            "precision": r.get("precision") or "",
            "batch": r.get("batch", ""),
            "impl": r["impl"],
            "ms": _num(r["ms"], ".4g"),
            "tp": f"{r['throughput']:.1f} {r['unit']}",
            "speedup": f"{r['vk_speedup']:.2f}x" if r.get("vk_speedup") else "",
            "patch": f"{r['patch_hf_speedup']:.2f}x" if r.get("patch_hf_speedup") else "",
        }
        for r in records
    ]
    if rows:
        print(_table(rows, cols), file=file)
        if patched:
            print(
                "patch_hf speedup = that transformers baseline's ms / the patched model's (hf+patch_hf) ms", file=file
            )
        if any(r.get("precision") == "amp" for r in records):
            print(
                "precision amp: float32 weights, forward under torch.autocast(dtype) (GradScaler for float16); "
                "pure: weights and inputs in the dtype",
                file=file,
            )
    _print_skipped(skipped, file)


class _Writer:
    """Writes the JSON/CSV after every case, so a run that is cut off still leaves its results. With
    --append, the records of the existing --json file (same GPU) are kept, those of this run replacing
    any with the same key, and the speedups recomputed across both."""

    def __init__(self, args, meta: dict):
        self.args, self.meta = args, meta
        self.old_records, self.old_skipped = [], []
        if not getattr(args, "append", False):
            return
        if not args.json:
            raise SystemExit("vitkernels-bench: --append needs --json PATH")
        if not os.path.exists(args.json):
            return
        from . import results

        try:
            old = results.load([args.json])[0]
        except (OSError, ValueError) as e:
            raise SystemExit(f"vitkernels-bench: --append: cannot read {args.json} ({e})") from None
        if old.get("gpu") != meta.get("gpu"):
            raise SystemExit(
                f"vitkernels-bench: --append: {args.json} holds results of {old.get('gpu')!r}, "
                f"this run is on {meta.get('gpu')!r}"
            )
        if old.get("commit") != meta.get("commit"):
            print(
                f"note: --append: {args.json} is of commit {str(old.get('commit'))[:12]}, this run of "
                f"{str(meta.get('commit'))[:12]}",
                file=sys.stderr,
            )
        self.old_records, self.old_skipped = old["records"], old.get("skipped", [])
        previous = old.get("appended_to", []) + [{"argv": old.get("argv"), "timestamp": old.get("timestamp")}]
        self.meta = dict(meta, appended_to=previous)

    def merged(self, records, skipped) -> tuple:
        if not self.old_records and not self.old_skipped:
            return records, skipped
        from .results import _record_key, add_speedups

        keys = {_record_key(r) for r in records}
        out = [r for r in self.old_records if _record_key(r) not in keys] + list(records)
        add_speedups(out)
        return out, self.old_skipped + list(skipped)

    def __call__(self, records, skipped) -> None:
        from . import results

        records, skipped = self.merged(records, skipped)
        if self.args.json:
            results.write_json(self.args.json, dict(self.meta, records=records, skipped=skipped))
        if self.args.csv:
            results.write_csv(self.args.csv, records, stamp=self.meta)


# ----------------------------------------------------------------------------- subcommands


def _finish(args, meta: dict, writer, records: list, skipped: list, t0: float, table, cpu: bool, plot_title) -> int:
    """The end of an `ops` / `models` run: the results files (`writer`), the stamp, the `table`, how many
    measurements in how long, and the --plot PNG (titled `plot_title`; None: no plot). Exit code 1 without
    a measurement."""
    from . import results

    writer(records, skipped)
    print(results.stamp_line(meta))
    table(records, skipped, cpu)
    print(
        f"\n{len(records)} measurement(s) in {time.time() - t0:.1f}s"
        + (f"; wrote {args.json}" if args.json else "")
        + (f", {args.csv}" if args.csv else "")
    )
    if args.plot and plot_title is not None:
        try:
            results.plot(records, args.plot, title=plot_title)
            print(f"wrote {args.plot}")
        except RuntimeError as e:
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0 if records else 1


def cmd_ops(args) -> int:
    """Every op at shapes from the real models, forward and forward+backward, vs the eager timm composition,
    SDPA (each backend), FlexAttention and torch.compile."""
    import torch

    from . import baselines, cases, harness, results

    _check_plot(args.plot)
    device = _device(args.device)
    cpu = torch.device(device).type != "cuda"
    tiny = args.tiny or (cpu and not args.full)
    try:
        dtypes = harness.parse_dtypes(args.dtype) or (
            [torch.float32] if cpu else [torch.bfloat16, torch.float16, torch.float32]
        )
    except ValueError as e:
        raise SystemExit(f"vitkernels-bench ops: {e}") from None
    ops = _split(args.op)
    unknown = [o for o in ops if o not in cases.OPS]
    if unknown:
        raise SystemExit(f"vitkernels-bench ops: unknown op(s) {unknown}; ops: {', '.join(cases.OPS)}")
    impls = _split(args.impl) or (["vitkernels", "eager", "sdpa"] if cpu else list(baselines.IMPLS))
    bad = [i for i in impls if i not in baselines.IMPLS]
    if bad:
        raise SystemExit(f"vitkernels-bench ops: unknown impl(s) {bad}; impls: {', '.join(baselines.IMPLS)}")
    if args.no_compile:
        impls = [i for i in impls if i not in baselines.COMPILED]
    if "vitkernels" in impls:  # first: the others are verified against it and their speedups relative to it
        impls = ["vitkernels"] + [i for i in impls if i != "vitkernels"]
    selected = cases.select_cases(
        cases.all_cases(batch=args.batch, tiny=tiny), ops, _split(args.case), args.representative
    )
    if not selected:
        raise SystemExit("vitkernels-bench ops: no case matches the filters (see --list)")
    modes = tuple(args.mode or ("fwd", "fwd+bwd"))
    if args.list:
        return _list_ops(selected, dtypes, impls, device, args.backend)

    meta = results.metadata(device)
    peak = None
    if not cpu:
        if args.measure_peak:
            try:
                peak = harness.measure_peak(torch.device(device))
            except Exception as e:  # e.g. out of memory: fall back to the datasheet
                print(f"note: peak measurement failed ({e}); using datasheet values", file=sys.stderr)
        if peak is None:
            peak = harness.lookup_peak(meta["device"])
            if peak is None:
                print(
                    f"note: no datasheet peak for {meta['device']}: % of peak omitted (use --measure-peak)",
                    file=sys.stderr,
                )
    meta.update(peak=peak, command="ops", argv=sys.argv[1:], cpu_timing=cpu, tiny=tiny)
    compiled = [i for i in impls if i in baselines.COMPILED]
    if compiled and len(selected) * len(dtypes) > 12:
        print(
            f"note: {', '.join(compiled)} compile every case, fwd and fwd+bwd (~10-60 s each): use --no-compile, "
            "--representative or --budget for a shorter run",
            file=sys.stderr,
        )
    print(
        f"vitkernels-bench ops on {meta['device']} ({device}): {len(selected)} case(s) x {len(dtypes)} dtype(s) x "
        f"{len(modes)} mode(s); impls {', '.join(impls)}; backend {args.backend}",
        file=sys.stderr,
    )
    opts = harness.OpsOptions(
        device=device,
        dtypes=dtypes,
        modes=modes,
        impls=tuple(impls),
        backend=args.backend,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps or 5,
        budget_s=args.budget,
        verify=not args.no_verify,
        peak=peak,
        vk_impl_name=args.as_impl,
    )
    n_impls = sum(len([i for i in impls if baselines.applies(i, c.op) is None]) for c in selected)
    progress = harness.Progress(n_impls * len(dtypes) * len(modes), enabled=not args.no_progress, desc="ops")
    writer = _Writer(args, meta)
    t0 = time.time()
    try:
        records, skipped = harness.run_ops(selected, opts, progress, on_case_done=writer)
    finally:
        progress.close()
    title = f"vitkernels speedup, {meta['device']}" + (" (CPU timing)" if cpu else "")
    return _finish(args, meta, writer, records, skipped, t0, print_ops_table, cpu, title)


def _list_ops(selected, dtypes, impls, device, backend) -> int:
    import torch

    from . import baselines
    from .cases import backend_that_runs, make_inputs
    from .harness import dtype_name

    dtype = dtypes[0]
    print(f"{len(selected)} case(s); backends for {dtype_name(dtype)} on {device} (backend choice {backend!r}):")
    rows = []
    for c in selected:
        t = make_inputs(c, dtype, device, empty=True)
        try:
            fwd = backend_that_runs(c, t, backend)
            bwd = backend_that_runs(c, t, backend, backward=True)
            be = fwd if fwd == bwd else f"{fwd}/{bwd}(bwd)"
        except Exception as e:
            be = f"unavailable: {e}"[:80]
        es = torch.empty((), dtype=dtype).element_size()
        rows.append(
            {
                "op": c.op,
                "case": c.label,
                "shape": c.describe(),
                "gflop": f"{c.flops / 1e9:.3g}",
                "mb": f"{c.bytes_for('fwd', es) / 1e6:.4g}",
                "backend": be,
                "impls": ",".join(i for i in impls if baselines.applies(i, c.op) is None),
                "rep": "*" if c.representative else "",
            }
        )
        del t
    print(
        _table(
            rows,
            [
                ("op", "op", "<"),
                ("case", "case", "<"),
                ("rep", "rep", "<"),
                ("shape", "shape", "<"),
                ("GFLOP fwd", "gflop", ">"),
                ("MB fwd", "mb", ">"),
                ("backend", "backend", "<"),
                ("impls", "impls", "<"),
            ],
        )
    )
    print("rep * = representative case")
    return 0


def cmd_models(args) -> int:
    """Throughput of each model family in vitkernels.models, inference and a training step, vs timm eager and
    torch.compile, and vs the Hugging Face transformers model of the same sizes (eager, sdpa, patched by
    vitkernels.patch_hf, compiled)."""
    import torch

    from . import harness, models, results

    _check_plot(args.plot)
    device = _device(args.device)
    cpu = torch.device(device).type != "cuda"
    zoo, why = models.load_zoo()
    if zoo is None:
        print(f"vitkernels-bench models: skipped: {why}")
        return 0
    try:
        dtypes = harness.parse_dtypes(args.dtype) or ([torch.float32] if cpu else [torch.bfloat16])
    except ValueError as e:
        raise SystemExit(f"vitkernels-bench models: {e}") from None
    impls = _split(args.impl) or list(models.CPU_DEFAULT_IMPLS if cpu else models.DEFAULT_IMPLS)
    bad = [i for i in impls if i not in models.IMPLS]
    if bad:
        raise SystemExit(f"vitkernels-bench models: unknown impl(s) {bad}; impls: {', '.join(models.IMPLS)}")
    precisions = _split(args.precision) or ["amp"]
    bad = [p for p in precisions if p not in models.PRECISIONS]
    if bad:
        raise SystemExit(f"vitkernels-bench models: unknown precision(s) {bad}; use {' or '.join(models.PRECISIONS)}")
    names, msgs = models.choose_models(zoo, _split(args.model), cpu and not args.full)
    for m in msgs:
        print(f"note: {m}", file=sys.stderr)
    if not names:
        print("vitkernels-bench models: no model to run")
        return 1 if msgs else 0
    modes = tuple(args.mode or models.MODES)
    if args.list:
        for n in names:
            print(f"{n:40s} input {models.input_shape(n)}")
        return 0
    meta = results.metadata(device)
    meta.update(command="models", argv=sys.argv[1:], cpu_timing=cpu, precision=precisions)
    n_runs = sum(len({models.effective_precision(d, p) for p in precisions}) for d in dtypes)
    progress = harness.Progress(
        len(names) * n_runs * len(modes) * len(impls), enabled=not args.no_progress, desc="models"
    )
    writer = _Writer(args, meta)
    t0 = time.time()
    try:
        records, skipped = models.run_models(
            names,
            zoo,
            device=device,
            dtypes=dtypes,
            modes=modes,
            impls=impls,
            backend=args.backend,
            batch=args.batch,
            reps=args.reps,
            cpu_reps=args.cpu_reps or 3,
            budget_s=args.budget,
            progress=progress,
            on_done=writer,
            precisions=precisions,
        )
    finally:
        progress.close()
    title = f"vitkernels model speedup, {meta['device']}" if records else None
    return _finish(args, meta, writer, records, skipped, t0, print_models_table, cpu, title)


def cmd_check(args) -> int:
    """Every op x fused backend that can run on this device vs the float64 reference (vitkernels.bench.check).
    Without a CUDA build of torch the Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    device = _device(args.device)
    if device == "cpu" and "triton" not in sys.modules:
        # No GPU: the Triton kernels can only be checked in the interpreter, which must be chosen
        # before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import check, harness

    try:
        dtypes = harness.parse_dtypes(args.dtype) or None
    except ValueError as e:
        raise SystemExit(f"vitkernels-bench check: {e}") from None
    from ..ops import _spec
    from .results import metadata, plot_check, stamp_line, write_csv, write_json

    _check_plot(args.plot)
    if args.batch < 1:
        raise SystemExit("vitkernels-bench check: --batch must be >= 1")
    ops = _split(args.op) or _spec.names()
    unknown = [o for o in ops if o not in _spec.names()]
    if unknown:
        raise SystemExit(f"vitkernels-bench check: unknown op(s) {unknown}; ops: {', '.join(_spec.names())}")
    dtypes = dtypes or check.default_dtypes(device, args.quick)
    meta = metadata(device)
    print(stamp_line(meta))
    rows: list = []
    progress = harness.Progress(len(ops) * len(check.FUSED) * len(dtypes), enabled=not args.no_progress, desc="check")
    tuning = harness.first_config_only() if args.one_config else contextlib.nullcontext()
    try:
        with tuning:
            ok = check.run(
                quick=args.quick, dtypes=dtypes, ops=ops, device=device, rows=rows, batch=args.batch, progress=progress
            )
    finally:
        progress.close()
    if args.json:
        write_json(args.json, {**meta, "kind": "check", "passed": ok, "one_config": args.one_config, "checks": rows})
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(
            args.csv,
            rows,
            fields=("op", "backend", "dtype", "device", "batch", "status", "worst", "detail"),
            stamp=meta,
        )
        print(f"wrote {args.csv}")
    if args.plot:
        try:
            plot_check(rows, args.plot, title=f"vitkernels check, {meta['device']}")
            print(f"wrote {args.plot}")
        except RuntimeError as e:
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0 if ok else 1


def cmd_overhead(args) -> int:
    """The op layer's own cost per call on this CPU: each op's kernels are swapped for allocation-only
    stand-ins; plain eager inference, the eager fast path on and off (vitkernels.bench.overhead). Goal:
    <= 10 µs per call."""
    from ..ops import _spec
    from . import overhead
    from .results import metadata, stamp_line, write_json

    ops = _split(args.op) or None
    unknown = [o for o in ops or () if o not in _spec.names()]
    if unknown:
        raise SystemExit(f"vitkernels-bench overhead: unknown op(s) {unknown}; ops: {', '.join(_spec.names())}")
    if args.calls < 1 or args.repeats < 1:
        raise SystemExit("vitkernels-bench overhead: --calls and --repeats must be >= 1")
    meta = metadata("cpu")
    print(stamp_line(meta))
    records = overhead.run(ops=ops, calls=args.calls, repeats=args.repeats)
    print(overhead.format_table(records))
    if args.json:
        write_json(args.json, {**meta, "kind": "overhead", "goal_us": overhead.GOAL_US, "records": records})
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    """Merge the part files of GPU runs into bench/results/<gpu>-<date>-<sha>.json and regenerate the results
    section of docs/benchmarks.md (newest run per GPU) from the JSON files."""
    from .results import report_main

    return report_main(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "ops": cmd_ops,
        "models": cmd_models,
        "check": cmd_check,
        "overhead": cmd_overhead,
        "report": cmd_report,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
