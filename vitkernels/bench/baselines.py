"""What a user would otherwise run, for each op: the baselines of `vitkernels-bench ops`.

Every implementation takes the same named tensors as the op (see cases.py) and returns what the op
returns, starting from the same layout, so layout copies are part of what is timed:

* ``vitkernels``  the public op (`vitkernels.<op>`) under the chosen backend ("auto" by default).
* ``eager``       timm's code path in eager PyTorch: the reshape/permute of the packed projection,
                  q·kᵀ, softmax, ·v, the transpose back; for Swin also pad, torch.roll, window
                  partition, the relative-position-bias gather, the (nW, N, N) shift mask and the
                  reverse; for TimeSformer the rearranges and the class-token concat.
* ``sdpa``        the same layout code around `F.scaled_dot_product_attention` (default dispatch);
  ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``: SDPA forced to one backend (CUDA only;
                  skipped where that backend refuses the inputs, e.g. flash with a bias).
* ``flex``        FlexAttention (`torch.nn.attention.flex_attention`), compiled with the layout code,
                  with the bias / shift mask as a score_mod (CUDA only; not for xca, dwconv, mix_ffn);
                  for pool_attention the score_mod reads the small precomputed rel terms.
* ``compile``     `torch.compile` of the eager composition (fullgraph, static shapes).

Buffers that timm keeps as module buffers (Swin's relative_position_index and shift mask) are built
once, outside the timed region, as timm builds them at construction.

Each op's spec (`OpSpec.bench`, vitkernels/ops/<op>.py) points at its `<op>_composition` below and says
whether an SDPA / FlexAttention formulation exists.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import _spec
from .cases import Case

IMPLS = ("vitkernels", "eager", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "compile")
BASELINES = IMPLS[1:]
SDPA_FORCED = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
COMPILED = ("flex", "compile")


class Unsupported(Exception):
    """This implementation cannot run this case here (the message says why)."""


@dataclass
class Impl:
    name: str
    fn: Callable[[dict], object]  # named tensors -> output tensor or tuple of tensors
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    compiled: bool = False


def applies(impl: str, op: str) -> Optional[str]:
    """None when `impl` is meaningful for `op`, else the reason it is not."""
    if impl in ("vitkernels", "eager", "compile"):
        return None
    bench = _spec.get(op).bench  # does the op's core have a softmax attention SDPA / FlexAttention can run?
    if impl.startswith("sdpa"):
        return None if bench.sdpa else f"{op} is not an attention: no SDPA formulation"
    if impl == "flex":
        return bench.no_flex if bench.sdpa else f"{op} is not an attention: no FlexAttention formulation"
    return f"unknown implementation {impl!r}"


# ----------------------------------------------------------------------------- attention cores
# q, k, v: (..., heads, N, D). `bias` is an additive score bias broadcastable to the scores.


def _core_eager(q, k, v, scale, bias=None):
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


def _core_sdpa(q, k, v, scale, bias=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as e:  # torch < 2.5
        raise Unsupported(f"FlexAttention is not available in torch {torch.__version__} ({type(e).__name__})") from None
    return flex_attention


def _make_core_flex():
    """The FlexAttention core; flex_attention is looked up here, outside the compiled region."""
    flex_attention = _flex_attention()

    def core(q, k, v, scale, bias=None):
        """`bias` None or (heads, Nq, Nk): added through a score_mod."""
        if bias is None:
            return flex_attention(q, k, v, scale=scale)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)

    return core


_CORES = {"eager": lambda: _core_eager, "sdpa": lambda: _core_sdpa, "flex": _make_core_flex}


# ----------------------------------------------------------------------------- compositions per op
# One builder per op (its spec's `bench.baseline`): (case, *, core, core_name, dtype, device) -> fn(tensors).


def attention_composition(case: Case, core, **_):
    def fn(t):
        q = t["q"]
        return core(q, t["k"], t["v"], q.shape[-1] ** -0.5, t.get("bias"))

    return fn


def _split_heads(x, heads, parts):
    """timm: (B, N, parts·C) -> `parts` tensors (B, heads, N, D) (reshape + permute, no copy yet)."""
    b, n, pc = x.shape
    return x.reshape(b, n, parts, heads, pc // parts // heads).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(x):
    """timm: (B, heads, N, D) -> (B, N, C) with `transpose(1, 2).reshape` (a copy)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def self_attention_composition(case: Case, core, **_):
    heads = case.args["num_heads"]

    def fn(t):
        q, k, v = _split_heads(t["qkv"], heads, 3)
        return _merge_heads(core(q, k, v, q.shape[-1] ** -0.5))

    return fn


def sr_attention_composition(case: Case, core, **_):
    heads = case.args["num_heads"]

    def fn(t):
        b, n, c = t["q"].shape  # timm PVTv2 Attention: q reshape/permute, kv reshape/permute/unbind
        q = t["q"].reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
        k, v = _split_heads(t["kv"], heads, 2)
        return _merge_heads(core(q, k, v, q.shape[-1] ** -0.5))

    return fn


def xca_composition(case: Case, core_name, **_):
    heads = case.args["num_heads"]

    def fn(t):
        qkv = t["qkv"]
        b, n, c3 = qkv.shape
        c = c3 // 3
        # timm XCA: (B, N, 3, heads, D) -> (3, B, heads, D, N)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 4, 1).unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        temperature = t["temperature"].reshape(heads, 1, 1)
        if core_name == "sdpa":  # timm's fused path: temperature folded into q, scale 1
            x = F.scaled_dot_product_attention(q * temperature, k, v, scale=1.0)
        else:
            attn = (q @ k.transpose(-2, -1)) * temperature
            x = attn.softmax(dim=-1) @ v
        return x.permute(0, 3, 1, 2).reshape(b, n, c)

    return fn


def space_time_attention_composition(case: Case, core, **_):
    a = case.args
    heads, frames, axis, layout = a["num_heads"], a["frames"], a["axis"], a["layout"]

    def attend(x):  # timm-style Attention core on a packed (B', L, 3C) sequence batch
        q, k, v = _split_heads(x, heads, 3)
        return _merge_heads(core(q, k, v, q.shape[-1] ** -0.5))

    def fn(t):
        qkv = t["qkv"]
        b, n, c3 = qkv.shape
        c, tt = c3 // 3, frames
        s = n // tt
        # TimeSformer rearranges: 'b (h w t) m' ("st") or ViViT 'b (t h w) m' ("ts") -> (B, S, T, 3C)
        x = qkv.reshape(b, s, tt, c3) if layout == "st" else qkv.reshape(b, tt, s, c3).transpose(1, 2)
        if axis == "time":
            o = attend(x.reshape(b * s, tt, c3)).reshape(b, s, tt, c)  # '(b h w) t m'
            cls_out = None
        else:
            xs = x.transpose(1, 2).reshape(b * tt, s, c3)  # '(b t) (h w) m'
            cls = t.get("cls_qkv")
            if cls is not None:
                xs = torch.cat([cls[:, None, None, :].expand(b, tt, 1, c3).reshape(b * tt, 1, c3), xs], dim=1)
            o = attend(xs)
            cls_out = None
            if cls is not None:
                cls_out = o[:, 0].reshape(b, tt, c)
                o = o[:, 1:]
            o = o.reshape(b, tt, s, c).transpose(1, 2)  # back to (B, S, T, C)
        out = o.reshape(b, n, c) if layout == "st" else o.transpose(1, 2).reshape(b, n, c)
        return out if cls_out is None else (out, cls_out)

    return fn


# Swin: timm's window helpers and buffers --------------------------------------------------------


def _window_partition(x, m):
    """(B, H, W, C) -> (B·nW, M·M, C), timm's window_partition."""
    b, h, w, c = x.shape
    return x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, c)


def _window_reverse(x, m, h, w):
    """(B·nW, M·M, C) -> (B, H, W, C), timm's window_reverse."""
    c = x.shape[-1]
    return x.view(-1, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _relative_position_index(m, device):
    coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)
    return (rel[..., 0] * (2 * m - 1) + rel[..., 1]).reshape(-1).to(device)  # (N·N,)


def _shift_mask(hp, wp, m, s, dtype, device):
    """timm's attn_mask on the padded grid: (nW, N, N) with -100 where the region labels differ."""
    img = torch.zeros(1, hp, wp, 1)
    label = 0
    for hs in (slice(0, -m), slice(-m, -s), slice(-s, None)):
        for ws in (slice(0, -m), slice(-m, -s), slice(-s, None)):
            img[:, hs, ws, :] = label
            label += 1
    win = _window_partition(img, m).squeeze(-1)  # (nW, N)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0).to(device=device, dtype=dtype)


def window_attention_composition(case: Case, core_name, dtype, device, **_):
    a = case.args
    (h, w), heads, m, s = a["hw"], a["num_heads"], a["window_size"], a["shift_size"]
    shift_first = bool(a.get("shift_first", False))  # timm: roll the unpadded map, then pad
    hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
    nw, nt = (hp // m) * (wp // m), m * m
    index = _relative_position_index(m, device)
    mask = _shift_mask(hp, wp, m, s, dtype, device) if s > 0 else None
    flex_attention = _flex_attention() if core_name == "flex" else None

    def rel_bias(table):  # timm _get_rel_pos_bias: gather, (heads, N, N)
        return table[index].view(nt, nt, -1).permute(2, 0, 1).contiguous()

    def fn(t):
        qkv = t["qkv"]
        b, _, c3 = qkv.shape
        c = c3 // 3
        x = qkv.view(b, h, w, c3)
        if s > 0 and shift_first:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        if hp != h or wp != w:  # pad bottom/right; a padded token's qkv is the qkv linear's bias
            bias = t.get("qkv_bias")
            pad = (bias if bias is not None else qkv.new_zeros(c3)).view(1, 1, 1, c3)
            x = torch.cat([x, pad.expand(b, h, wp - w, c3)], dim=2)
            x = torch.cat([x, pad.expand(b, hp - h, wp, c3)], dim=1)
        if s > 0 and not shift_first:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = _window_partition(x, m)  # (B·nW, N, 3C)
        bw = x.shape[0]
        q, k, v = _split_heads(x, heads, 3)
        scale = q.shape[-1] ** -0.5
        logit_scale = t.get("logit_scale")
        if logit_scale is not None:  # Swin V2 (timm's WindowAttention): cosine scores times the clamped scale
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            tau = torch.clamp(logit_scale.reshape(1, heads, 1, 1), max=math.log(100.0)).exp()
            q, scale = q * tau.to(q.dtype), 1.0
        table = t.get("rel_pos_bias_table")
        if core_name == "eager":  # timm's non-fused WindowAttention
            attn = (q * scale) @ k.transpose(-2, -1)
            if table is not None:
                attn = attn + rel_bias(table).unsqueeze(0)
            if mask is not None:
                attn = attn.view(-1, nw, heads, nt, nt) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, heads, nt, nt)
            o = attn.softmax(dim=-1) @ v
        elif core_name == "sdpa":  # timm's fused path: bias + mask materialised as attn_mask
            attn_mask = rel_bias(table).unsqueeze(0) if table is not None else None
            if mask is not None:
                full = mask.view(1, nw, 1, nt, nt).expand(bw // nw, -1, heads, -1, -1).reshape(-1, heads, nt, nt)
                attn_mask = full if attn_mask is None else attn_mask + full
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        else:  # flex: bias gather + mask lookup in the score_mod
            rb = rel_bias(table) if table is not None else None

            def score_mod(score, bi, hi, qi, ki):
                if rb is not None:
                    score = score + rb[hi, qi, ki]
                if mask is not None:
                    score = score + mask[bi % nw, qi, ki]
                return score

            o = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
        o = _window_reverse(o.transpose(1, 2).reshape(bw, nt, c), m, hp, wp)
        if s > 0 and not shift_first:
            o = torch.roll(o, shifts=(s, s), dims=(1, 2))
        if hp != h or wp != w:
            o = o[:, :h, :w, :].contiguous()
        if s > 0 and shift_first:
            o = torch.roll(o, shifts=(s, s), dims=(1, 2))
        return o.reshape(b, h * w, c)

    return fn


# MViTv2 pooling attention: timm's MultiScaleAttention after its pools and norms ----------------------


def _pool_rel_index(q_len, k_len, device):
    """timm cal_rel_pos_type's table rows along one axis, computed on the device every call as timm does."""
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) * q_ratio
    k_pos = torch.arange(k_len, device=device).unsqueeze(0) * k_ratio
    return (q_pos - k_pos + (k_len - 1) * k_ratio).long()


def _pool_rel_terms(q, q_hw, k_hw, rel_pos_h, rel_pos_w, sp):
    """timm cal_rel_pos_type's terms, the tables gathered and contracted with the spatial queries:
    relh (B, heads, q_h, q_w, k_h), relw (B, heads, q_h, q_w, k_w)."""
    (qh, qw), (kh, kw) = q_hw, k_hw
    b, h, _, d = q.shape
    r_q = q[:, :, sp:].reshape(b, h, qh, qw, d)
    th = rel_pos_h[_pool_rel_index(qh, kh, q.device)]
    tw = rel_pos_w[_pool_rel_index(qw, kw, q.device)]
    return torch.einsum("byhwc,hkc->byhwk", r_q, th), torch.einsum("byhwc,wkc->byhwk", r_q, tw)


def pool_attention_composition(case: Case, core_name, **_):
    """core "eager": timm's code path (scores, the rel terms added into the spatial block of the
    scores in place, softmax, ·v, + q, transpose back); "sdpa": the rel terms materialised as a
    (B, heads, Nq, Nk) attn_mask; "flex": a score_mod reading the (B, heads, Nq, k_h) / (…, k_w) terms."""
    a = case.args
    q_hw, k_hw, cls, residual = tuple(a["q_hw"]), tuple(a["k_hw"]), a["has_cls_token"], a["residual"]
    sp = 1 if cls else 0
    (qh, qw), (kh, kw) = q_hw, k_hw
    flex_attention = _flex_attention() if core_name == "flex" else None

    def fn(t):
        q, k, v = t["q"], t["k"], t["v"]
        b, h, nq, d = q.shape
        scale = d**-0.5
        th, tw = t.get("rel_pos_h"), t.get("rel_pos_w")
        rel = _pool_rel_terms(q, q_hw, k_hw, th, tw, sp) if th is not None else None
        if core_name == "eager":  # timm MultiScaleAttention.forward + cal_rel_pos_type
            attn = (q * scale) @ k.transpose(-2, -1)
            if rel is not None:
                attn[:, :, sp:, sp:] = (
                    attn[:, :, sp:, sp:].view(b, -1, qh, qw, kh, kw) + rel[0].unsqueeze(-1) + rel[1].unsqueeze(-2)
                ).view(b, -1, qh * qw, kh * kw)
            x = attn.softmax(dim=-1) @ v
        elif core_name == "sdpa":
            mask = None
            if rel is not None:
                r = (rel[0].unsqueeze(-1) + rel[1].unsqueeze(-2)).reshape(b, h, qh * qw, kh * kw)
                mask = F.pad(r, (sp, 0, sp, 0))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        elif rel is None:
            x = flex_attention(q, k, v, scale=scale)
        else:
            relh, relw = rel[0].reshape(b, h, qh * qw, kh), rel[1].reshape(b, h, qh * qw, kw)

            def score_mod(score, bi, hi, qi, ki):
                i, j = torch.clamp(qi - sp, min=0), torch.clamp(ki - sp, min=0)
                r = relh[bi, hi, i, j // kw] + relw[bi, hi, i, j % kw]
                return score + torch.where((qi >= sp) & (ki >= sp), r, torch.zeros_like(r))

            x = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
        if residual:
            x = x + q
        return x.transpose(1, 2).reshape(b, nq, h * d)

    return fn


# dwconv / Mix-FFN: PVTv2 / SegFormer DWConv (transpose, view, conv2d(groups=C), flatten, transpose) -----


def _act(y, activation):
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    return y


def _dwconv_eager(x, hw, weight, bias, activation):
    b, n, c = x.shape
    h, w = hw
    y = x.transpose(1, 2).view(b, c, h, w)
    y = F.conv2d(y, weight, bias, stride=1, padding=weight.shape[-1] // 2, groups=c)
    return _act(y.flatten(2).transpose(1, 2), activation)


def dwconv_composition(case: Case, **_):
    hw, act = case.args["hw"], case.args["activation"]
    return lambda t: _dwconv_eager(t["x"], hw, t["weight"], t.get("bias"), act)


def mix_ffn_composition(case: Case, **_):
    hw, extra_relu = case.args["hw"], case.args["extra_relu"]

    def fn(t):
        y = F.linear(t["x"], t["fc1_weight"], t.get("fc1_bias"))
        if extra_relu:
            y = F.relu(y)
        y = _dwconv_eager(y, hw, t["dw_weight"], t.get("dw_bias"), "gelu")
        return F.linear(y, t["fc2_weight"], t.get("fc2_bias"))

    return fn


def composition(case: Case, core_name: str, dtype, device) -> Callable:
    """The eager composition for `case` with attention core "eager", "sdpa" or "flex" (the builder its
    op's spec points at)."""
    core = _CORES[core_name]()
    try:
        build = _spec.resolve(_spec.get(case.op).bench.baseline)
    except (ValueError, AttributeError):
        raise ValueError(f"no composition for {case.op}") from None
    return build(case, core=core, core_name=core_name, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- building one impl


def _sdpa_context(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_FORCED[name], None)
    if backend is None:
        raise Unsupported(f"torch {torch.__version__} has no SDPBackend.{SDPA_FORCED[name]}")
    return lambda: sdpa_kernel([backend])


def _compile(fn):
    # Static shapes: one compiled graph per case (the harness resets dynamo between cases).
    return torch.compile(fn, dynamic=False, fullgraph=True)


def build(impl: str, case: Case, dtype, device, backend: str = "auto") -> Impl:
    """The callable for `impl` on `case`; raises Unsupported with the reason when it cannot run here."""
    why = applies(impl, case.op)
    if why:
        raise Unsupported(why)
    device = torch.device(device)
    if impl == "vitkernels":
        import vitkernels

        op = getattr(vitkernels, case.op)
        args = case.args
        from .. import use_backend

        return Impl(impl, lambda t: op(**t, **args), context=lambda: use_backend(backend))
    if impl == "eager":
        return Impl(impl, composition(case, "eager", dtype, device))
    if impl == "sdpa":
        return Impl(impl, composition(case, "sdpa", dtype, device))
    if impl in SDPA_FORCED:
        if device.type != "cuda":
            raise Unsupported("SDPA backends are forced on CUDA only (CPU uses the default dispatch: impl 'sdpa')")
        return Impl(impl, composition(case, "sdpa", dtype, device), context=_sdpa_context(impl))
    if impl == "flex":
        if device.type != "cuda":
            raise Unsupported("the FlexAttention baseline runs on CUDA only")
        _flex_attention()
        return Impl(impl, _compile(composition(case, "flex", dtype, device)), compiled=True)
    if impl == "compile":
        return Impl(impl, _compile(composition(case, "eager", dtype, device)), compiled=True)
    raise Unsupported(f"unknown implementation {impl!r}")
