"""Compile every Triton kernel launch of vitkernels for sm_90a without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so it cannot
see codegen errors, shared-memory overflow or register spills. This script:

1. imports vitkernels with the interpreter off, makes the launchers take their GPU (autotuned) path
   on CPU tensors, and replaces ``JITFunction.run`` / ``Autotuner.run`` with recorders, so calling the
   launchers at real model shapes records every (kernel, argument types, constexprs, num_warps,
   num_stages) a GPU run would compile: for an autotuned launch, every config the pruner keeps;
2. compiles each distinct launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a
   cubin (Triton's bundled ptxas) and reads its registers, local memory (spills) and shared memory.

Run: ``python tests/triton/triton_sm90.py [--quick] [--json out.json]``; exit status 1 when a compile
fails or a config needs more shared memory than an H100/H200 block may have. Used by
tests/triton/test_triton_compile.py; outputs of the launches are never computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# The vitkernels of this checkout, whatever another editable install points at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("run with TRITON_INTERPRET unset: the kernels must be real JIT functions")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from vitkernels.ops import _spec  # noqa: E402
from vitkernels.triton import attention as t_attn  # noqa: E402
from vitkernels.triton import dwconv as t_dw  # noqa: E402
from vitkernels.triton import mix_ffn as t_mix  # noqa: E402
from vitkernels.triton import pool_attention as t_pool  # noqa: E402
from vitkernels.triton import sr_attention as t_sr  # noqa: E402
from vitkernels.triton import window_attention as t_wa  # noqa: E402
from vitkernels.triton import xca as t_xca  # noqa: E402

# Every vitkernels.triton module an op's Triton kernels launch from (the op specs' triton_modules).
MODULES = {
    name: importlib.import_module(f"vitkernels.triton.{name}")
    for name in dict.fromkeys(m for s in _spec.specs() for m in s.triton_modules)
}

SM90_SMEM_PER_BLOCK = 232448  # 227 KiB: the opt-in maximum of one block on H100 / H200
SM_COUNT = 132  # H100 SXM (H200: 132 too); sizes the programs-per-SM heuristics
_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# ---------------------------------------------------------------------------------------- capture

TARGET = GPUTarget("cuda", 90, 32)
_BACKEND = make_backend(TARGET)
_BINDERS: dict = {}
_LAUNCHES: dict = {}


def _jit_run(self, *args, grid, warmup, **kwargs):
    """Record a launch as a GPU run would compile it: Triton's own binder specialises the arguments
    (16-byte alignment / divisibility by 16, ints equal to 1, dtypes) for the sm_90a backend."""
    if self not in _BINDERS:
        _BINDERS[self] = create_function_from_signature(self.signature, self.params, _BACKEND)
    bound, specialization, options = _BINDERS[self](*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(_BACKEND, kwargs, bound, specialization, options)
    key = (self.fn.__module__, self.fn.__qualname__, str(signature), str(constexprs), str(attrs), str(options))
    _LAUNCHES.setdefault(key, (self, signature, constexprs, attrs, options))


def _autotuner_run(self, *args, **kwargs):
    """Every config the pruner keeps goes on to the wrapped function (heuristics, then _jit_run)."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        if config.pre_hook is not None:  # as the tuner does before a launch (e.g. descriptor boxes)
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
    self.nargs = None


def _gpu_path_on_cpu():
    """Launchers take their tuned GPU path for CPU tensors; launches are recorded, not run."""
    for mod in MODULES.values():
        mod.use_fixed = lambda t, interpreted, what: False
        if hasattr(mod, "_hopper"):  # the TMA kernels' device check: compiling for sm_90a
            mod._hopper = lambda t: True
        if hasattr(mod, "sm_count"):  # the launchers that size grids by the SM count
            mod.sm_count = lambda device: SM_COUNT
    JITFunction.run = _jit_run
    Autotuner.run = _autotuner_run


# -------------------------------------------------------------------------------------- scenarios


def _under(env: dict, run, *args, **kwargs):
    """``run(*args, **kwargs)`` with the vitkernels switches ``env`` set (restored afterwards)."""
    was = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        run(*args, **kwargs)
    finally:
        for name, value in was.items():
            os.environ.pop(name)
            if value is not None:
                os.environ[name] = value


def _attention(dt, B, H, Nq, Nk, D, bias_kind=None, bwd_kernel="split", tma="off"):
    """Forward and backward; ``bwd_kernel``: VITKERNELS_ATTN_BWD_KERNEL for this backward, ``tma``:
    VITKERNELS_ATTN_TMA for both, or "fwd": on for the forward only."""
    env = {"VITKERNELS_ATTN_BWD_KERNEL": bwd_kernel, "VITKERNELS_ATTN_TMA": "on" if tma == "fwd" else tma}
    _under(env, _attention_fwd_bwd, dt, B, H, Nq, Nk, D, bias_kind, tma == "fwd")


def _attention_fwd_bwd(dt, B, H, Nq, Nk, D, bias_kind, pointer_backward=False):
    q, k, v = torch.empty(B, H, Nq, D, dtype=dt), torch.empty(B, H, Nk, D, dtype=dt), torch.empty(B, H, Nk, D, dtype=dt)
    bias = {
        None: None,
        "full": torch.empty(B, H, Nq, Nk, dtype=dt),
        "heads": torch.empty(H, Nq, Nk, dtype=dt).expand(B, H, Nq, Nk),
        "keys": torch.empty(B, 1, 1, Nk, dtype=dt).expand(B, H, Nq, Nk),
    }[bias_kind]
    out = torch.empty_like(q)
    lse = t_attn.attention_forward(q, k, v, bias, D**-0.5, out)
    if pointer_backward:
        os.environ["VITKERNELS_ATTN_TMA"] = "off"  # restored by _under
    t_attn.attention_backward(
        out,
        q,
        k,
        v,
        bias,
        out,
        lse,
        D**-0.5,
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        bias is not None,
    )


def _window(dt, B, hw, C, heads, m, s, cosine=False, shift_first=False):
    qkv = torch.empty(B, hw[0] * hw[1], 3 * C, dtype=dt)
    table, qb = torch.empty((2 * m - 1) ** 2, heads, dtype=dt), torch.empty(3 * C, dtype=dt)
    opts = {"logit_scale": torch.empty(heads, 1, 1, dtype=dt) if cosine else None, "shift_first": shift_first}
    t_wa.window_attention_forward(qkv, hw, heads, m, s, table, qb, (C // heads) ** -0.5, **opts)
    t_wa.window_attention_backward(
        torch.empty(B, hw[0] * hw[1], C, dtype=dt), qkv, hw, heads, m, s, table, qb, (C // heads) ** -0.5, **opts
    )


def _dwconv(dt, B, hw, C, k, act):
    x = torch.empty(B, hw[0] * hw[1], C, dtype=dt)
    w, b = torch.empty(C, 1, k, k, dtype=dt), torch.empty(C, dtype=dt)
    y = t_dw.dwconv_forward(x, hw, w, b, act)
    t_dw.dwconv_backward(y, x, hw, w, b, act)


def _mix_ffn(dt, B, hw, hidden, c_out, k=3):
    """The fused dwconv + GELU + fc2 forward on the fc1 output h (its backward runs dwconv's kernels)."""
    h = torch.empty(B, hw[0] * hw[1], hidden, dtype=dt)
    dw, dw_b = torch.empty(hidden, 1, k, k, dtype=dt), torch.empty(hidden, dtype=dt)
    t_mix.mix_ffn_forward(h, hw, dw, dw_b, torch.empty(c_out, hidden, dtype=dt), torch.empty(c_out, dtype=dt))


def _sr(dt, B, H, N, M, D):
    """The N ≫ M forward and, as the op's "auto" picks, the on-chip or the split backward."""
    q, k, v = torch.empty(B, H, N, D, dtype=dt), torch.empty(B, H, M, D, dtype=dt), torch.empty(B, H, M, D, dtype=dt)
    out = torch.empty_like(q)
    lse = t_sr.sr_attention_forward(q, k, v, D**-0.5, out)
    backward = t_sr.sr_attention_backward if t_sr.supports_backward(M, D) else t_sr.sr_attention_split_backward
    backward(out, q, k, v, out, lse, D**-0.5, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))


def _xca(dt, B, N, C, heads):
    qkv, temp = torch.empty(B, N, 3 * C, dtype=dt), torch.empty(heads, 1, 1, dtype=dt)
    out = t_xca.xca_forward(qkv, heads, temp)
    t_xca.xca_backward(out, qkv, heads, temp)


def _space_time(dt, B, S, T, C, heads, axis, layout, cls):
    op = importlib.import_module("vitkernels.ops.space_time_attention")  # the module, not the function
    qkv = torch.empty(B, S * T, 3 * C, dtype=dt)
    cls_qkv = torch.empty(B, 3 * C, dtype=dt) if cls else None
    args = (qkv, T, heads, axis, cls_qkv, layout, (C // heads) ** -0.5)
    saved = op._triton_forward(*args)
    op._triton_backward(saved[0], saved[1] if cls else None, saved, *args)


def _pool(dt, B, H, q_hw, k_hw, D, cls=False, rel=True, residual=True):
    """MViTv2 pooling attention: q at q_hw, k and v pooled to k_hw, timm's table length 2·max − 1."""
    Nq, Nk = q_hw[0] * q_hw[1] + cls, k_hw[0] * k_hw[1] + cls
    q, k, v = (torch.empty(B, H, n, D, dtype=dt) for n in (Nq, Nk, Nk))
    th, tw = (torch.empty(2 * max(q_hw[i], k_hw[i]) - 1, D, dtype=dt) if rel else None for i in (0, 1))
    out, lse = t_pool.pool_attention_fwd(q, k, v, q_hw, k_hw, th, tw, cls, residual, D**-0.5)
    t_pool.pool_attention_bwd(out, q, k, v, out, lse, q_hw, k_hw, th, tw, cls, residual, D**-0.5)


def scenarios(quick: bool):
    """(name, callable) at the shapes of the reference models: bf16 (the half-precision configs,
    fp16 shares them) and fp32 (its own configs)."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    out = []
    for dt in dtypes:
        n = _DTYPE_NAME[dt]
        out += [
            (f"attention vit-b {n}", lambda dt=dt: _attention(dt, 2, 12, 197, 197, 64)),
            (f"attention bias-full {n}", lambda dt=dt: _attention(dt, 2, 4, 100, 77, 32, "full")),
            (f"attention bias-heads d48 {n}", lambda dt=dt: _attention(dt, 2, 8, 197, 197, 48, "heads")),
            (f"attention segformer-1024 {n}", lambda dt=dt: _attention(dt, 1, 1, 4096, 1024, 64)),
            # the single-kernel backward: ViT-B/16 at 384 px (577 tokens), and its deterministic
            # variant with a head-broadcast bias (dbias reduced over the batch)
            (
                f"attention vit-b384 single-kernel {n}",
                lambda dt=dt: _attention(dt, 2, 12, 577, 577, 64, None, "fused"),
            ),
            (
                f"attention bias-heads d48 single-kernel deterministic {n}",
                lambda dt=dt: _attention(dt, 2, 8, 197, 197, 48, "heads", "fused-deterministic"),
            ),
            (f"window swin-t s1 {n}", lambda dt=dt: _window(dt, 2, (56, 56), 96, 3, 7, 3)),
            (f"window swin-b384 s1 {n}", lambda dt=dt: _window(dt, 1, (96, 96), 128, 4, 12, 6)),
            # Swin V2 (cosine attention) in timm's order on an odd map: the COSINE + SHIFT_FIRST kernels
            (
                f"window swinv2 cosine shift-first 60x60 M8 {n}",
                lambda dt=dt: _window(dt, 2, (60, 60), 96, 3, 8, 4, cosine=True, shift_first=True),
            ),
            (f"dwconv segformer k3 gelu {n}", lambda dt=dt: _dwconv(dt, 2, (128, 128), 256, 3, "gelu")),
            (
                f"dwconv segformer k3 gelu v1 backward {n}",
                lambda dt=dt: _under({"VITKERNELS_DWCONV_KERNEL": "v1"}, _dwconv, dt, 2, (128, 128), 256, 3, "gelu"),
            ),
            # the Hopper forward through TMA descriptors (VITKERNELS_ATTN_TMA=on) at ViT-B/384; the
            # TMA backward kernels compile in the full run ("tma backward" below)
            (f"attention vit-b384 tma {n}", lambda dt=dt: _attention(dt, 2, 12, 577, 577, 64, tma="fwd")),
            (f"mix_ffn segformer-b2 s1 512 {n}", lambda dt=dt: _mix_ffn(dt, 8, (128, 128), 256, 64)),
            (f"sr pvtv2-b2 s1 {n}", lambda dt=dt: _sr(dt, 4, 1, 3136, 49, 64)),
            (f"sr segformer-512 s1 {n}", lambda dt=dt: _sr(dt, 2, 1, 16384, 256, 32)),
            # SegFormer-B2 at 512 px, batch 8: D = 64, M = 256 runs the split backward
            (f"sr segformer-b2-512 s1 b8 (split bwd) {n}", lambda dt=dt: _sr(dt, 8, 1, 16384, 256, 64)),
            # TimeSformer's time axis: 8-frame sequences, eight per packed 64-row tile
            (
                f"space_time timesformer time (packed) {n}",
                lambda dt=dt: _space_time(dt, 1, 196, 8, 768, 12, "time", "st", False),
            ),
            (
                f"space_time timesformer space+cls {n}",
                lambda dt=dt: _space_time(dt, 1, 196, 8, 768, 12, "space", "st", True),
            ),
            (f"xca xcit-s12 b64 (one pass) {n}", lambda dt=dt: _xca(dt, 64, 196, 384, 8)),
            (f"xca xcit-s12 b4 (split) {n}", lambda dt=dt: _xca(dt, 4, 196, 384, 8)),
            # MViTv2-T at 224 px (timm): q / kv maps of stage 1 and the first block of stage 2
            (f"pool mvitv2-t s1 {n}", lambda dt=dt: _pool(dt, 8, 1, (56, 56), (14, 14), 96)),
            (f"pool mvitv2-t s2.0 {n}", lambda dt=dt: _pool(dt, 8, 2, (28, 28), (28, 28), 96)),
        ]
        if not quick:
            out += [
                (f"mix_ffn pvtv2-b2 s1 224 b64 {n}", lambda dt=dt: _mix_ffn(dt, 64, (56, 56), 512, 64)),
                (f"sr segformer-b2-512 s2 b8 (split bwd) {n}", lambda dt=dt: _sr(dt, 8, 2, 4096, 256, 64)),
                (f"pool mvitv2-t s4 {n}", lambda dt=dt: _pool(dt, 8, 8, (7, 7), (7, 7), 96)),
                (f"attention bias-keys d80 {n}", lambda dt=dt: _attention(dt, 2, 16, 257, 257, 80, "keys")),
                (f"attention d128 {n}", lambda dt=dt: _attention(dt, 2, 4, 300, 300, 128)),
                (
                    f"attention d128 single-kernel {n}",
                    lambda dt=dt: _attention(dt, 2, 4, 600, 600, 128, "keys", "fused"),
                ),
                (f"attention time {n}", lambda dt=dt: _attention(dt, 196, 12, 8, 8, 64)),
                (f"window swin-t s1 no-shift {n}", lambda dt=dt: _window(dt, 2, (56, 56), 96, 3, 7, 0)),
                (f"window d64 {n}", lambda dt=dt: _window(dt, 2, (28, 28), 256, 4, 7, 3)),
                (
                    f"window swinv2 cosine s1 64x64 M8 {n}",
                    lambda dt=dt: _window(dt, 2, (64, 64), 96, 3, 8, 4, cosine=True),
                ),
                (
                    f"window swinv2 cosine shift-first M12 {n}",
                    lambda dt=dt: _window(dt, 1, (90, 90), 128, 4, 12, 6, cosine=True, shift_first=True),
                ),
                (
                    f"window shift-first swin-t odd {n}",
                    lambda dt=dt: _window(dt, 2, (50, 38), 96, 3, 7, 3, shift_first=True),
                ),
                (f"attention keys-bias tma {n}", lambda dt=dt: _attention(dt, 2, 4, 100, 77, 32, "keys", tma="on")),
                # the TMA backward at ViT-B/384: the split dK/dV + dQ kernels, and the single kernel
                # ("auto" at 577 tokens)
                (
                    f"attention vit-b384 tma backward split {n}",
                    lambda dt=dt: _attention(dt, 2, 12, 577, 577, 64, tma="on"),
                ),
                (
                    f"attention vit-b384 tma backward single-kernel {n}",
                    lambda dt=dt: _attention(dt, 2, 12, 577, 577, 64, None, "fused", tma="on"),
                ),
                (f"dwconv k5 relu {n}", lambda dt=dt: _dwconv(dt, 2, (64, 64), 128, 5, "relu")),
                (f"dwconv k7 none {n}", lambda dt=dt: _dwconv(dt, 2, (32, 32), 320, 7, None)),
                (f"mix_ffn pvtv2-b2 s4 224 b64 {n}", lambda dt=dt: _mix_ffn(dt, 64, (7, 7), 2048, 512)),
                (f"sr pvtv2-b2 s2 {n}", lambda dt=dt: _sr(dt, 4, 2, 784, 49, 64)),
                (f"sr segformer-512 s2 d64 {n}", lambda dt=dt: _sr(dt, 2, 2, 4096, 256, 64)),
                (
                    f"space_time vivit time (ts) {n}",
                    lambda dt=dt: _space_time(dt, 1, 196, 16, 768, 12, "time", "ts", False),
                ),
                (f"xca d64 {n}", lambda dt=dt: _xca(dt, 8, 1000, 512, 8)),
                (f"xca d16 {n}", lambda dt=dt: _xca(dt, 2, 300, 64, 4)),
                (f"pool mvitv2-t s2 {n}", lambda dt=dt: _pool(dt, 8, 2, (28, 28), (14, 14), 96)),
                (f"pool mvitv2-t s3.0 {n}", lambda dt=dt: _pool(dt, 8, 4, (14, 14), (28, 28), 96)),
                (f"pool mvitv2-t s3 {n}", lambda dt=dt: _pool(dt, 8, 4, (14, 14), (14, 14), 96)),
                (f"pool mvitv2-t s4.0 {n}", lambda dt=dt: _pool(dt, 8, 8, (7, 7), (14, 14), 96)),
                (
                    f"pool cls d64 q14 k14 no-residual {n}",
                    lambda dt=dt: _pool(dt, 2, 4, (14, 14), (14, 14), 64, 1, 1, 0),
                ),
                (f"pool no tables {n}", lambda dt=dt: _pool(dt, 2, 2, (28, 28), (7, 7), 96, False, False)),
            ]
    return out


# -------------------------------------------------------------------------------------- compiling


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump <flag>`` of a cubin (the cuobjdump that ships beside Triton's ptxas), or None without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _ptxas_resources(cubin: bytes) -> dict:
    """Registers, stack frame (where ptxas puts spilled registers) and local bytes per thread of a cubin."""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", _cuobjdump(cubin, "-res-usage") or "")
    return {"registers": int(m[1]), "stack": int(m[2]), "local": int(m[3])} if m else {}


def _sass_ops(cubin: bytes) -> dict:
    """Instruction counts of a cubin's SASS by opcode: the total and the ones that tell how a kernel
    computes (FFMA / FMUL / MUFU: the ALU mix; HMMA: mma.sync; HGMMA: wgmma) and loads (LDGSTS:
    cp.async; UTMALDG: TMA). A runtime loop's body counts once."""
    text = _cuobjdump(cubin, "-sass")
    if text is None:
        return {}
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", text)
    return {
        "total": len(ops),
        **{op: ops.count(op) for op in ("FFMA", "FMUL", "MUFU", "HMMA", "HGMMA", "LDGSTS", "UTMALDG")},
    }


SASS = False  # --sass: add the SASS instruction counts to every row


def compile_one(launch) -> dict:
    fn, signature, constexprs, attrs, options = launch
    names = {path: fn.arg_names[path[0]] for path in constexprs}
    row = {
        "kernel": fn.fn.__name__,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "constexprs": {
            names[p]: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v))
            for p, v in constexprs.items()
        },
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "aligned": sorted(fn.arg_names[p[0]] for p in attrs),
    }
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per launch
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        return row
    row.update(
        ok=True,
        seconds=round(time.perf_counter() - t0, 2),
        shared=int(k.metadata.shared),
        **_ptxas_resources(k.asm["cubin"]),
    )
    if SASS:
        row["sass"] = _sass_ops(k.asm["cubin"])
    row["fits_smem"] = row["shared"] <= SM90_SMEM_PER_BLOCK
    return row


def _compile_index(i: int) -> dict:
    return compile_one(list(_LAUNCHES.values())[i])


def capture(quick: bool, only: str | None = None) -> list:
    _gpu_path_on_cpu()
    for name, run in scenarios(quick):
        if only and only not in name:
            continue
        try:
            run()
        except Exception as e:
            raise RuntimeError(f"capturing '{name}' failed") from e
    if not only:  # a new op's Triton module needs a scenario above (CONTRIBUTING.md, "Adding an op")
        launched = {key[0] for key in _LAUNCHES}
        missing = [name for name, mod in MODULES.items() if mod.__name__ not in launched]
        if missing:
            names = ", ".join(f"vitkernels.triton.{m}" for m in missing)
            raise RuntimeError(f"no scenario launches a kernel of {names}: add one to scenarios()")
    if quick:
        _drop_capped_twins()
    return list(_LAUNCHES.values())


def _drop_capped_twins():
    """--quick: a launch that differs from a recorded one only by its maxnreg is not compiled. The cap
    changes only ptxas's register allocation (it spills, it does not fail); the full run compiles it."""
    uncapped = {
        key[:5] + (str(dataclasses.replace(v[4], maxnreg=None)),)
        for key, v in _LAUNCHES.items()
        if v[4].maxnreg is None
    }
    for key, v in list(_LAUNCHES.items()):
        if v[4].maxnreg is not None and key[:5] + (str(dataclasses.replace(v[4], maxnreg=None)),) in uncapped:
            del _LAUNCHES[key]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="bf16 and the main model shapes only; a launch that differs from another only by maxnreg is skipped",
    )
    ap.add_argument("--json", help="write one row per compiled launch here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="only the scenarios whose name contains this text")
    ap.add_argument(
        "--sass",
        action="store_true",
        help="also count SASS instructions (total, FFMA, FMUL, MUFU, HMMA, HGMMA, LDGSTS, UTMALDG)",
    )
    a = ap.parse_args(argv)
    global SASS
    SASS = a.sass
    launches = capture(a.quick, a.only)
    # Forked workers inherit the recorded launches (JIT functions do not pickle); only indices travel.
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_index, range(len(launches))))
    bad = [r for r in rows if not r["ok"] or not r["fits_smem"]]
    print(f"triton {triton.__version__}: {len(rows)} distinct sm_90a launches compiled, {len(bad)} failed")
    for r in rows:
        status = "ok" if r["ok"] and r["fits_smem"] else ("SMEM" if r["ok"] else "FAIL")
        blocks = {k: v for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k in ("M", "K")}
        res = (
            f"regs {r.get('registers', '?')} stack {r.get('stack', '?')} smem {r['shared']}"
            if r["ok"]
            else r["error"].splitlines()[0][:160]
        )
        sass = " sass " + " ".join(f"{k} {v}" for k, v in r["sass"].items()) if r.get("sass") else ""
        print(f"  {status:4} {r['kernel']:28} w{r['num_warps']} s{r['num_stages']} {blocks} {res}{sass}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90a", "launches": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
