"""Benchmark cases for `vitkernels-bench ops`: every op at shapes taken from the real models.

A `Case` is one op at one shape: its tensor inputs (named as the op's parameters, so
`getattr(vitkernels, op)(**tensors, **args)` runs it), its non-tensor arguments, the shapes of its
outputs, and its cost:

* FLOPs are counted per op (the formulas of docs/<op>.md). Attention-like ops count the two matmuls,
  4·B·H·Nq·Nk·D forward; their backward is 2.5× the forward (the FlashAttention-2 convention), so
  forward+backward is 3.5× the forward. Ops whose backward is one "transposed" pass per input
  (xca, dwconv, mix_ffn) count backward = 2× forward.
* Bytes are the minimal HBM traffic: forward = every input read once + every output written once;
  backward adds every input and output-gradient read once and every input-gradient written once.

Shapes (batch sizes are the defaults; `--batch` overrides them):

* ViT-B/16 (C 768, 12 heads) at 224 (N 197, B 64) and 384 (N 577, B 32): `self_attention`, and
  `attention` (with a BEiT-style (heads, N, N) bias at 224).
* Swin-T and Swin-B at 224 (window 7, B 64) and Swin-B at 384 (window 12, B 32), stages 1-4:
  `window_attention` with shift = M/2 in stages 1-3 and none in stage 4 (there H = W = M), plus
  Swin-T stage 1 without shift; Swin-T stages 1-2 at 256 px in timm's shift-then-pad order (maps that
  are not window multiples: `shift_first`); Swin V2-T at 256 px (window 8, B 64), stages 1-4: cosine
  attention with `logit_scale`, timm's order.
* PVTv2-b2 and SegFormer-B2 (same attention: C 64/128/320/512, heads 1/2/5/8, sr 8/4/2/1) at 224
  (B 64; M = 49 in every stage) and 512 (B 8; M = 256): `sr_attention`; their Mix-FFN hidden widths
  (PVTv2-b2 ratio 8, SegFormer-B2 ratio 4): `dwconv` (GELU) and `mix_ffn`.
* XCiT-S12/16 (N 196, C 384, 8 heads, B 64): `xca`, and its LPI `dwconv`.
* TimeSformer-B 8×224 (S 196, T 8, C 768, 12 heads, B 8 clips, layout "st"): `space_time_attention`
  along time, and along space with the class token; ViViT-B (T 16, layout "ts", B 4): both axes.
* MViTv2-T at 224 (B 64; D 96; no class token): `pool_attention` at each distinct block shape, the
  first block of each stage (q pooled by 2 from the previous stage's map, k / v from that map) and the others;
  MViTv2-B with class token (`mvitv2_base_cls`): the stages' main blocks (MViTv2-B without it has
  MViTv2-T's shapes, only more blocks).

`representative` marks one or two cases per op (used for the expensive baselines and extra dtypes);
`tiny` marks the cases run on CPU (at batch 1).

Each op's spec (`OpSpec.bench.cases`, vitkernels/ops/<op>.py) points at its `<op>_cases(add)` below,
which adds its catalogue entries built by its case factory `<op>_case`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..ops import _spec

ATTENTION_BWD = 2.5  # FA2 convention: backward FLOPs = 2.5 x forward
PLAIN_BWD = 2.0  # one transposed pass per differentiable input

OPS = tuple(_spec.names())  # every op, in SPEC order (from the op specs)
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    init: str = "randn"  # randn | fan_in (randn / sqrt(last dim)) | dw (randn / k) | ones | log10 (ln 10 + 0.1·randn)
    diff: bool = True  # differentiated in fwd+bwd mode


@dataclass
class Case:
    op: str
    label: str  # e.g. "swin_t s1@224"
    model: str  # the real model the shape comes from
    batch: int
    tensors: dict  # name -> TensorSpec, in the op's parameter order
    args: dict  # the op's non-tensor arguments
    outputs: tuple  # output shapes, in the order the op returns them
    shape: dict  # what the results file records as "shape"
    flops: float  # forward FLOPs
    bwd_factor: float  # backward FLOPs / forward FLOPs
    unit: str = "tensor"  # "tensor" (matmul-bound) or "vector" (CUDA-core FMAs, e.g. dwconv)
    representative: bool = False
    tiny: bool = False
    factory: Optional[Callable[[int], Case]] = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.op}:{self.label}"

    def with_batch(self, batch: int) -> Case:
        """The same case at another batch size."""
        if self.factory is None or batch == self.batch:
            return self
        new = self.factory(batch)
        return replace(new, representative=self.representative, tiny=self.tiny, factory=self.factory)

    def flops_for(self, mode: str) -> float:
        return self.flops * (1.0 + self.bwd_factor if mode == "fwd+bwd" else 1.0)

    def bytes_for(self, mode: str, element_size: int) -> float:
        ins = sum(math.prod(s.shape) for s in self.tensors.values())
        outs = sum(math.prod(o) for o in self.outputs)
        total = ins + outs
        if mode == "fwd+bwd":
            grads = sum(math.prod(s.shape) for s in self.tensors.values() if s.diff)
            total += ins + outs + grads  # read inputs and output grads, write input grads
        return float(total * element_size)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def make_inputs(
    case: Case,
    dtype: torch.dtype,
    device,
    generator: Optional[torch.Generator] = None,
    requires_grad: bool = False,
    empty: bool = False,
) -> dict:
    """Fresh random tensors for `case` (never zeros: they can hide bugs and run faster than real data).
    Drawn on the generator's device (a CUDA generator keeps large inputs off the host)."""
    out = {}
    for name, spec in case.tensors.items():
        if empty:
            t = torch.empty(spec.shape, dtype=dtype, device=device)
        else:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            t = torch.randn(spec.shape, generator=generator, dtype=torch.float32, device=gen_device)
            if spec.init == "fan_in":
                t = t / math.sqrt(spec.shape[-1])
            elif spec.init == "dw":
                t = t / spec.shape[-1]
            elif spec.init == "ones":
                t = torch.ones(spec.shape, device=gen_device)
            elif spec.init == "log10":  # Swin V2's logit_scale at init, ln 10, spread a little per head
                t = math.log(10.0) + 0.1 * t
            t = t.to(device=device, dtype=dtype)
        out[name] = t.requires_grad_(requires_grad and spec.diff)
    return out


# ----------------------------------------------------------------------------- one factory per op


def attention_case(label, model, batch, heads, n, d, bias):
    tensors = {
        "q": TensorSpec((batch, heads, n, d)),
        "k": TensorSpec((batch, heads, n, d)),
        "v": TensorSpec((batch, heads, n, d)),
    }
    if bias:
        tensors["bias"] = TensorSpec((heads, n, n))
    shape = {"B": batch, "heads": heads, "Nq": n, "Nk": n, "D": d, "bias": f"({heads}, {n}, {n})" if bias else None}
    return Case(
        "attention",
        label,
        model,
        batch,
        tensors,
        {},
        ((batch, heads, n, d),),
        shape,
        4.0 * batch * heads * n * n * d,
        ATTENTION_BWD,
    )


def self_attention_case(label, model, batch, n, c, heads):
    return Case(
        "self_attention",
        label,
        model,
        batch,
        {"qkv": TensorSpec((batch, n, 3 * c))},
        {"num_heads": heads},
        ((batch, n, c),),
        {"B": batch, "N": n, "C": c, "heads": heads, "D": c // heads},
        4.0 * batch * heads * n * n * (c // heads),
        ATTENTION_BWD,
    )


def window_attention_case(label, model, batch, h, w, c, heads, window, shift, shift_first=False, cosine=False):
    """Swin (V1: scaled dot product; `cosine`: V2's cosine attention with a per-head logit_scale); timm
    shifts before padding (`shift_first`), the original Swin / HF pad first."""
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    tensors = {
        "qkv": TensorSpec((batch, h * w, 3 * c)),
        "rel_pos_bias_table": TensorSpec(((2 * window - 1) ** 2, heads)),
        "qkv_bias": TensorSpec((3 * c,)),
    }
    args = {"hw": (h, w), "num_heads": heads, "window_size": window, "shift_size": shift}
    if cosine:
        tensors["logit_scale"] = TensorSpec((heads,), init="log10")
    if shift_first:
        args["shift_first"] = True
    shape = {
        "B": batch,
        "H": h,
        "W": w,
        "C": c,
        "heads": heads,
        "D": c // heads,
        "window": window,
        "shift": shift,
        "shift_first": shift_first,
        "cosine": cosine,
    }
    # 4·B·nW·heads·(M²)²·D = 4·B·Hp·Wp·M²·C
    return Case(
        "window_attention",
        label,
        model,
        batch,
        tensors,
        args,
        ((batch, h * w, c),),
        shape,
        4.0 * batch * hp * wp * window * window * c,
        ATTENTION_BWD,
    )


def sr_attention_case(label, model, batch, n, m, c, heads):
    return Case(
        "sr_attention",
        label,
        model,
        batch,
        {"q": TensorSpec((batch, n, c)), "kv": TensorSpec((batch, m, 2 * c))},
        {"num_heads": heads},
        ((batch, n, c),),
        {"B": batch, "N": n, "M": m, "C": c, "heads": heads, "D": c // heads},
        4.0 * batch * n * m * c,
        ATTENTION_BWD,
    )


def xca_case(label, model, batch, n, c, heads):
    d = c // heads
    return Case(
        "xca",
        label,
        model,
        batch,
        {"qkv": TensorSpec((batch, n, 3 * c)), "temperature": TensorSpec((heads, 1, 1), init="ones")},
        {"num_heads": heads},
        ((batch, n, c),),
        {"B": batch, "N": n, "C": c, "heads": heads, "D": d},
        4.0 * batch * n * c * d,
        PLAIN_BWD,
    )


def space_time_case(label, model, batch, s, t, c, heads, axis, cls, layout="st"):
    d = c // heads
    tensors = {"qkv": TensorSpec((batch, s * t, 3 * c))}
    outputs = ((batch, s * t, c),)
    if cls:
        tensors["cls_qkv"] = TensorSpec((batch, 3 * c))
        outputs += ((batch, t, c),)
    if axis == "time":
        flops = 4.0 * batch * s * heads * t * t * d
    else:
        sp = s + (1 if cls else 0)
        flops = 4.0 * batch * t * heads * sp * sp * d
    return Case(
        "space_time_attention",
        label,
        model,
        batch,
        tensors,
        {"frames": t, "num_heads": heads, "axis": axis, "layout": layout},
        outputs,
        {"B": batch, "S": s, "T": t, "C": c, "heads": heads, "D": d, "axis": axis, "cls": cls, "layout": layout},
        flops,
        ATTENTION_BWD,
    )


def dwconv_case(label, model, batch, h, w, c, k=3, activation="gelu"):
    return Case(
        "dwconv",
        label,
        model,
        batch,
        {"x": TensorSpec((batch, h * w, c)), "weight": TensorSpec((c, 1, k, k), init="dw"), "bias": TensorSpec((c,))},
        {"hw": (h, w), "activation": activation},
        ((batch, h * w, c),),
        {"B": batch, "H": h, "W": w, "C": c, "k": k, "activation": activation},
        2.0 * k * k * batch * h * w * c,
        PLAIN_BWD,
        unit="vector",
    )


def mix_ffn_case(label, model, batch, h, w, c, hidden, extra_relu=False, k=3):
    n = h * w
    tensors = {
        "x": TensorSpec((batch, n, c)),
        "fc1_weight": TensorSpec((hidden, c), init="fan_in"),
        "fc1_bias": TensorSpec((hidden,)),
        "dw_weight": TensorSpec((hidden, 1, k, k), init="dw"),
        "dw_bias": TensorSpec((hidden,)),
        "fc2_weight": TensorSpec((c, hidden), init="fan_in"),
        "fc2_bias": TensorSpec((c,)),
    }
    flops = 2.0 * batch * n * c * hidden + 2.0 * k * k * batch * n * hidden + 2.0 * batch * n * hidden * c
    return Case(
        "mix_ffn",
        label,
        model,
        batch,
        tensors,
        {"hw": (h, w), "extra_relu": extra_relu},
        ((batch, n, c),),
        {"B": batch, "H": h, "W": w, "C": c, "hidden": hidden, "C_out": c, "extra_relu": extra_relu},
        flops,
        PLAIN_BWD,
    )


def pool_attention_case(label, model, batch, heads, q_hw, k_hw, d, cls=False, residual=True, tables=True):
    """MViTv2 pooling attention: q of the pooled q map q_hw, k / v of the pooled kv map k_hw, the
    decomposed rel-pos tables at timm's length 2·max(q, k) − 1 (scaled like timm's init: q·table ~ 1)."""
    (qh, qw), (kh, kw) = q_hw, k_hw
    sp = 1 if cls else 0
    nq, nk = qh * qw + sp, kh * kw + sp
    tensors = {
        "q": TensorSpec((batch, heads, nq, d)),
        "k": TensorSpec((batch, heads, nk, d)),
        "v": TensorSpec((batch, heads, nk, d)),
    }
    if tables:
        tensors["rel_pos_h"] = TensorSpec((2 * max(qh, kh) - 1, d), init="fan_in")
        tensors["rel_pos_w"] = TensorSpec((2 * max(qw, kw) - 1, d), init="fan_in")
    args = {"q_hw": (qh, qw), "k_hw": (kh, kw), "has_cls_token": cls, "residual": residual}
    shape = {"B": batch, "heads": heads, "q_hw": f"{qh}x{qw}", "k_hw": f"{kh}x{kw}", "Nq": nq, "Nk": nk, "D": d}
    shape.update(cls=cls, residual=residual, tables=tables)
    # the two attention matmuls, plus the rel terms: q_i against k_h rows of rel_pos_h and k_w of rel_pos_w
    flops = 4.0 * batch * heads * nq * nk * d + (2.0 * batch * heads * nq * (kh + kw) * d if tables else 0.0)
    return Case(
        "pool_attention", label, model, batch, tensors, args, ((batch, nq, heads * d),), shape, flops, ATTENTION_BWD
    )


# ----------------------------------------------------------------------------- the catalogue
# One function per op (its spec's `bench.cases`): add(factory(batch) -> Case, default batch,
# representative=False, tiny=False) for each of its cases, in the order they are listed.

_VIT = "vit_base_patch16_224"
_PVT_DIMS, _PVT_HEADS, _PVT_SR = (64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2, 1)  # PVTv2-b2 / SegFormer-B2 stages
_MIX_FFN = (("pvt_v2_b2", "pvt_v2_b2", 8), ("segformer_b2", "segformer_b2", 4))  # family, model, hidden ratio


def attention_cases(add):
    add(lambda b: attention_case("vit_b16@224 +bias", _VIT, b, 12, 197, 64, True), 64, representative=True, tiny=True)
    add(lambda b: attention_case("vit_b16@384", "vit_base_patch16_384", b, 12, 577, 64, False), 32)


def self_attention_cases(add):
    add(lambda b: self_attention_case("vit_b16@224", _VIT, b, 197, 768, 12), 64, representative=True, tiny=True)
    # representative too: 577 tokens is where "auto" runs the single-kernel attention backward
    add(lambda b: self_attention_case("vit_b16@384", "vit_base_patch16_384", b, 577, 768, 12), 32, representative=True)


def window_attention_cases(add):
    swins = (
        ("swin_t", "swin_tiny_patch4_window7_224", 224, 7, 96, (3, 6, 12, 24), 64),
        ("swin_b", "swin_base_patch4_window7_224", 224, 7, 128, (4, 8, 16, 32), 64),
        ("swin_b", "swin_base_patch4_window12_384", 384, 12, 128, (4, 8, 16, 32), 32),
    )
    for short, model, res, m, c0, heads, batch in swins:
        for i in range(4):
            hw, c = res // 4 // 2**i, c0 * 2**i
            window = min(m, hw)
            shift = window // 2 if hw > m else 0  # timm: no shift once the map fits one window

            def f(b, hw=hw, c=c, h=heads[i], window=window, shift=shift, i=i, short=short, res=res, model=model):
                return window_attention_case(f"{short} s{i + 1}@{res}", model, b, hw, hw, c, h, window, shift)

            add(f, batch, representative=(short == "swin_t" and i == 0), tiny=(short == "swin_t" and i == 2))
    add(
        lambda b: window_attention_case(
            "swin_t s1@224 no-shift", "swin_tiny_patch4_window7_224", b, 56, 56, 96, 3, 7, 0
        ),
        64,
    )
    # timm's order on maps that are not window multiples (Swin-T at 256 px: 64 -> 70 padded), and
    # Swin V2-T at 256 px (window 8; cosine attention, logit_scale, the cpb table), timm's order too
    add(
        lambda b: window_attention_case(
            "swin_t s1@256 shift-first", "swin_tiny_patch4_window7_224", b, 64, 64, 96, 3, 7, 3, shift_first=True
        ),
        64,
    )
    add(
        lambda b: window_attention_case(
            "swin_t s2@256 shift-first", "swin_tiny_patch4_window7_224", b, 32, 32, 192, 6, 7, 3, shift_first=True
        ),
        64,
    )
    for i, (hw, c, h) in enumerate(((64, 96, 3), (32, 192, 6), (16, 384, 12), (8, 768, 24))):

        def f(b, hw=hw, c=c, h=h, i=i):
            return window_attention_case(
                f"swinv2_t s{i + 1}@256",
                "swinv2_tiny_window8_256",
                b,
                hw,
                hw,
                c,
                h,
                8,
                4 if hw > 8 else 0,
                shift_first=True,
                cosine=True,
            )

        add(f, 64, representative=(i == 0), tiny=(i == 3))


def sr_attention_cases(add):
    for res, batch in ((224, 64), (512, 8)):
        for i in range(4):
            hw = res // 4 // 2**i
            red = hw // _PVT_SR[i]

            def f(b, hw=hw, red=red, i=i, res=res):
                return sr_attention_case(
                    f"pvt_v2_b2|segformer_b2 s{i + 1}@{res}",
                    "pvt_v2_b2",
                    b,
                    hw * hw,
                    red * red,
                    _PVT_DIMS[i],
                    _PVT_HEADS[i],
                )

            add(f, batch, representative=(i == 0), tiny=(res == 224 and i == 2))


def xca_cases(add):
    add(
        lambda b: xca_case("xcit_s12_16@224", "xcit_small_12_p16_224", b, 196, 384, 8),
        64,
        representative=True,
        tiny=True,
    )


def space_time_attention_cases(add):
    ts = "timesformer_base_patch16_224"
    add(
        lambda b: space_time_case("timesformer_b 8x224 time", ts, b, 196, 8, 768, 12, "time", False),
        8,
        representative=True,
        tiny=True,
    )
    add(
        lambda b: space_time_case("timesformer_b 8x224 space+cls", ts, b, 196, 8, 768, 12, "space", True),
        8,
        representative=True,
        tiny=True,
    )
    vv = "vivit_base_factorized"  # 32 frames, tubelet 2 -> T = 16; layout "ts": time is interleaved
    add(lambda b: space_time_case("vivit_b 16x224 time (ts)", vv, b, 196, 16, 768, 12, "time", False, "ts"), 4)
    add(lambda b: space_time_case("vivit_b 16x224 space (ts)", vv, b, 196, 16, 768, 12, "space", False, "ts"), 4)


# MViTv2 at 224 px (timm: patch stride 4, stride_q 1/2/2/2, adaptive kv stride 4/2/1/1, D = 96, heads 1/2/4/8):
# (label suffix, heads, q map, kv map). The first block of stages 2-4 pools q by 2 from the previous
# stage's map while k / v are pooled at the new stage's stride from that same map.
_MVIT_BLOCKS = (
    ("s1", 1, 56, 14),
    ("s2.0", 2, 28, 28),
    ("s2", 2, 28, 14),
    ("s3.0", 4, 14, 28),
    ("s3", 4, 14, 14),
    ("s4.0", 8, 7, 14),
    ("s4", 8, 7, 7),
)


def pool_attention_cases(add):
    for tag, heads, q, k in _MVIT_BLOCKS:

        def f(b, tag=tag, heads=heads, q=q, k=k):
            return pool_attention_case(f"mvitv2_t {tag}@224", "mvitv2_tiny", b, heads, (q, q), (k, k), 96)

        add(f, 64, representative=(tag == "s1"), tiny=(tag == "s4"))
    for tag, heads, q, k in _MVIT_BLOCKS:
        if "." in tag:
            continue

        def g(b, tag=tag, heads=heads, q=q, k=k):
            return pool_attention_case(f"mvitv2_b_cls {tag}@224", "mvitv2_base_cls", b, heads, (q, q), (k, k), 96, True)

        add(g, 64)


def _mix_ffn_stages():
    """(family, model, ratio, res, batch, stage, hw, representative, tiny) of every Mix-FFN stage."""
    for family, model, ratio in _MIX_FFN:
        for res, batch in ((224, 64), (512, 8)):
            for i in range(4):
                rep = family == "segformer_b2" and res == 512 and i == 0
                tiny = family == "segformer_b2" and res == 224 and i == 2
                yield family, model, ratio, res, batch, i, res // 4 // 2**i, rep, tiny


def dwconv_cases(add):
    for family, model, ratio, res, batch, i, hw, rep, tiny in _mix_ffn_stages():

        def f(b, hw=hw, i=i, res=res, family=family, model=model, ratio=ratio):
            return dwconv_case(f"{family} s{i + 1}@{res}", model, b, hw, hw, _PVT_DIMS[i] * ratio)

        add(f, batch, representative=rep, tiny=tiny)
    add(lambda b: dwconv_case("xcit_s12_16@224 lpi", "xcit_small_12_p16_224", b, 14, 14, 384), 64)


def mix_ffn_cases(add):
    for family, model, ratio, res, batch, i, hw, rep, tiny in _mix_ffn_stages():

        def g(b, hw=hw, i=i, res=res, family=family, model=model, ratio=ratio):
            return mix_ffn_case(f"{family} s{i + 1}@{res}", model, b, hw, hw, _PVT_DIMS[i], _PVT_DIMS[i] * ratio)

        add(g, batch, representative=rep, tiny=tiny)


_CATALOG: list = []  # (factory(batch) -> Case, default batch, representative, tiny), built on first use


def _catalog() -> list:
    if not _CATALOG:
        entries = []
        for spec in _spec.specs():

            def add(factory, batch, representative=False, tiny=False):
                entries.append((factory, batch, representative, tiny))

            _spec.resolve(spec.bench.cases)(add)
        _CATALOG[:] = entries
    return _CATALOG


def all_cases(batch: Optional[int] = None, tiny: bool = False) -> list:
    """Every case, in catalogue order. `tiny`: only the CPU cases, at batch 1 (or `batch`)."""
    cases = []
    for factory, default_batch, rep, is_tiny in _catalog():
        if tiny and not is_tiny:
            continue
        b = batch if batch is not None else (1 if tiny else default_batch)
        case = replace(factory(b), representative=rep, tiny=is_tiny, factory=factory)
        cases.append(case)
    order = {op: i for i, op in enumerate(OPS)}
    return sorted(cases, key=lambda c: order[c.op])  # stable: catalogue order within an op


def select_cases(cases: list, ops=None, patterns=None, representative: bool = False) -> list:
    """Filter by op names, by substrings of the label or model name, and to the representative cases."""
    out = []
    for c in cases:
        if ops and c.op not in ops:
            continue
        if patterns and not any(p.lower() in c.label.lower() or p.lower() in c.model.lower() for p in patterns):
            continue
        if representative and not c.representative:
            continue
        out.append(c)
    return out


# ----------------------------------------------------------------------------- backend selection


def public_args(case: Case, t: dict) -> tuple:
    """The public op's positional arguments for `case` on tensors `t` (schema order, defaults filled)."""
    from .. import backends

    args, rest = backends.complete_args(case.op, (), {**t, **case.args})
    if rest:
        raise ValueError(f"{case.op}: no parameters named {sorted(rest)}")
    return args


# No kernel's capabilities depend on the scale: a stand-in for the resolved default.
_SELECT_SCALE = 1.0


def select_args(case: Case, t: dict) -> tuple:
    """The arguments the op's private forward passes to `vitkernels.backends.select`: its spec's
    mapping of the public arguments (`OpSpec.private`)."""
    spec = _spec.get(case.op)
    if spec.private is None:
        raise ValueError(f"no select arguments for {case.op}: a composite (see backend_that_runs)")
    return spec.private(public_args(case, t), _SELECT_SCALE)


def backend_that_runs(case: Case, t: dict, choice: str = "auto", backward: bool = False) -> str:
    """Name of the backend that runs `case` on tensors `t` under backend `choice` (raises
    BackendUnavailableError like the op would). A composite names what it runs and its parts'
    backends ("linear+dwconv:triton")."""
    from .. import backends, use_backend

    spec = _spec.get(case.op)
    with use_backend(choice):
        if spec.parts is not None:
            chosen = [
                backends.select(part, *part_args, backward=backward).backend
                for part, part_args in spec.parts(*public_args(case, t))
            ]
            return f"{spec.bench.composite_label}:" + "/".join(chosen)
        return backends.select(case.op, *select_args(case, t), backward=backward).backend
