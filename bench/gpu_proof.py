#!/usr/bin/env python3
"""One-call GPU proof: build, GPU tests, correctness sweep and headline benchmarks in ONE command.

    python3 bench/gpu_proof.py [OUT_DIR] [--dry-run] [--deadline S] [--steps A,B] [--skip A,B] [--plan]
    bash bench/gpu_suite.sh --part proof [OUT_DIR] [...]          # the same

Made for the lent GPU machines: one command of at most 10 minutes, 15 minutes of device time per
session (machine start included), at most 8 files back from $OUT. Every step runs as a subprocess
under its own timeout, taken from one deadline (default 540 s): a step gets
min(its cap, time left - the floors of the required steps after it), and is skipped when that is
under its own floor, so a slow step cannot eat the whole call and the later headline steps keep
their share. Steps, in order (the earlier answers matter more):

  env           GPU, driver, versions, commit, tree fingerprint (summary.json "stamp")
  build         pip install --no-build-isolation --no-deps -e . for this card's arch only
                (VITKERNELS_CUDA_ARCHS from torch.cuda.get_device_capability, MAX_JOBS=16) -> build.log
  info          python -m vitkernels.info (CUDA extension loaded, archs, backends per op)
  cuda-tests    pytest -m gpu tests/cuda/test_cuda_*.py (the CUDA C++ kernels)
  triton-tests  pytest -m gpu on the op test modules, real-model shapes in bf16 (Triton and CUDA
                backends; tests/conftest.py runs config 0 of each autotuner)
  check         vitkernels-bench check --quick --one-config -> check.json
  ops           headline op cases, bf16, fwd and fwd+bwd, vitkernels vs eager and SDPA -> *-proof-ops.json
  models        3 models, inference and AMP training step, vitkernels vs timm eager -> *-proof-models.json
  hf-models     Swin-T, SegFormer-B2, TimeSformer-B as Hugging Face transformers models: eager, sdpa
                and patched by vitkernels.patch_hf, same steps (optional: what is left) -> appended to
                *-proof-models.json (no file of its own)
  flex          self/window attention vs compiled FlexAttention (what fits) -> *-proof-flex.json

Files under OUT_DIR (default $OUT, else out/proof): proof.log (every step's output, its wall time and
exit code), build.log, summary.json (rewritten after every step: the stamp, each step's command,
timeout, wall time, exit code, status and parsed outcome; "complete" once the run ended without being
interrupted, "ok" when every step that ran passed), check.json,
and the three results files <gpu>-<date>-<sha>-proof-{ops,models,flex}.json (the hf-models rows go
into the models file, `vitkernels-bench models --append`), which `vitkernels-bench report` merges
into bench/results/ (docs/benchmarks.md, "One-call GPU proof").

Without a CUDA GPU (or with --dry-run) every step runs a tiny CPU version of itself, to prove the
script end to end and time it: pip install --dry-run, a few CPU tests, check on three ops in the
Triton interpreter, ops/models/flex at tiny shapes, hf-models as transformers ViT-Tiny (inference).

The commit: $VITKERNELS_COMMIT (40 hex), else `git rev-parse HEAD`, else the first line of
$VITKERNELS_COMMIT_FILE or .vitkernels-commit; the copy of the tree on a lent machine has no .git.
The tree fingerprint (sha256 of the sources, `--fingerprint` prints it here) tells which working
tree ran, committed or not. Stdlib only: it runs before the package is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable or "python3"
DEFAULT_DEADLINE = 540  # s: 9 minutes, inside a 570-s timeout_s of the device tool
MAX_FILES = 8  # what the device tool brings back from $OUT
MODELS = ("vit_base_patch16_224", "swin_tiny_patch4_window7_224", "segformer_b2", "mvitv2_tiny")
# The hf-models step: the transformers counterparts (eager, sdpa, patched) of these, appended to the
# models results file (Swin and SegFormer get their vitkernels speedups from the models step's rows).
HF_MODELS = ("swin_tiny_patch4_window7_224", "segformer_b2", "timesformer_base_patch16_224")
HF_IMPLS = "hf-eager,hf-sdpa,hf+patch_hf"
# The headline op cases: --representative keeps ViT-B self-attention, Swin-T stage 1, Swin V2-T stage 1
# (cosine, timm order), PVTv2/SegFormer
# stage 1 at 224 and 512, XCiT, TimeSformer time and space+cls, SegFormer-B2 stage 1 dwconv and mix_ffn.
OPS = (
    "self_attention",
    "window_attention",
    "sr_attention",
    "xca",
    "space_time_attention",
    "dwconv",
    "mix_ffn",
    "pool_attention",
)
OPS_CSV = ",".join(OPS)
OPS_IMPLS = "vitkernels,eager,sdpa"
MODELS_IMPLS = "vitkernels,eager"
FLEX_IMPLS = "vitkernels,flex"
DRY_MODEL = "vit_tiny_patch16_224"  # the models and hf-models steps' tiny CPU version
# The old-kernels step: these ops again with the previous kernels selected by their switches,
# appended to the ops file as impl "vitkernels-old" (its vk_speedup = old / new).
OLD_KERNEL_OPS = ("sr_attention", "mix_ffn", "self_attention", "space_time_attention", "dwconv")
OLD_KERNEL_ENV = (
    "VITKERNELS_SR_KERNEL=general",
    "VITKERNELS_MIX_FFN_KERNEL=composite",
    "VITKERNELS_ATTN_BWD_KERNEL=split",
    "VITKERNELS_ATTN_PACKED=off",
    "VITKERNELS_DWCONV_KERNEL=v1",
)
OLD_KERNEL_IMPL = "--impl vitkernels --as-impl vitkernels-old"
CUDA_TEST_SKIP = ("tests/cuda/test_cuda_compile.py", "tests/cuda/test_cuda_emulator.py")  # CPU-only tools, no gpu mark
TRITON_TEST_FILES = (
    "tests/ops/test_attention.py",
    "tests/ops/test_window_attention.py",
    "tests/ops/test_sr_attention.py",
    "tests/ops/test_xca.py",
    "tests/ops/test_dwconv.py",
    "tests/ops/test_space_time_attention.py",
    "tests/ops/test_pool_attention.py",
    "tests/ops/test_mix_ffn_fused.py",
    "tests/triton/test_triton_attention_kernels.py",
    "tests/triton/test_triton_attention_tma.py",
)
# Real-model shapes in bf16 (test_attention / test_dwconv number their dtypes, bf16 first), and the
# 66,560-window grid test.
TRITON_TEST_K = (
    "((real_shapes or swin_shapes) and (bfloat16 or dtype0)) or many_windows or real_shapes_single_kernel"
    " or real_shapes_tma"
)
FINGERPRINT_PATHS = ("vitkernels", "csrc", "tests", "bench", "setup.py", "pyproject.toml", "CMakeLists.txt")


# ----------------------------------------------------------------------------- helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def tree_fingerprint(root: str = ROOT) -> str:
    """sha256 over the path and bytes of every source file (no caches, builds or binaries)."""
    h = hashlib.sha256()
    files = []
    for top in FINGERPRINT_PATHS:
        path = os.path.join(root, top)
        if os.path.isfile(path):
            files.append(path)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in ("__pycache__", "build", "results")
                and not d.endswith(".egg-info")
                and not d.startswith(".")
            )
            files += [
                os.path.join(dirpath, f)
                for f in filenames
                if not f.endswith((".so", ".pyc", ".o", ".tmp")) and not f.startswith(".")
            ]
    for f in sorted(files):
        h.update(os.path.relpath(f, root).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def find_commit(root: str = ROOT) -> tuple:
    """(40-hex sha or "unknown", where it came from)."""
    env = os.environ.get("VITKERNELS_COMMIT", "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{40}", env):
        return env, "VITKERNELS_COMMIT"
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if re.fullmatch(r"[0-9a-f]{40}", sha):
            return sha, "git"
    except Exception:
        pass
    for path in (os.environ.get("VITKERNELS_COMMIT_FILE"), os.path.join(root, ".vitkernels-commit")):
        if path and os.path.isfile(path):
            with open(path) as f:
                sha = f.readline().strip().lower()
            if re.fullmatch(r"[0-9a-f]{40}", sha):
                return sha, path
    return "unknown", "none (set VITKERNELS_COMMIT)"


PROBE = r"""
import json, platform, subprocess, sys
out = {"python": platform.python_version(), "host_cpus": __import__("os").cpu_count()}
def version(m):
    try:
        return str(__import__(m).__version__)
    except Exception as e:
        return f"none ({type(e).__name__})"
for m in ("torch", "triton", "timm", "transformers", "numpy"):
    out[m] = version(m)
try:
    import torch
    out["cuda"] = torch.version.cuda or "none"
    out["gpu_available"] = torch.cuda.is_available()
    if out["gpu_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    out["torch_error"] = repr(e)
for cmd, key in ((["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], "driver"),
                 (["nvcc", "--version"], "nvcc")):
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        out[key] = text.splitlines()[-1] if key == "nvcc" and text else (text.splitlines()[0] if text else "none")
    except Exception as e:
        out[key] = f"none ({type(e).__name__})"
for m in ("xdist", "pytest_timeout"):
    try:
        __import__(m)
        out["has_" + m] = True
    except Exception:
        out["has_" + m] = False
print("PROBE " + json.dumps(out))
"""


def cuda_archs(capability) -> str:
    """The arch for VITKERNELS_CUDA_ARCHS: 9.0 -> 90a (wgmma, setmaxnreg), else e.g. 80, 89, 100."""
    major, minor = capability
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def geomean(xs) -> Optional[float]:
    xs = [x for x in xs if isinstance(x, (int, float)) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ----------------------------------------------------------------------------- steps


@dataclass
class Step:
    name: str
    what: str
    cap: int  # the step's own timeout (s) on a GPU
    floor: int  # skipped when less is left for it; required steps' floors are kept free
    estimate: int  # expected wall time (s) on an H100, with its reasoning in docs/benchmarks.md
    gpu: Callable  # (ctx, timeout) -> argv
    dry: Callable  # (ctx, timeout) -> argv (tiny CPU version)
    required: bool = True  # optional steps run on what is left
    log: Optional[str] = None  # the step's output goes to this file instead of proof.log
    outcome: Optional[Callable] = None  # (ctx, text) -> dict


class Ctx:
    def __init__(
        self,
        out: str,
        dry: bool,
        probe: dict,
        prefix: str,
        models: tuple,
        env: Optional[dict] = None,
        hf_models: tuple = HF_MODELS,
    ):
        self.out, self.dry, self.probe, self.prefix, self.models = out, dry, probe, prefix, models
        self.hf_models = hf_models
        self.env = env if env is not None else {}

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def result(self, part: str) -> str:
        return self.path(f"{self.prefix}-proof-{part}.json")


def allot(step: Step, later: list, left: float, reserve: int = 5) -> int:
    """The timeout of `step` when `left` seconds remain: its cap, or what remains once the floors of
    the required steps after it (and `reserve` for the summary) are kept free. Under the step's own
    floor, the caller skips it."""
    return int(min(step.cap, left - sum(s.floor for s in later if s.required) - reserve))


def _bench(*args) -> list:
    return [PY, "-m", "vitkernels.bench", *args]


def bench_step(
    name: str,
    what: str,
    times: tuple,
    command: str,
    part: str,
    gpu: tuple,
    dry: tuple,
    *,
    append: bool = False,
    env: tuple = (),
    impls: Optional[tuple] = None,
    required: bool = True,
) -> Step:
    """A benchmark step: `vitkernels-bench <command> <flags>` writing the results file of `part` (with
    `append`, adding to it). `times`: (cap, floor, estimate) in seconds. `gpu`, `dry`: (flags, budget margin
    or None), flags one string of space-separated arguments (none holds a space; "{models}" and
    "{hf_models}" stand for the step's model lists), --budget = timeout - margin; the dry run adds
    --device cpu and --cpu-reps 1. `env`: VAR=value settings the command runs under; `impls`: the rows of
    the results file its outcome counts (None: all)."""

    def argv(ctx: Ctx, t: int, flags: str, margin: Optional[int], cpu: bool) -> list:
        flags = flags.format(models=",".join(ctx.models), hf_models=",".join(ctx.hf_models))
        cmd = _bench(
            command,
            *(["--device", "cpu"] if cpu else []),
            *flags.split(),
            *(["--cpu-reps", "1"] if cpu else []),
            *(["--budget", _budget(t, margin)] if margin is not None else []),
            "--json",
            ctx.result(part),
            *(["--append"] if append else []),
        )
        return ["env", *env, *cmd] if env else cmd

    cap, floor, estimate = times
    return Step(
        name,
        what,
        cap=cap,
        floor=floor,
        estimate=estimate,
        gpu=lambda ctx, t: argv(ctx, t, *gpu, cpu=False),
        dry=lambda ctx, t: argv(ctx, t, *dry, cpu=True),
        required=required,
        outcome=bench_outcome(part, impls),
    )


def _pytest(ctx: Ctx, *args, workers: int = 0) -> list:
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-rfE"]
    if ctx.probe.get("has_pytest_timeout"):
        cmd += ["--timeout", "120"]
    if workers and ctx.probe.get("has_xdist"):
        cmd += ["-n", str(workers), "--dist", "loadfile"]
    return cmd + list(args)


def _budget(timeout: int, margin: int) -> str:
    return str(max(5, timeout - margin))


def _cuda_test_files() -> list:
    return [f for f in sorted(glob.glob("tests/cuda/test_cuda_*.py", root_dir=ROOT)) if f not in CUDA_TEST_SKIP]


def pytest_outcome(ctx, text: str) -> dict:
    """Counts from pytest's last summary line, e.g. '530 passed, 11 skipped in 80.20s'."""
    lines = [
        ln
        for ln in text.splitlines()
        if re.search(
            r"\b(passed|failed|error|errors|skipped|deselected|"
            r"no tests ran)\b",
            ln,
        )
    ]
    if not lines:
        return {}
    last = lines[-1]
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", last)
    }
    failed = [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M)]
    out = {"counts": counts, "line": last.strip("= ").strip()}
    if failed:
        out["failed"] = failed[:30]
    return out


def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def check_outcome(ctx, text: str) -> dict:
    doc = _load(ctx.path("check.json"))
    if doc is None:
        return {}
    statuses = {}
    for r in doc.get("checks", []):
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    fails = [
        f"{r['op']} {r['backend']} {r['dtype']}: {r['detail']}" for r in doc.get("checks", []) if r["status"] == "FAIL"
    ]
    return {"passed": doc.get("passed"), "counts": statuses, **({"failures": fails} if fails else {})}


def bench_outcome(part: str, impls: Optional[tuple] = None) -> Callable:
    """The outcome of a benchmark step from its results file; `impls`: only the rows of these (the
    hf-models step appends to the models file)."""

    def outcome(ctx, text: str) -> dict:
        doc = _load(ctx.result(part))
        if doc is None:
            return {}
        recs = [r for r in doc.get("records", []) if impls is None or r.get("impl") in impls]
        skipped = [s for s in doc.get("skipped", []) if impls is None or s.get("impl") in impls]
        out = {"file": os.path.basename(ctx.result(part)), "records": len(recs), "skipped": len(skipped)}
        speedups, patched = {}, {}
        for r in recs:
            key = f"{r['name']} {r['mode']}" + (f" {r['precision']}" if r.get("precision") else "")
            if r.get("vk_speedup"):
                speedups.setdefault(key, {}).setdefault(r["impl"], []).append(r["vk_speedup"])
            if r.get("patch_hf_speedup"):
                patched.setdefault(key, {}).setdefault(r["impl"], []).append(r["patch_hf_speedup"])
        out["vk_speedup_geomean"] = {k: {i: round(geomean(v), 3) for i, v in d.items()} for k, d in speedups.items()}
        if patched:
            out["patch_hf_speedup_geomean"] = {
                k: {i: round(geomean(v), 3) for i, v in d.items()} for k, d in patched.items()
            }
        if part == "models":
            out["throughput"] = {
                f"{r['name']} {r['mode']} {r.get('precision', '')} {r['impl']}".replace(
                    "  ", " "
                ): f"{r['throughput']:.1f} {r.get('unit', '')}"
                for r in recs
            }
        reasons = {}
        for s in skipped:
            reasons[s.get("reason", "?")[:120]] = reasons.get(s.get("reason", "?")[:120], 0) + 1
        if reasons:
            out["skip_reasons"] = reasons
        return out

    return outcome


def info_outcome(ctx, text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith(("CUDA extension", "GPU:", "torch ", "triton "))]
    return {"lines": lines}


def build_outcome(ctx, text: str) -> dict:
    log = ""
    try:
        with open(ctx.path("build.log"), errors="replace") as f:
            log = f.read()
    except OSError:
        pass
    out = {"tail": [ln for ln in log.splitlines() if ln.strip()][-3:]}
    if not ctx.dry:
        out.update(archs=ctx.env.get("VITKERNELS_CUDA_ARCHS"), max_jobs=ctx.env.get("MAX_JOBS"))
    return out


def make_steps() -> list:
    def build_gpu(ctx, t):
        return [PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]

    def build_dry(ctx, t):
        return [PY, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-deps", "-e", "."]

    def info(ctx, t):
        return [PY, "-m", "vitkernels.info"]

    def cuda_gpu(ctx, t):
        return _pytest(ctx, "-m", "gpu", *_cuda_test_files(), workers=4)

    def cuda_dry(ctx, t):
        return _pytest(ctx, "tests/cuda/test_cuda_compile.py", "-k", "kernel_sources_exist or do_not_include_torch")

    def triton_gpu(ctx, t):
        return _pytest(ctx, "-m", "gpu", *TRITON_TEST_FILES, "-k", TRITON_TEST_K, workers=4)

    def triton_dry(ctx, t):
        return _pytest(
            ctx,
            "tests/ops/test_window_attention.py",
            "tests/ops/test_xca.py",
            "tests/ops/test_sr_attention.py",
            "-k",
            "test_flops or head_dim_limit or triton_unavailable or test_limits",
        )

    def check_gpu(ctx, t):
        return _bench("check", "--quick", "--one-config", "--json", ctx.path("check.json"))

    def check_dry(ctx, t):
        return _bench(
            "check",
            "--quick",
            "--one-config",
            "--device",
            "cpu",
            "--op",
            "self_attention,window_attention,sr_attention",
            "--json",
            ctx.path("check.json"),
        )

    return [
        Step(
            "build",
            "pip install -e . (CUDA extension for this card's arch only)",
            cap=180,
            floor=60,
            estimate=60,
            gpu=build_gpu,
            dry=build_dry,
            log="build.log",
            outcome=build_outcome,
        ),
        Step(
            "info", "python -m vitkernels.info", cap=45, floor=10, estimate=10, gpu=info, dry=info, outcome=info_outcome
        ),
        Step(
            "cuda-tests",
            "pytest -m gpu tests/cuda/test_cuda_*.py (CUDA C++ kernels)",
            cap=120,
            floor=30,
            estimate=75,
            gpu=cuda_gpu,
            dry=cuda_dry,
            outcome=pytest_outcome,
        ),
        Step(
            "triton-tests",
            "pytest -m gpu, op tests at real-model shapes in bf16",
            cap=75,
            floor=30,
            estimate=60,
            gpu=triton_gpu,
            dry=triton_dry,
            outcome=pytest_outcome,
        ),
        Step(
            "check",
            "vitkernels-bench check --quick --one-config",
            cap=75,
            floor=30,
            estimate=40,
            gpu=check_gpu,
            dry=check_dry,
            outcome=check_outcome,
        ),
        bench_step(
            "ops",
            "headline op cases, bf16, fwd and fwd+bwd, vs eager and SDPA",
            (160, 60, 150),
            "ops",
            "ops",
            gpu=(f"--op {OPS_CSV} --representative --dtype bf16 --impl {OPS_IMPLS} --measure-peak", 45),
            dry=(f"--op {OPS_CSV} --dtype fp32 --impl {OPS_IMPLS}", 20),
        ),
        bench_step(
            "models",
            "models: inference and AMP training vs timm eager",
            (120, 45, 90),
            "models",
            "models",
            gpu=(f"--model {{models}} --dtype bf16 --precision amp --impl {MODELS_IMPLS} --reps 5", 35),
            dry=(f"--model {DRY_MODEL} --batch 1 --dtype bf16 --precision amp --impl {MODELS_IMPLS}", 20),
        ),
        bench_step(
            "old-kernels",
            "sr_attention, mix_ffn, self_attention (backward), time axis, dwconv: previous kernels (vitkernels-old)",
            (90, 30, 65),
            "ops",
            "ops",
            gpu=(f"--op {','.join(OLD_KERNEL_OPS)} --representative --dtype bf16 {OLD_KERNEL_IMPL}", 15),
            dry=(f"--op sr_attention --mode fwd --dtype fp32 {OLD_KERNEL_IMPL}", None),
            append=True,
            env=OLD_KERNEL_ENV,
            impls=("vitkernels-old",),
            required=False,
        ),
        bench_step(
            "hf-models",
            "transformers Swin/SegFormer/TimeSformer: eager, sdpa, patch_hf",
            (100, 40, 70),
            "models",
            "models",
            gpu=(f"--model {{hf_models}} --dtype bf16 --precision amp --impl {HF_IMPLS} --reps 5", 35),
            # inference only: a bf16 training step of three transformers ViTs takes ~10 s each on 2 CPU cores
            dry=(f"--model {DRY_MODEL} --batch 1 --dtype bf16 --precision amp --mode inference --impl {HF_IMPLS}", 20),
            append=True,
            impls=tuple(HF_IMPLS.split(",")),
            required=False,
        ),
        bench_step(
            "flex",
            "self/window attention vs compiled FlexAttention",
            (90, 40, 80),
            "ops",
            "flex",
            gpu=(f"--op self_attention,window_attention --representative --dtype bf16 --impl {FLEX_IMPLS}", 50),
            dry=(f"--op self_attention --mode fwd --dtype fp32 --impl {FLEX_IMPLS}", None),
            required=False,
        ),
    ]


STEP_NAMES = ("env",) + tuple(s.name for s in make_steps()) + ("summary",)
# Files the proof writes under OUT (the results files carry the <gpu>-<date>-<sha> prefix).
PLANNED_FILES = (
    "proof.log",
    "build.log",
    "summary.json",
    "check.json",
    "*-proof-ops.json",
    "*-proof-models.json",
    "*-proof-flex.json",
)


# ----------------------------------------------------------------------------- running


class Stop(Exception):
    """SIGTERM / SIGINT: end the running step, write the summary, exit."""


def _on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


class Proof:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "out", "proof"))
        os.makedirs(self.out, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = float(args.deadline)
        log = os.path.join(self.out, "proof.log")
        open(log, "w").close()  # a fresh log, then O_APPEND: the steps write to the same file
        self.log = open(log, "a", buffering=1, errors="replace")
        self.summary = {
            "kind": "gpu-proof",
            "complete": False,
            "started": _now(),
            "finished": None,
            "deadline_s": self.deadline,
            "out": self.out,
            "argv": sys.argv[1:],
            "steps": [],
        }
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        self.summary["files"] = sorted(os.listdir(self.out))
        path = os.path.join(self.out, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    # -- env
    def probe(self) -> dict:
        t = time.monotonic()
        rec = {
            "name": "env",
            "what": "GPU, driver, versions, commit, tree fingerprint",
            "cmd": f"{PY} -c <probe>",
            "timeout_s": 90,
        }
        probe = {}
        try:
            p = subprocess.run([PY, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=90, env=self.env)
            self.log.write(p.stdout + p.stderr)
            rec["rc"] = p.returncode
            for line in p.stdout.splitlines():
                if line.startswith("PROBE "):
                    probe = json.loads(line[6:])
        except subprocess.TimeoutExpired:
            rec["rc"] = 124
        rec["wall_s"] = round(time.monotonic() - t, 1)
        rec["status"] = "ok" if rec["rc"] == 0 and probe else "failed"
        sha, source = find_commit()
        gpu = probe.get("gpu") if probe.get("gpu_available") else "cpu"
        self.dry = bool(self.args.dry_run or not probe.get("gpu_available"))
        stamp = {
            "gpu": gpu,
            "commit": sha,
            "commit_source": source,
            "tree_fingerprint": tree_fingerprint(),
            "platform": platform.platform(),
            **probe,
        }
        self.summary.update(stamp=stamp, dry_run=self.dry)
        rec["outcome"] = {"gpu": gpu, "dry_run": self.dry}
        self.summary["steps"].append(rec)
        self.env["VITKERNELS_COMMIT"] = sha if sha != "unknown" else ""
        self.env["VITKERNELS_NO_JIT"] = "1"  # never a JIT build inside a timed step: the build step builds
        if not self.dry:
            self.env["VITKERNELS_REQUIRE_CUDA_EXT"] = "1"
            self.env.setdefault("MAX_JOBS", "16")
            if not self.env.get("VITKERNELS_CUDA_ARCHS") and probe.get("capability"):
                self.env["VITKERNELS_CUDA_ARCHS"] = cuda_archs(probe["capability"])
        self.say(
            f"env: {gpu}, torch {probe.get('torch')}, triton {probe.get('triton')}, CUDA {probe.get('cuda')}, "
            f"commit {sha[:12]} ({source}), tree {stamp['tree_fingerprint']}"
            + (" -- DRY RUN (tiny CPU steps)" if self.dry else f", archs {self.env.get('VITKERNELS_CUDA_ARCHS')}")
        )
        self.write_summary()
        return probe

    # -- one step
    def timeout_for(self, step: Step, later: list) -> int:
        return allot(step, later, self.deadline - self.elapsed())

    def run_step(self, step: Step, ctx: Ctx, later: list) -> dict:
        timeout = self.timeout_for(step, later)
        rec = {
            "name": step.name,
            "what": step.what,
            "cap_s": step.cap,
            "floor_s": step.floor,
            "estimate_s": step.estimate,
            "timeout_s": timeout,
        }
        if timeout < step.floor:
            rec.update(
                status="skipped",
                reason=f"{timeout}s left for it, under its floor of {step.floor}s",
                rc=None,
                wall_s=0.0,
            )
            self.say(f"{step.name}: SKIPPED ({rec['reason']})")
            return rec
        argv = (step.dry if self.dry else step.gpu)(ctx, timeout)
        rec["cmd"] = shlex.join(argv)
        self.say(f"{step.name}: start (timeout {timeout}s): {rec['cmd']}")
        self.log.write(f"\n===== {step.name}: {rec['cmd']}\n")
        start = self.log.tell()
        sink = open(ctx.path(step.log), "w", buffering=1, errors="replace") if step.log else self.log
        t = time.monotonic()
        # Its own process group (for killpg on timeout) but not its own session: the lent machine ends
        # what a command leaves behind unless it started a new session.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **group
        )
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self._kill(proc)
            rc, timed_out = 124, True
        except Stop:
            self._kill(proc)
            rec.update(rc=130, status="interrupted", wall_s=round(time.monotonic() - t, 1))
            self.summary["steps"].append(rec)
            raise
        finally:
            if step.log:
                sink.close()
        rec["wall_s"] = round(time.monotonic() - t, 1)
        rec["rc"] = rc
        rec["status"] = (
            "timeout"
            if timed_out
            else "ok"
            if rc == 0
            else "no tests"
            if (rc == 5 and "pytest" in rec["cmd"])
            else "failed"
        )
        self.log.flush()
        if step.log:
            text = open(ctx.path(step.log), errors="replace").read()
            if rc != 0:
                self.log.write(f"(last lines of {step.log})\n" + "\n".join(text.splitlines()[-40:]) + "\n")
        else:
            with open(self.log.name, errors="replace") as f:
                f.seek(start)
                text = f.read()
        try:
            rec["outcome"] = step.outcome(ctx, text) if step.outcome else {}
        except Exception as e:  # a summary must never break the run
            rec["outcome"] = {"error": repr(e)}
        self.log.write(
            f"===== {step.name}: rc={rc} status={rec['status']} wall={rec['wall_s']}s (timeout {timeout}s)\n"
        )
        self.say(f"{step.name}: {rec['status']} (rc {rc}) in {rec['wall_s']}s")
        return rec

    def _kill(self, proc) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- all
    def run(self) -> int:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.say(f"gpu_proof: out {self.out}, deadline {self.deadline:.0f}s")
        rc = 0
        try:
            probe = self.probe()
            stamp = self.summary["stamp"]
            prefix = f"{slugify(stamp['gpu'])}-{self.summary['started'][:10]}-{stamp['commit'][:7]}"
            ctx = Ctx(
                self.out,
                self.dry,
                probe,
                prefix,
                tuple(self.args.models),
                self.env,
                tuple(getattr(self.args, "hf_models", None) or HF_MODELS),
            )
            steps = [s for s in make_steps() if self.selected(s.name)]
            for i, step in enumerate(steps):
                rec = self.run_step(step, ctx, steps[i + 1 :])
                self.summary["steps"].append(rec)
                self.write_summary()
        except Stop as e:
            self.say(f"stopped by {e}")
            rc = 130
        self.summary["finished"] = _now()
        ran = self.summary["steps"]
        self.summary["complete"] = rc == 0
        bad = [s["name"] for s in ran if s.get("status") not in ("ok", "skipped")]
        skipped = [s["name"] for s in ran if s.get("status") == "skipped"]
        self.summary["ok"] = not bad and rc == 0
        self.summary["failed_steps"], self.summary["skipped_steps"] = bad, skipped
        self.write_summary()
        files = self.summary["files"]
        self.say(f"done in {self.elapsed():.0f}s; {len(files)} file(s) in {self.out}: {', '.join(files)}")
        if len(files) > MAX_FILES:
            self.say(f"WARNING: {len(files)} files in {self.out}; the device tool brings back {MAX_FILES}")
        print(render(self.summary), flush=True)
        self.log.write(render(self.summary) + "\n")
        self.log.close()
        return rc or (0 if self.summary["ok"] else 1)

    def selected(self, name: str) -> bool:
        steps = _split(self.args.steps)
        return (not steps or name in steps) and name not in _split(self.args.skip)


def _split(values) -> list:
    out = []
    for v in values or []:
        out += [s.strip() for s in str(v).split(",") if s.strip()]
    return out


def render(summary: dict) -> str:
    """The plain-text summary printed last (the device tool's reply shows the end of the output)."""
    st = summary.get("stamp", {})
    lines = [
        "",
        "== gpu proof summary" + (" (DRY RUN: tiny CPU steps)" if summary.get("dry_run") else ""),
        f"{st.get('gpu')} | torch {st.get('torch')} | triton {st.get('triton')} | CUDA {st.get('cuda')} | "
        f"commit {str(st.get('commit'))[:12]} | tree {st.get('tree_fingerprint')} | {summary.get('started')}",
        f"{'step':13s} {'status':9s} {'rc':>4s} {'wall s':>7s} {'timeout':>7s}  outcome",
    ]
    for s in summary.get("steps", []):
        o = s.get("outcome") or {}
        if "counts" in o and isinstance(o["counts"], dict):
            brief = ", ".join(f"{v} {k}" for k, v in o["counts"].items())
        elif "records" in o:
            brief = f"{o['records']} records, {o['skipped']} skipped"
        elif "lines" in o:
            brief = "; ".join(ln for ln in o["lines"] if ln.startswith("CUDA extension"))[:90]
        else:
            brief = s.get("reason", "") or ", ".join(f"{k}={v}" for k, v in o.items() if k in ("gpu", "archs"))
        rc = "" if s.get("rc") is None else str(s["rc"])
        lines.append(
            f"{s['name']:13s} {s.get('status', ''):9s} {rc:>4s} {s.get('wall_s', 0):7.1f} "
            f"{str(s.get('timeout_s', '')):>7s}  {brief}"
        )
    cpu = " (CPU timing: not GPU performance)" if summary.get("dry_run") else ""
    for s in summary.get("steps", []):
        for key, d in ((s.get("outcome") or {}).get("vk_speedup_geomean") or {}).items():
            lines.append(f"  {s['name']:9s} {key:36s} " + ", ".join(f"vs {i} {v:.2f}x" for i, v in d.items()) + cpu)
        for key, d in ((s.get("outcome") or {}).get("patch_hf_speedup_geomean") or {}).items():
            lines.append(
                f"  {s['name']:9s} {key:36s} hf+patch_hf " + ", ".join(f"vs {i} {v:.2f}x" for i, v in d.items()) + cpu
            )
    lines.append(
        f"elapsed {summary.get('elapsed_s')}s of {summary.get('deadline_s'):.0f}s; "
        + (
            "all steps ok"
            if summary.get("ok")
            else f"failed: {', '.join(summary.get('failed_steps') or []) or '-'}; "
            f"skipped: {', '.join(summary.get('skipped_steps') or []) or '-'}"
        )
    )
    return "\n".join(lines)


def plan_text(dry: bool = False) -> str:
    ctx = Ctx(os.path.join("$OUT"), dry, {"has_xdist": True, "has_pytest_timeout": True}, "<gpu>-<date>-<sha>", MODELS)
    steps = make_steps()
    lines = [f"{'step':13s} {'cap s':>5s} {'floor':>5s} {'H100 est':>8s}  command ({'dry run' if dry else 'GPU'})"]
    for s in steps:
        argv = (s.dry if dry else s.gpu)(ctx, s.cap)
        cmd = shlex.join(argv).replace(PY, "python3")
        lines.append(
            f"{s.name:13s} {s.cap:5d} {s.floor:5d} {s.estimate:8d}  {cmd}" + ("" if s.required else "  (optional)")
        )
    optional = [s for s in steps if not s.required]
    lines.append(
        f"sum of estimates {sum(s.estimate for s in steps if s.required)}s for the required steps (+ env "
        f"~5s); optional, in order, on what is left: "
        + ", ".join(f"{s.name} {s.estimate}s" for s in optional)
        + f"; deadline {DEFAULT_DEADLINE}s; files: {', '.join(PLANNED_FILES)}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="gpu_proof.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("out", nargs="?", help="output folder (default: $OUT, else out/proof)")
    p.add_argument("--out", dest="out_opt", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="tiny CPU version of every step (automatic without a GPU)")
    p.add_argument(
        "--deadline",
        type=float,
        default=float(os.environ.get("VK_PROOF_DEADLINE", DEFAULT_DEADLINE)),
        help=f"seconds for the whole run (default {DEFAULT_DEADLINE}; $VK_PROOF_DEADLINE)",
    )
    p.add_argument("--steps", action="append", help=f"only these steps ({', '.join(STEP_NAMES[1:-1])})")
    p.add_argument("--skip", action="append", help="leave these steps out (e.g. --skip build on a warm machine)")
    p.add_argument("--models", default=",".join(MODELS), help=f"models of the models step (default {','.join(MODELS)})")
    p.add_argument(
        "--hf-models", default=",".join(HF_MODELS), help=f"models of the hf-models step (default {','.join(HF_MODELS)})"
    )
    p.add_argument("--plan", action="store_true", help="print the steps, their time caps and commands, and exit")
    p.add_argument("--fingerprint", action="store_true", help="print this tree's fingerprint and exit")
    args = p.parse_args(argv)
    args.out = args.out_opt or args.out
    args.models = _split([args.models])
    args.hf_models = _split([args.hf_models])
    unknown = [s for s in _split(args.steps) + _split(args.skip) if s not in STEP_NAMES[1:-1]]
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps: {', '.join(STEP_NAMES[1:-1])}")
    if args.fingerprint:
        print(tree_fingerprint())
        return 0
    if args.plan:
        print(plan_text(args.dry_run))
        return 0
    return Proof(args).run()


if __name__ == "__main__":
    sys.exit(main())
