"""patch_hf and the "vitkernels" attention backend on real transformers models.

For tiny random configurations of ViT, DeiT (distilled), Swin (padded and shifted windows, and a stage
whose window is clamped to its resolution), Swin V2 (the same, with cosine attention and the continuous
position bias; a shifted layer whose logit scale is too large for transformers' doubled shift mask to be
negligible keeps HF's forward), SegFormer, PVTv2 (and its linear-attention variant),
TimeSformer (divided space-time, space_only, joint_space_time) and ViViT: patched == unpatched outputs
and every parameter gradient (float32, training mode with stochastic depth where the config has it)
while a dispatch mode counts the vitkernels ops that ran; the Triton kernels (interpreter on CPU) for one
small model per family, forward and backward; one real-size configuration per family (real widths, heads
and resolutions; the video models and ViT/DeiT at reduced depth); the run-time fallbacks
(output_attentions, head mask where the model has one, attention dropout while training) giving the
original outputs with one warning; LoRA-style wrapped linears; pickling in a fresh process; deepcopy;
autocast; gradient checkpointing; torch.compile(fullgraph=True); save_pretrained/from_pretrained into
an unpatched model; and `attn_implementation="vitkernels"` == sdpa (ViT, DeiT, ViViT, Swin, SegFormer,
BERT with a padding mask, a GQA causal Llama), with its dropout fallback.

Written against transformers 5 and the 4.x layout (run with a 4.x transformers on PYTHONPATH: the
attention-backend tests skip where 4.x has no AttentionInterface).
"""

import copy
import inspect
import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitkernels as vk

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("vitkernels.integrations.hf")
from vitkernels.integrations import _patching  # noqa: E402

T = transformers
HAS_INTERFACE = hasattr(T, "AttentionInterface")

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MIT = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 2, 4])
TSF = dict(image_size=32, patch_size=8, num_frames=3, **VIT)


def _image(*hw):
    return lambda b: torch.randn(b, 3, *hw)


def _video(frames, size):
    return lambda b: torch.randn(b, frames, 3, size, size)


# name -> (model class name, config class name, config kwargs, input maker, eval-forward vitkernels op counts)
CASES = {
    "vit": (
        "ViTForImageClassification",
        "ViTConfig",
        dict(image_size=32, patch_size=8, num_labels=3, **VIT),
        _image(32, 32),
        {"_attention_fwd": 2},
    ),
    "deit_distilled": (
        "DeiTForImageClassificationWithTeacher",
        "DeiTConfig",
        dict(image_size=32, patch_size=8, num_labels=3, **VIT),
        _image(32, 32),
        {"_attention_fwd": 2},
    ),
    # maps 20x28 (windows fit), 10x14 and 5x7 (padded to 12x16 and 8x8, shifted): HF's pad-then-shift order
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=(40, 56),
            patch_size=2,
            embed_dim=16,
            depths=[2, 2, 2],
            num_heads=[1, 2, 2],
            window_size=4,
            num_labels=3,
        ),
        _image(40, 56),
        {"_window_attention_fwd": 6},
    ),
    # maps 16, 8, 4: the last stage's window is clamped to its resolution (window 4, no shift), as HF does
    "swin_clamp": (
        "SwinModel",
        "SwinConfig",
        dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=4),
        _image(32, 32),
        {"_window_attention_fwd": 6},
    ),
    # Swin V2, maps 20x28, 10x14 and 5x7 (padded to 12x16 and 8x8, shifted; HF pads, then shifts): cosine
    # attention at the initial logit scale (τ ≈ 10), HF's continuous position bias as the op's table
    "swinv2": (
        "Swinv2ForImageClassification",
        "Swinv2Config",
        dict(
            image_size=(40, 56),
            patch_size=2,
            embed_dim=16,
            depths=[2, 2, 2],
            num_heads=[1, 2, 2],
            window_size=4,
            num_labels=3,
        ),
        _image(40, 56),
        {"_window_attention_fwd": 6},
    ),
    # maps 16 (shifted), 8 (= the window 8: unshifted) and 4 (window clamped to 4, with its own coordinate table)
    "swinv2_clamp": (
        "Swinv2Model",
        "Swinv2Config",
        dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=8),
        _image(32, 32),
        {"_window_attention_fwd": 6},
    ),
    "segformer": (
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        dict(decoder_hidden_size=16, num_labels=3, **MIT),
        _image(64, 64),
        # mix_ffn is composite on CPU: its fused part is the dwconv (+GELU) op
        {"_sr_attention_fwd": 3, "_attention_fwd": 1, "_dwconv_fwd": 4},
    ),
    "pvt_v2": (
        "PvtV2ForImageClassification",
        "PvtV2Config",
        dict(num_labels=3, **MIT),
        _image(64, 64),
        {"_sr_attention_fwd": 3, "_attention_fwd": 1, "_dwconv_fwd": 4},
    ),
    "pvt_v2_li": (
        "PvtV2ForImageClassification",
        "PvtV2Config",
        dict(num_labels=3, linear_attention=True, **MIT),
        _image(64, 64),
        {"_sr_attention_fwd": 4, "_dwconv_fwd": 4},
    ),
    # (+ stochastic depth 0.3, set on the modules: transformers 5.25's config types drop_path_rate as int)
    "timesformer": (
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        dict(num_labels=3, **TSF),
        _video(3, 32),
        {"_space_time_attention_fwd": 4},
    ),
    "timesformer_space_only": (
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        dict(num_labels=3, attention_type="space_only", **TSF),
        _video(3, 32),
        {"_self_attention_fwd": 2},
    ),
    "timesformer_joint": (
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        dict(num_labels=3, attention_type="joint_space_time", **TSF),
        _video(3, 32),
        {"_self_attention_fwd": 2},
    ),
    "vivit": (
        "VivitForVideoClassification",
        "VivitConfig",
        dict(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=3, **VIT),
        _video(4, 32),
        {"_attention_fwd": 2},
    ),
}
IDS = list(CASES)


class OpCounter(TorchDispatchMode):
    """Counts the torch.ops.vitkernels.* calls that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = str(func.overloadpacket).partition(".")
        if ns == "vitkernels":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _config(case, **overrides):
    _, cfg_cls, kwargs, _, _ = CASES[case]
    return getattr(T, cfg_cls)(**{**kwargs, **overrides})


def _build(case, config=None, attn_implementation=None, **overrides):
    cls = getattr(T, CASES[case][0])
    config = config or _config(case, **overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = cls(config).eval()
    if case == "timesformer":
        mod = sys.modules[cls.__module__]
        drop_path = getattr(mod, "TimesformerDropPath", None) or mod.TimeSformerDropPath
        for layer in model.timesformer.encoder.layer:
            layer.drop_path = drop_path(0.3)
        model.eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights everywhere (biases, norms, bias tables)
            p.add_(0.02 * torch.randn_like(p))
    return model


def _pair(case, batch=2, **overrides):
    """(unpatched, patched) models with the same weights, eval mode, and an input."""
    ref = _build(case, **overrides)
    patched = vk.patch_hf(copy.deepcopy(ref))
    return ref, patched, CASES[case][3](batch)


def _out(y):
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if getattr(y, "logits", None) is not None else y.last_hidden_state


def _seeded(fn, *args, seed=1, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def _fused_names(model):
    out = {}
    for m in model.modules():
        if type(m).__name__.startswith("Fused"):
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _grads_close(model, ref, tol=1e-5, floor=1e-6):
    """Every parameter's grad within tol x the largest |grad| of that tensor, + floor x the largest |grad| of
    the model (for grads that are ~0 in exact arithmetic, e.g. a key bias under softmax: float32 noise)."""
    ref_grads = dict(ref.named_parameters())
    floor = floor * max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    n = 0
    for name, p in model.named_parameters():
        want = ref_grads[name].grad
        if want is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        err = (p.grad - want).abs().max().item()
        assert err <= tol * want.abs().max().item() + floor, (
            f"{name}: max error {err:.3g}, max |grad| {want.abs().max().item():.3g}"
        )
        n += 1
    assert n > 0


def _backward(model, x, w=None, **kwargs):
    out = _out(_seeded(model, x, **kwargs))
    w = torch.randn_like(out) if w is None else w
    (out * w).sum().backward()
    return out, w


# ----------------------------------------------------------------------------- parity and the ops running


@pytest.mark.parametrize("case", IDS)
def test_patched_matches_outputs_and_grads(case):
    ref, patched, x = _pair(case)
    assert _fused_names(patched), "nothing fused"
    assert list(patched.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for a, b in zip(ref.modules(), patched.modules()):
        assert isinstance(b, type(a))  # isinstance checks on transformers' classes keep working
    with torch.no_grad(), OpCounter() as counter:
        got = _out(patched(x))
    assert counter.counts == CASES[case][4]
    _close(got, _out(ref(x)))
    # training mode (stochastic depth where the config has it: same seed, same masks), every gradient
    ref.train(), patched.train()
    out, w = _backward(patched, x)
    want, _ = _backward(ref, x, w)
    _close(out, want)
    _grads_close(patched, ref)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit_padding_mask_patched(impl):
    """transformers 5's ViT takes a (B, N) padding mask and builds a 4-D mask from it (boolean for sdpa,
    additive float for eager): the fused attention gets it as the op's bias."""
    if "attention_mask" not in inspect.signature(T.ViTModel.forward).parameters:
        pytest.skip("this transformers' ViT takes no attention mask")
    ref = _build("vit", attn_implementation=impl)
    patched = vk.patch_hf(copy.deepcopy(ref))
    x = CASES["vit"][3](2)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad(), OpCounter() as counter:
        got = _out(patched(x, attention_mask=mask))
    assert counter.counts == {"_attention_fwd": 2}
    with torch.no_grad():
        want = _out(ref(x, attention_mask=mask))
        assert (want - _out(ref(x))).abs().max() > 1e-4  # the mask matters
    _close(got, want)


def test_swin_window_too_large_for_its_table_runs_hf_forward():
    """A map smaller than the window: HF clamps the window to the map, which its bias table does not fit
    (HF itself fails there); the fused layer runs HF's forward, so the same error comes out."""
    ref, patched, _ = _pair("swin_clamp", image_size=16)  # maps 8, 4, 2: the last stage's window becomes 2
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as got:
        warnings.simplefilter("always")
        patched(x)
    assert str(got.value) == str(want.value)
    assert any("does not fit the relative position bias table" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- Triton kernels (interpreter)

TRITON_CASES = {  # one small model per family, tiny enough for the interpreter
    "vit": dict(num_hidden_layers=1),
    "deit_distilled": dict(num_hidden_layers=1),
    "swin": dict(image_size=(24, 20), depths=[2, 1], num_heads=[1, 2]),  # 12x10: padded, shifted
    "swinv2": dict(image_size=(24, 20), depths=[2, 1], num_heads=[1, 2]),  # 12x10: padded, shifted; cosine
    "segformer": dict(
        num_encoder_blocks=2,
        depths=[1, 1],
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        sr_ratios=[2, 1],
        strides=[4, 2],
        patch_sizes=[7, 3],
        mlp_ratios=[2, 2],
    ),
    "pvt_v2_li": dict(
        num_encoder_blocks=1,
        depths=[1],
        hidden_sizes=[16],
        num_attention_heads=[2],
        sr_ratios=[2],
        strides=[4],
        patch_sizes=[7],
        mlp_ratios=[2],
    ),
    "timesformer": dict(num_hidden_layers=1, image_size=16, num_frames=2),
    "vivit": dict(num_hidden_layers=1, image_size=16),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_path_in_the_interpreter(case):
    """Every fused op of the family on the "triton" backend (forced: a backend that cannot run raises),
    float32 on CPU through the interpreter: outputs and every gradient equal the unpatched model."""
    pytest.importorskip("triton")
    overrides = TRITON_CASES[case]
    ref = _build(case, **overrides)
    patched = vk.patch_hf(copy.deepcopy(ref))
    size = overrides.get("image_size", None)
    if case in ("swin", "swinv2"):
        x = torch.randn(1, 3, 24, 20)
    elif case in ("timesformer", "vivit"):
        x = torch.randn(1, overrides.get("num_frames", CASES[case][2]["num_frames"]), 3, size, size)
    elif case in ("segformer", "pvt_v2_li"):
        x = torch.randn(1, 3, 32, 32)
    else:
        x = CASES[case][3](1)
    ref.train(), patched.train()
    with vk.use_backend("triton"), OpCounter() as counter:
        out, w = _backward(patched, x)
    assert counter.counts
    want, _ = _backward(ref, x, w)
    _close(out, want, tol=1e-4)
    _grads_close(patched, ref, tol=1e-4, floor=1e-5)


# ----------------------------------------------------------------------------- real sizes

REAL = {  # family -> (model class, config kwargs: the class defaults, depth reduced where marked, input)
    "vit": ("ViTModel", dict(num_hidden_layers=2), (1, 3, 224, 224)),  # ViT-B/16 at 224: N = 197, D = 64
    "deit": ("DeiTModel", dict(num_hidden_layers=2), (1, 3, 224, 224)),
    "swin": ("SwinModel", dict(), (1, 3, 224, 224)),  # Swin-T, window 7 (last stage clamped: 7x7)
    # Swin V2-T, window 8 at 256 (microsoft/swinv2-tiny-patch4-window8-256's config; last stage 8x8, unshifted)
    "swinv2": ("Swinv2Model", dict(image_size=256, window_size=8), (1, 3, 256, 256)),
    "segformer": ("SegformerModel", dict(), (1, 3, 224, 224)),  # MiT-b0
    "pvt_v2": ("PvtV2Model", dict(), (1, 3, 224, 224)),  # PVTv2-b0
    "timesformer": ("TimesformerModel", dict(num_hidden_layers=1), (1, 8, 3, 224, 224)),  # 8 x 196 tokens + cls
    "vivit": ("VivitModel", dict(num_hidden_layers=1), (1, 32, 3, 224, 224)),  # 16 x 196 tokens + cls
}


@pytest.mark.parametrize("family", list(REAL))
def test_real_size_config_forward(family):
    cls_name, kwargs, shape = REAL[family]
    cls = getattr(T, cls_name)
    ref = cls(cls.config_class(**kwargs)).eval()
    patched = vk.patch_hf(copy.deepcopy(ref))
    assert _fused_names(patched)
    x = torch.randn(shape)
    with torch.no_grad(), OpCounter() as counter:
        got = _out(patched(x))
    assert counter.counts
    with torch.no_grad():
        _close(got, _out(ref(x)), tol=2e-5)


# ----------------------------------------------------------------------------- run-time fallbacks


def _fallback_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, hf.FusedFallbackWarning)]


@pytest.mark.parametrize("case", ["vit", "swin", "swinv2", "segformer", "pvt_v2", "timesformer", "vivit"])
def test_output_attentions_runs_the_original_forward_and_warns_once(case, monkeypatch):
    monkeypatch.setattr(_patching, "_WARNED", set())
    impl = {} if case in ("pvt_v2", "timesformer", "swinv2") else {"attn_implementation": "eager"}
    ref = _build(case, **impl)
    patched = vk.patch_hf(copy.deepcopy(ref))
    x = CASES[case][3](1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            got = patched(x, output_attentions=True)
    want = ref(x, output_attentions=True)
    _close(_out(got), _out(want))
    assert got.attentions is not None and len(got.attentions) == len(want.attentions) > 0
    for a, b in zip(got.attentions, want.attentions):
        _close(a, b)
    msgs = _fallback_warnings(caught)
    assert msgs and len(msgs) == len(set(msgs)), msgs  # once per (class, reason)
    assert all("attention weights requested" in m and "runs transformers' own forward" in m for m in msgs)


def test_attention_dropout_while_training_runs_the_original_forward(monkeypatch):
    monkeypatch.setattr(_patching, "_WARNED", set())
    for case in ("vit", "swin", "swinv2", "pvt_v2", "timesformer"):
        ref, patched, x = _pair(case, attention_probs_dropout_prob=0.1)
        ref.train(), patched.train()
        with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
            warnings.simplefilter("always")
            got, w = _backward(patched, x)
            _backward(patched, x)
        want, _ = _backward(ref, x, w)
        _close(got, want)  # the original forward ran: same dropout masks
        assert not any(
            k in counter.counts
            for k in ("_attention_fwd", "_window_attention_fwd", "_sr_attention_fwd", "_space_time_attention_fwd")
        ), (case, counter.counts)
        msgs = _fallback_warnings(caught)
        assert msgs and all("attention dropout while training" in m for m in msgs), (case, msgs)
        assert len(msgs) == len(set(msgs))
        patched.eval()  # no dropout: fused again, silently
        with warnings.catch_warnings(record=True) as caught, OpCounter() as counter, torch.no_grad():
            warnings.simplefilter("always")
            patched(x)
        assert counter.counts and not _fallback_warnings(caught)


def test_head_mask_runs_the_original_forward():
    """transformers 4.x takes a head mask (5.x removed the argument)."""
    if "head_mask" not in inspect.signature(T.ViTModel.forward).parameters:
        pytest.skip("this transformers' ViT has no head_mask")
    ref, patched, x = _pair("vit")
    head_mask = torch.tensor([1.0, 0.0])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        _close(_out(patched(x, head_mask=head_mask)), _out(ref(x, head_mask=head_mask)))
    assert any("a head mask" in m for m in _fallback_warnings(caught))


@pytest.mark.parametrize("case", ["segformer", "pvt_v2"])
def test_mix_ffn_hidden_dropout_while_training_stays_fused(case):
    """Hidden dropout while training: the Mix-FFN runs its own linears and dropout around the fused dwconv
    (+GELU) op; with the same seed it draws the same masks as HF here (CPU), so outputs and grads agree."""
    ref, patched, x = _pair(case, hidden_dropout_prob=0.1)
    ref.train(), patched.train()
    with OpCounter() as counter:
        out, w = _backward(patched, x)
    want, _ = _backward(ref, x, w)
    assert counter.counts.get("_dwconv_fwd") == 4
    _close(out, want)
    _grads_close(patched, ref)


# ----------------------------------------------------------------------------- own linears (LoRA)


class LoraLike(torch.nn.Module):
    """A LoRA-style wrapper: base linear + a low-rank update (non-zero, so a bypass would show)."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=1.0)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize(
    "case,where",
    [
        ("vit", "vit.encoder.layer.0.attention.attention.query|vit.layers.0.attention.q_proj"),
        ("swin", "swin.encoder.layers.1.blocks.1.attention.self.query|swin.encoder.layers.1.blocks.1.attention.q_proj"),
        ("swinv2", "swinv2.encoder.layers.1.blocks.1.attention.self.query"),
        ("segformer", "segformer.encoder.block.0.0.mlp.dense1|segformer.stages.0.blocks.0.mlp.fc1"),
    ],
)
def test_lora_wrapped_linears_keep_working(case, where):
    """The fused forwards call the model's own linears: a wrapper replacing `q_proj` (Swin and Swin V2: on a
    padded, shifted stage, where padded tokens go through it too; SegFormer: the Mix-FFN's fc1, which then runs
    its own linears around the fused dwconv) changes the patched model exactly as the unpatched one."""
    ref, patched, x = _pair(case)
    path = next(p for p in where.split("|") if _has_module(ref, p))
    torch.manual_seed(3)
    lora = LoraLike(ref.get_submodule(path))
    for model in (ref, patched):
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, copy.deepcopy(lora))
    with torch.no_grad(), OpCounter() as counter:
        got = _out(patched(x))
    assert counter.counts == CASES[case][4]  # still fused
    with torch.no_grad():
        want = _out(ref(x))
        _close(got, want)
        setattr(ref.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], lora.base)
        assert (_out(ref(x)) - want).abs().max() > 1e-5  # the wrapper matters
    ref.train(), patched.train()
    out, w = _backward(patched, x)
    assert patched.get_submodule(path).up.weight.grad is not None  # gradients reach the adapter


def _has_module(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- ordinary-model behaviour

PICKLE_CASES = ["vit", "swin", "swinv2", "segformer", "pvt_v2_li", "timesformer", "vivit"]


def test_pickle_roundtrip_in_a_fresh_process(tmp_path):
    """torch.save(model) / torch.load(weights_only=False) in a new process that imported vitkernels."""
    for case in PICKLE_CASES:
        _, patched, x = _pair(case, batch=1)
        if case == "segformer":
            # transformers 5's SegformerForSemanticSegmentation does not survive torch.save/load in a fresh
            # process even unpatched (its decode head reads hidden states captured by hooks registered per
            # class at __init__; it also pickles those hooks after a first forward): its encoder does
            patched = patched.segformer
        torch.save(patched, tmp_path / f"{case}.pt")
        with torch.no_grad():
            y = _out(patched(x))
        torch.save({"x": x, "y": y, "classes": _fused_names(patched)}, tmp_path / f"{case}.io.pt")
    script = textwrap.dedent(f"""
        import sys, torch, vitkernels
        from torch.utils._python_dispatch import TorchDispatchMode
        seen = set()
        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func.overloadpacket).startswith("vitkernels."):
                    seen.add(str(func.overloadpacket))
                return func(*args, **(kwargs or {{}}))
        for case in {PICKLE_CASES!r}:
            model = torch.load(f"{{sys.argv[1]}}/{{case}}.pt", weights_only=False)
            io = torch.load(f"{{sys.argv[1]}}/{{case}}.io.pt")
            classes = {{}}
            for m in model.modules():
                if type(m).__name__.startswith("Fused"):
                    assert type(m).__module__ == "vitkernels.integrations.hf", type(m)
                    classes[type(m).__name__] = classes.get(type(m).__name__, 0) + 1
            assert classes == io["classes"], (case, classes)
            seen.clear()
            with torch.no_grad(), Ops():
                out = model(io["x"])
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            torch.testing.assert_close(out, io["y"], atol=1e-6, rtol=1e-6)
            assert seen, case
        print("ok")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_fused_classes_importable_by_name():
    from vitkernels.integrations.hf import FusedPvtV2SelfAttention, FusedSwinLayer, FusedTimesformerLayer

    assert issubclass(FusedSwinLayer, T.models.swin.modeling_swin.SwinLayer)
    assert issubclass(FusedPvtV2SelfAttention, T.models.pvt_v2.modeling_pvt_v2.PvtV2SelfAttention)
    assert FusedTimesformerLayer.__module__ == "vitkernels.integrations.hf"
    assert FusedTimesformerLayer.__qualname__ == "FusedTimesformerLayer"
    _, patched, _ = _pair("swin")
    assert type(patched.swin.encoder.layers[0].blocks[0]) is FusedSwinLayer
    with pytest.raises(AttributeError):
        hf.FusedNothing  # noqa: B018


@pytest.mark.parametrize("case", ["vit", "swin", "swinv2", "timesformer"])
def test_deepcopy(case):
    _, patched, x = _pair(case)
    twin = copy.deepcopy(patched)
    assert _fused_names(twin) == _fused_names(patched)
    with torch.no_grad(), OpCounter() as counter:
        _close(_out(twin(x)), _out(patched(x)), tol=0)
    assert counter.counts
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), patched.parameters()))


AUTOCAST_FLOOR = 1e-2


@pytest.mark.parametrize("case", ["vit", "swin", "swinv2", "segformer", "pvt_v2", "timesformer", "vivit"])
def test_autocast_bf16_close_to_unpatched(case):
    """Under autocast(cpu, bfloat16): outputs and gradients as close to the float32 unpatched model as the
    unpatched model under the same autocast (2x its error + a floor); float32 parameters get float32 grads."""
    ref, patched, x = _pair(case)
    ref.train(), patched.train()
    w = torch.randn_like(_out(ref(x)))

    def run(model, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _out(_seeded(model, x))
        if autocast:
            assert out.dtype == torch.bfloat16
        (out.float() * w).sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads)
        return out.detach().float(), torch.cat([g.flatten() for g in grads])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    out32, g32 = run(ref, False)
    out_ref, g_ref = run(ref, True)
    with OpCounter() as counter:
        out_vk, g_vk = run(patched, True)
    assert counter.counts
    assert rel(out_vk, out32) <= 2 * rel(out_ref, out32) + AUTOCAST_FLOOR
    assert rel(g_vk, g32) <= 2 * rel(g_ref, g32) + AUTOCAST_FLOOR


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.25 deprecates the name, still supported
@pytest.mark.parametrize("case", ["vit", "swin", "swinv2", "segformer", "timesformer"])
def test_gradient_checkpointing_enable(case):
    ref, patched, x = _pair(case)
    if not ref.supports_gradient_checkpointing:
        pytest.skip(f"{type(ref).__name__} has no gradient checkpointing in this transformers")
    for model in (ref, patched):
        model.gradient_checkpointing_enable()
        model.train()
    with OpCounter() as counter:
        out, w = _backward(patched, x)
    want, _ = _backward(ref, x, w)
    assert counter.counts
    _close(out, want)
    _grads_close(patched, ref)


def test_save_pretrained_into_an_unpatched_model(tmp_path):
    for case in ("vit", "swin", "timesformer"):
        ref, patched, x = _pair(case)
        patched.save_pretrained(tmp_path / case)
        loaded = getattr(T, CASES[case][0]).from_pretrained(tmp_path / case).eval()
        assert not _fused_names(loaded)
        assert list(loaded.state_dict()) == list(ref.state_dict())
        with torch.no_grad():
            _close(_out(loaded(x)), _out(patched(x)))
            # and back: a patched from_pretrained model
            again = vk.patch_hf(getattr(T, CASES[case][0]).from_pretrained(tmp_path / case).eval())
            _close(_out(again(x)), _out(ref(x)))


def _graph_capturing_backend(graphs):
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return aot_autograd(fw_compiler=compiler)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
@pytest.mark.parametrize("case", ["vit", "swin", "swinv2", "timesformer"])
def test_torch_compile_fullgraph(case):
    """One graph (no break in the fused forwards), with the vitkernels op in it; forward and backward.
    (transformers 5's SegformerForSemanticSegmentation does not compile with fullgraph=True even unpatched:
    its output-capture hooks are installed under a lock.)"""
    torch._dynamo.reset()
    ref, patched, x = _pair(case, **({"depths": [2, 1, 1]} if case in ("swin", "swinv2") else {"num_hidden_layers": 1}))
    graphs = []
    compiled = torch.compile(patched, fullgraph=True, backend=_graph_capturing_backend(graphs))
    out = _out(compiled(x))
    _close(out, _out(ref(x)))
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("vitkernels" in t for t in targets), targets
    out.sum().backward()
    _out(ref(x)).sum().backward()
    _grads_close(patched, ref)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- Swin V2: the doubled shift mask


def _set_tau(layer, tau):
    with torch.no_grad():
        layer.attention.self.logit_scale.fill_(math.log(tau))


def test_swinv2_large_logit_scale_on_a_shifted_layer_keeps_hf_forward(caplog):
    """transformers' Swinv2SelfAttention adds its shift mask twice (−200; the op −100): a shifted layer whose
    τ exceeds `swinv2_tau_bound` keeps HF's forward, and the patch log says why; unshifted layers fuse at any
    τ. Outputs and gradients still equal the unpatched model's."""
    ref = _build("swinv2")
    blocks = ref.swinv2.encoder.layers[1].blocks
    assert blocks[1].shift_size == 2 and blocks[0].shift_size == 0
    _set_tau(blocks[1], 60.0)  # shifted: kept
    _set_tau(blocks[0], 100.0)  # unshifted: no mask, fused
    bound = hf.swinv2_tau_bound(4)
    assert 32.5 < bound < 33 and 31.8 < hf.swinv2_tau_bound(8) < 32 and 31 < hf.swinv2_tau_bound(16) < 31.3
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        patched = vk.patch_hf(copy.deepcopy(ref))
    text = caplog.text
    assert "fused 5 × transformers.models.swinv2.modeling_swinv2.Swinv2Layer -> FusedSwinv2Layer" in text
    assert (
        "kept the original forward of 1 × transformers.models.swinv2.modeling_swinv2.Swinv2Layer: shifted "
        f"windows (window 4, shift 2) with logit scale τ = 60.0 (max over heads) > {bound:.1f}: transformers' "
        "Swinv2SelfAttention adds its shift mask twice (masked scores −200"
    ) in text, text
    assert type(patched.swinv2.encoder.layers[1].blocks[1]) is type(blocks[1])
    assert type(patched.swinv2.encoder.layers[1].blocks[0]).__name__ == "FusedSwinv2Layer"
    x = CASES["swinv2"][3](2)
    with torch.no_grad(), OpCounter() as counter:
        got = _out(patched(x))
    assert counter.counts == {"_window_attention_fwd": 5}
    _close(got, _out(ref(x)))
    ref.train(), patched.train()
    out, w = _backward(patched, x)
    want, _ = _backward(ref, x, w)
    _close(out, want)
    _grads_close(patched, ref)


def _swinv2_worst_case(tau):
    """A shifted Swinv2Layer (8x8 map, window 4, shift 2) and an input built so that the shift mask decides
    the result: keys = −queries, and the tokens' sign flips between the row regions of the shifted grid, so
    every masked key is aligned with its query (q̂·k̂ = +1) and every unmasked one opposed (−1). Returns
    (HF's output, the fused forward's output) of that layer."""
    torch.manual_seed(1)
    config = T.Swinv2Config(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[1], window_size=4)
    layer = T.Swinv2Model(config).eval().encoder.layers[0].blocks[1]
    attn = layer.attention.self
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        attn.key.weight.copy_(-attn.query.weight)
        attn.query.bias.zero_()
    _set_tau(layer, tau)
    rows = (torch.arange(8) - 2) % 8  # shifted-grid row of each map row (pad-then-shift, no padding)
    region = (rows >= 4).long() + (rows >= 6).long()
    x = torch.where(region == 2, -1.0, 1.0)[:, None].expand(8, 8).reshape(1, 64, 1) * torch.randn(1, 1, 16)
    layer._vk_hf4 = "head_mask" in inspect.signature(type(layer).forward).parameters
    with torch.no_grad():
        return layer(x, (8, 8))[0], hf._fused_swinv2_layer_forward(layer, x, (8, 8))[0]


def test_swinv2_tau_bound_is_needed_and_safe():
    """On the worst-case input, the op's −100 mask reproduces HF's −200 at τ = the bound, and not at τ = 60
    (there the masked keys take over the softmax): the fallback is necessary, the bound conservative."""
    want, got = _swinv2_worst_case(hf.swinv2_tau_bound(4))
    _close(got, want)
    want, got = _swinv2_worst_case(60.0)
    assert (got - want).abs().max() > 1.0


def test_fused_swinv2_class_importable_by_name():
    from vitkernels.integrations.hf import FusedSwinv2Layer

    assert issubclass(FusedSwinv2Layer, T.models.swinv2.modeling_swinv2.Swinv2Layer)
    assert FusedSwinv2Layer.__module__ == "vitkernels.integrations.hf"
    _, patched, _ = _pair("swinv2")
    assert type(patched.swinv2.encoder.layers[0].blocks[0]) is FusedSwinv2Layer


# ----------------------------------------------------------------------------- logging


def test_patch_log_says_what_was_fused_and_what_was_kept(caplog):
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        model = vk.patch_hf(_build("timesformer_space_only"))
    assert (
        "patch_hf(TimesformerForVideoClassification): fused 2 × transformers.models.timesformer."
        "modeling_timesformer.TimesformerSelfAttention -> FusedTimesformerSelfAttention "
        "(vitkernels.self_attention)" in caplog.text
    )
    assert (
        "kept the original forward of 2 × transformers.models.timesformer.modeling_timesformer.TimesformerLayer: "
        "attention_type 'space_only'" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_hf(model)  # patching twice changes nothing
    assert "already fused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        model = vk.patch_hf(_build("segformer", hidden_act="relu"))
    assert "MixMLP: activation" in caplog.text or "MixFFN: activation" in caplog.text
    assert "(the op fuses exact-erf GELU)" in caplog.text
    assert not any("Mix" in name for name in _fused_names(model))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_hf(
            T.BertModel(
                T.BertConfig(
                    vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            )
        )
    assert "nothing fused" in caplog.text
    assert all(r.name == "vitkernels" for r in caplog.records)


def test_import_vitkernels_does_not_import_transformers():
    code = "import sys, vitkernels; vitkernels.patch_hf; assert 'transformers' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ----------------------------------------------------------------------------- the attention-interface backend

needs_interface = pytest.mark.skipif(not HAS_INTERFACE, reason="transformers < 4.48 has no AttentionInterface")


def _backend_pair(cls, config, **inputs):
    """sdpa model and the same weights on attn_implementation="vitkernels" (from_config), outputs of both."""
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="vitkernels").eval()
    ours.load_state_dict(sdpa.state_dict())
    assert ours.config._attn_implementation == "vitkernels"
    with torch.no_grad(), OpCounter() as counter:
        got = _out(ours(**inputs))
    with torch.no_grad():
        want = _out(sdpa(**inputs))
    return got, want, counter.counts


def _skip_unless_uses_interface(cls):
    if "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(inspect.getmodule(cls)):
        pytest.skip(f"{cls.__name__} does not use the AttentionInterface in this transformers")


@needs_interface
@pytest.mark.parametrize("case,calls", [("vit", 2), ("deit_distilled", 2), ("vivit", 2), ("swin", 6), ("segformer", 4)])
def test_attention_backend_equals_sdpa(case, calls):
    """Every model whose attention goes through transformers' registry (ViT, DeiT, ViViT; in transformers 5
    also Swin, with its bias + shift mask as a float mask, and SegFormer) runs vitkernels.attention."""
    _skip_unless_uses_interface(getattr(T, CASES[case][0]))
    got, want, counts = _backend_pair(getattr(T, CASES[case][0]), _config(case), pixel_values=CASES[case][3](2))
    assert counts == {"_attention_fwd": calls}
    _close(got, want)


@needs_interface
def test_attention_backend_set_attn_implementation_and_grads():
    ref = _build("vit", attn_implementation="sdpa")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("vitkernels")
    assert ours.config._attn_implementation == "vitkernels"
    x = CASES["vit"][3](2)
    ref.train(), ours.train()
    with OpCounter() as counter:
        out, w = _backward(ours, x)
    want, _ = _backward(ref, x, w)
    assert counter.counts.get("_attention_fwd") == 2
    _close(out, want)
    _grads_close(ours, ref)


@needs_interface
def test_attention_backend_vit_padding_mask():
    if "attention_mask" not in inspect.signature(T.ViTModel.forward).parameters:
        pytest.skip("this transformers' ViT takes no attention mask")
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 9:] = 0
    got, want, counts = _backend_pair(T.ViTModel, _config("vit"), pixel_values=CASES["vit"][3](2), attention_mask=mask)
    assert counts == {"_attention_fwd": 2}
    _close(got, want)


@needs_interface
def test_attention_backend_padding_mask_bert():
    _skip_unless_uses_interface(T.BertModel)
    ids = torch.randint(5, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    config = T.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    got, want, counts = _backend_pair(T.BertModel, config, input_ids=ids, attention_mask=mask)
    assert counts == {"_attention_fwd": 2}
    keep = mask.bool()
    _close(got[keep], want[keep])


@needs_interface
@pytest.mark.parametrize("padded", [False, True])
def test_attention_backend_causal_gqa_llama(padded):
    """is_causal (no mask: the causal mask is built from is_causal) and GQA (2 kv heads for 4 query heads);
    with left padding the 4-D boolean mask transformers builds for the registered backend."""
    ids = torch.randint(5, 90, (2, 7))
    inputs = dict(input_ids=ids)
    if padded:
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :2] = 0
        inputs["attention_mask"] = mask
    config = T.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    got, want, counts = _backend_pair(T.LlamaModel, config, **inputs)
    assert counts == {"_attention_fwd": 2}
    if padded:
        keep = inputs["attention_mask"].bool()
        got, want = got[keep], want[keep]
    _close(got, want)


@needs_interface
def test_attention_backend_function_semantics():
    """Direct calls: float and boolean masks, scaling, is_causal with more keys than queries, GQA errors."""
    mod = torch.nn.Module()
    mod.is_causal = False
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    F = torch.nn.functional
    for mask in (None, torch.randn(2, 1, 5, 6), torch.rand(2, 1, 5, 6) > 0.3):
        if mask is not None and mask.dtype == torch.bool:
            mask[..., 0] = True
        out, weights = hf.vitkernels_attention_forward(mod, q, k, v, mask, scaling=0.3)
        assert weights is None and out.shape == (2, 5, 4, 8)
        _close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2))
    mod.is_causal = True
    q6 = torch.randn(2, 4, 6, 8)
    out, _ = hf.vitkernels_attention_forward(mod, q6, k, v, None)
    _close(out, F.scaled_dot_product_attention(q6, k, v, is_causal=True).transpose(1, 2))
    out, _ = hf.vitkernels_attention_forward(mod, q6[:, :, :1], k, v, None)  # one query: not causal
    _close(out, F.scaled_dot_product_attention(q6[:, :, :1], k, v).transpose(1, 2))
    kv2 = torch.randn(2, 2, 6, 8)
    out, _ = hf.vitkernels_attention_forward(mod, q6, kv2, kv2, None, is_causal=False)
    _close(out, F.scaled_dot_product_attention(q6, kv2, kv2, enable_gqa=True).transpose(1, 2))
    with pytest.raises(ValueError, match="grouped-query attention needs key/value heads dividing the query heads"):
        hf.vitkernels_attention_forward(mod, q6, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), None)


@needs_interface
def test_attention_backend_dropout_falls_back_to_sdpa_and_warns_once(monkeypatch):
    monkeypatch.setattr(_patching, "_WARNED", set())
    ref = _build("vit", attn_implementation="sdpa", attention_probs_dropout_prob=0.2)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("vitkernels")
    ref.train(), ours.train()
    x = CASES["vit"][3](2)
    with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
        warnings.simplefilter("always")
        got = _out(_seeded(ours, x))
        _seeded(ours, x)
    _close(got, _out(_seeded(ref, x)))  # sdpa ran, same dropout masks
    assert "_attention_fwd" not in counter.counts
    msgs = _fallback_warnings(caught)
    assert len(msgs) == 1 and "runs transformers' sdpa" in msgs[0] and "attention dropout" in msgs[0], msgs
    ours.eval()
    with torch.no_grad(), OpCounter() as counter:
        ours(x)
    assert counter.counts == {"_attention_fwd": 2}
