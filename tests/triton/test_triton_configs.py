"""Every autotune config of every Triton kernel computes the right result, not just the one the
tuner happens to pick on the machine at hand.

On a GPU the launchers autotune: each call benchmarks the configs its pruner keeps and runs the
fastest, so the others are never checked (and the other tests run only the first, see
conftest.py). Here ``Autotuner.run`` is replaced by a forcer that runs config ``i`` of every tuner
an op calls (``i`` modulo that tuner's count), and the op runs once per ``i`` until every config
of every tuner has run; outputs and gradients are compared with the float64 reference (2× eager
rule, the reference backend in the same dtype being "eager").

Without a GPU the same configs run in the Triton interpreter: the launchers are made to take
their GPU path on CPU tensors (``use_fixed`` → False, a 2-SM ``sm_count`` so that heads split
into chunks), so each config's block sizes, masks and EVEN_* paths are exercised on CPU too. There
configs that differ only in warps, stages or maxnreg (which the interpreter ignores) run once.
"""

import importlib

import pytest
import torch

import vitkernels as vk
from vitkernels.ops import _spec

from helpers import ConfigForcer, assert_within, device_marks, grads, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

# Every vitkernels.triton module an op's Triton kernels launch from (the op specs' triton_modules).
MODULES = {
    name: importlib.import_module(f"vitkernels.triton.{name}")
    for name in dict.fromkeys(m for s in _spec.specs() for m in s.triton_modules)
}


@pytest.fixture
def forcer(monkeypatch):
    f = ConfigForcer(distinct=_INTERPRET)
    f.install(monkeypatch.setattr)
    if _INTERPRET:  # take the autotuned GPU path in the interpreter
        for mod in MODULES.values():
            monkeypatch.setattr(mod, "use_fixed", lambda t, interpreted, what: False)
            if hasattr(mod, "sm_count"):  # the launchers that size grids by the SM count
                monkeypatch.setattr(mod, "sm_count", lambda device: 2)
    return f


def check_every_config(forcer, fn, inputs, dtype):
    """Run ``fn`` (an op on the "triton" backend) once per config index; compare each run."""
    with vk.use_backend("reference"):
        cot = torch.randn(fn(*[t.double() for t in inputs]).shape, dtype=torch.float64)
        oracle = grads(fn, [t.double() for t in inputs], cot)
        eager = grads(fn, [t.to(dtype) for t in inputs], cot)
    low = [t.to(device=DEVICE, dtype=dtype) for t in inputs]
    index, total = 0, 1
    while index < total:
        forcer.index, forcer.counts = index, {}
        with vk.use_backend("triton"):
            got = grads(fn, low, cot.to(DEVICE))
        assert forcer.counts, "no autotuned kernel ran"
        total = max(forcer.counts.values())
        for name, g, e, o in zip(["out"] + [f"grad{i}" for i in range(len(inputs))], got, eager, oracle):
            assert_within(f"config {index} {name}", g, e, o, dtype)
        index += 1
    return total


CASES = {
    # op: (function of the differentiable inputs, input shapes); shapes big enough that the pruners
    # keep the large tiles (N ≥ 128 for attention, M = 12 windows) and heads split into chunks.
    "attention+bias": (
        lambda q, k, v, b: vk.attention(q, k, v, b),
        [(1, 2, 130, 32), (1, 2, 150, 32), (1, 2, 150, 32), (1, 150)],
    ),
    # the single-kernel backward (CASE_ENV), both dQ variants, with a key-padding bias's dbias
    "attention+bias single-kernel": (
        lambda q, k, v, b: vk.attention(q, k, v, b),
        [(1, 2, 150, 32), (1, 2, 140, 32), (1, 2, 140, 32), (1, 140)],
    ),
    "attention+bias single-kernel deterministic": (
        lambda q, k, v, b: vk.attention(q, k, v, b),
        [(1, 2, 150, 32), (1, 2, 140, 32), (1, 2, 140, 32), (1, 140)],
    ),
    # the Hopper forward through TMA descriptors (CASE_ENV; 16-bit only, fp32 runs the pointer kernel)
    "attention+bias tma": (
        lambda q, k, v, b: vk.attention(q, k, v, b),
        [(1, 2, 130, 32), (1, 2, 150, 32), (1, 2, 150, 32), (1, 150)],
    ),
    "self_attention": (lambda x: vk.self_attention(x, 2), [(1, 200, 3 * 64)]),
    "window_attention M7": (
        lambda x, t, b: vk.window_attention(x, (14, 13), 2, 7, 3, t, b),
        [(1, 14 * 13, 3 * 64), (169, 2), (3 * 64,)],
    ),
    "window_attention M12": (
        lambda x, t, b: vk.window_attention(x, (12, 12), 1, 12, 6, t, b),
        [(1, 144, 3 * 32), (529, 1), (3 * 32,)],
    ),
    # Swin V2 cosine attention in timm's shift-then-pad order on a padded map (the COSINE and
    # SHIFT_FIRST kernel variants); logit_scale (heads,) around ln 10, one head clamped.
    "window_attention M7 cosine shift_first": (
        lambda x, t, b, ls: vk.window_attention(x, (14, 13), 2, 7, 3, t, b, logit_scale=ls, shift_first=True),
        [(1, 14 * 13, 3 * 64), (169, 2), (3 * 64,), (2,)],
    ),
    "sr_attention": (lambda q, kv: vk.sr_attention(q, kv, 1), [(1, 300, 64), (1, 49, 128)]),
    # The split backward (beyond the on-chip one): M = 200 keys of D = 64, and M = 260 keys of
    # D = 32 (2 heads) for the tiles kept only at BLOCK_D 32. M > 128 keeps the 128-key tiles; M and
    # N are ragged for every BLOCK_N, BLOCK_M and for the 2 chunks per head.
    "sr_attention split": (lambda q, kv: vk.sr_attention(q, kv, 1), [(1, 300, 64), (1, 200, 128)]),
    "sr_attention split d32": (lambda q, kv: vk.sr_attention(q, kv, 2), [(1, 130, 64), (1, 260, 128)]),
    "xca split": (lambda x, t: vk.xca(x, 1, t), [(1, 300, 3 * 48), (1, 1, 1)]),
    # the time axis: 20 interleaved 8-frame sequences per head, packed (32- and 64-row tiles)
    "space_time_attention time": (lambda x: vk.space_time_attention(x, 8, 2, "time", layout="ts"), [(1, 160, 192)]),
    "space_time_attention cls": (
        lambda x, c: torch.cat([o.flatten(1) for o in vk.space_time_attention(x, 2, 2, "space", c)], 1),
        [(1, 2 * 70, 3 * 64), (1, 3 * 64)],
    ),
    # a 6×18 map keeps every tile the pruner allows at C = 64 (BLOCK_H up to 8, BLOCK_W up to 32)
    "dwconv": (lambda x, w, b: vk.dwconv(x, (6, 18), w, b, "gelu"), [(1, 108, 64), (64, 1, 3, 3), (64,)]),
    # MViTv2 pooling attention: Nq = 137 (two dK/dV query chunks), Nk = 69, a 67-row rel_pos_h (BLOCK_L 128).
    "pool_attention cls": (
        lambda q, k, v, th, tw: vk.pool_attention(q, k, v, (34, 4), (17, 4), th, tw, has_cls_token=True),
        [(1, 1, 137, 32), (1, 1, 69, 32), (1, 1, 69, 32), (67, 32), (7, 32)],
    ),
    # the fused dwconv + GELU + fc2 kernel: a 9×12 map, hidden 40 and C_out 72 ragged against every
    # tile (8×16 tokens, 128 output channels, 64-channel hidden chunks are kept); backward: dwconv's
    "mix_ffn fused": (
        lambda x, w1, b1, dw, db, w2, b2: vk.mix_ffn(x, (9, 12), w1, b1, dw, db, w2, b2),
        [(1, 108, 8), (40, 8), (40,), (40, 1, 3, 3), (40,), (72, 40), (72,)],
    ),
}


# Environment switches a case runs under (set for its forward and backward).
CASE_ENV = {
    "attention+bias single-kernel": {"VITKERNELS_ATTN_BWD_KERNEL": "fused"},
    "attention+bias single-kernel deterministic": {"VITKERNELS_ATTN_BWD_KERNEL": "fused-deterministic"},
    "attention+bias tma": {"VITKERNELS_ATTN_TMA": "on"},
}


def _op(case: str) -> str:
    """The op a CASES key exercises: its first word, up to a "+"."""
    return case.split()[0].split("+")[0]


def test_every_op_with_triton_kernels_has_a_case():
    """A new op with Triton kernels adds its CASES entry here (CONTRIBUTING.md, "Adding an op")."""
    assert {_op(c) for c in CASES} <= set(_spec.names())
    assert {s.name for s in _spec.specs() if s.triton_modules} <= {_op(c) for c in CASES}


# The interpreter checks the fp32 and the 16-bit config lists; a GPU compiles every config it runs,
# so there only bf16, the dtype the models train and serve in, keeps the run to a few minutes.
CONFIG_DTYPES = DTYPES if _INTERPRET else [torch.bfloat16]


@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_every_autotune_config(case, dtype, forcer, monkeypatch):
    for name, value in CASE_ENV.get(case, {}).items():
        monkeypatch.setenv(name, value)
    fn, shapes = CASES[case]
    inputs = [torch.randn(s) for s in shapes]
    if case.startswith("attention+bias"):
        inputs[3] = inputs[3][:, None, None, :]  # a key-padding style (B, 1, 1, Nk) bias
    if case.startswith("xca"):
        inputs[1] = inputs[1].abs() + 0.5
    if "cosine" in case:
        if _INTERPRET and dtype == torch.float16:
            pytest.skip("float32 covers the cosine variant's configs in the interpreter (CPU time)")
        inputs[3] = torch.tensor([2.3, 4.9])
    configs = check_every_config(forcer, fn, inputs, dtype)
    assert configs >= 2, f"only {configs} config(s) ran: the shapes no longer reach the tuned tiles"
