"""patch_timm on real timm models: patched models are ordinary models.

For tiny configurations of vit_tiny, deit_tiny_distilled, swin_tiny (shifted windows on maps that are
and are not multiples of the window), pvt_v2_b0, xcit_nano, mvitv2_tiny and timm's test_vit: patched == unpatched
outputs and grads while the vitkernels ops really run (a dispatch mode counts them); pickling in a
fresh process, deepcopy, hooks, TorchScript, torch.fx (symbolic_trace, timm's fx feature extraction,
forward and backward), features_only, forward_intermediates, grad checkpointing, torch.compile
(fullgraph) and torch.export; the patch log and the once-per-reason run-time fallback warning.
(The checks of timm's own tests/test_models.py, re-done here over patched models.)
"""

import copy
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitkernels as vk

timm = pytest.importorskip("timm")
integration = pytest.importorskip("vitkernels.integrations.timm")
from vitkernels.integrations import _patching  # noqa: E402

# name -> (timm model, create kwargs, input H, W, the fused classes it gets, the private fwd ops that must run
# and how often per forward)
CASES = {
    "vit_tiny": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=3),
        (32, 32),
        {"FusedAttention": 3},
        {"_self_attention_fwd": 3},
    ),
    "deit_tiny_distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, depth=3),
        (32, 32),
        {"FusedAttention": 3},
        {"_self_attention_fwd": 3},
    ),
    # 72 px: maps 18, 9, 5, 3 with window 4 -> shifted windows on padded maps (timm's shift-then-pad order)
    "swin_tiny_pad": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=72, window_size=4, depths=(2, 2, 2, 1)),
        (72, 72),
        {"FusedSwinTransformerBlock": 7},
        {"_window_attention_fwd": 7},
    ),
    "swin_tiny": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=4, depths=(2, 2, 1, 1)),
        (64, 64),
        {"FusedSwinTransformerBlock": 6},
        {"_window_attention_fwd": 6},
    ),
    # Swin V2 (cosine attention, continuous position bias), on maps that are and are not window multiples
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, depths=(2, 2, 1, 1)),
        (64, 64),
        {"FusedSwinTransformerV2Block": 6},
        {"_window_attention_fwd": 6},
    ),
    "swinv2_pad": (
        "swinv2_tiny_window8_256",
        dict(img_size=72, window_size=4, depths=(2, 2, 2, 1)),
        (72, 72),
        {"FusedSwinTransformerV2Block": 7},
        {"_window_attention_fwd": 7},
    ),
    "swinv2_cr": (
        "swinv2_cr_tiny_224",
        dict(img_size=(72, 72), window_size=4, depths=(2, 2, 1, 1)),
        (72, 72),
        {"FusedSwinTransformerV2CrBlock": 6},
        {"_window_attention_fwd": 6},
    ),
    "pvt_v2_b0": (
        "pvt_v2_b0",
        dict(depths=(1, 1, 1, 1)),
        (64, 64),
        # mix_ffn is composite on CPU: its fused part is the dwconv (+GELU) op
        {"FusedPvtV2Attention": 4, "FusedMlpWithDepthwiseConv": 4},
        {"_sr_attention_fwd": 4, "_dwconv_fwd": 4},
    ),
    # XCA blocks, then two class-attention blocks (CaiT's ClassAttn: one query row)
    "xcit_nano": (
        "xcit_nano_12_p16_224",
        dict(img_size=32, patch_size=8, depth=3),
        (32, 32),
        {"FusedXCA": 3, "FusedClassAttn": 2},
        {"_xca_fwd": 3, "_attention_fwd": 2},
    ),
    "test_vit": ("test_vit", dict(img_size=32), (32, 32), {"FusedAttention": 6}, {"_self_attention_fwd": 6}),
    # the rest of the zoo: q/k norm, CaiT class attention, BEiT and relpos biases, Twins sub-sampling
    "vit_qk_norm": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, qk_norm=True),
        (32, 32),
        {"FusedAttention": 2},
        {"_attention_fwd": 2},
    ),
    "cait": (
        "cait_xxs24_224",
        dict(img_size=32, patch_size=8, depth=1, depth_token_only=2),
        (32, 32),
        {"FusedClassAttn": 2},
        {"_attention_fwd": 2},
    ),
    "beit": (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        (32, 32),
        {"FusedBeitAttention": 2},
        {"_attention_fwd": 2},
    ),
    "beit_shared_bias": (
        "beit_base_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
        ),
        (32, 32),
        {"FusedBeitAttention": 2},
        {"_attention_fwd": 2},
    ),
    "vit_relpos": (
        "vit_relpos_small_patch16_224",
        dict(img_size=32, patch_size=8, depth=2),
        (32, 32),
        {"FusedRelPosAttention": 2},
        {"_attention_fwd": 2},
    ),
    "twins_pcpvt": (
        "twins_pcpvt_small",
        dict(depths=(1, 1, 1, 1)),
        (64, 64),
        {"FusedGlobalSubSampleAttn": 4},
        {"_sr_attention_fwd": 4},
    ),
    # MViTv2 pooling attention (timm's config per name is fixed: the real tiny model, at 64 px); the class
    # token and the other configurations: test_mvitv2_configurations_match_timm
    "mvitv2_tiny": (
        "mvitv2_tiny",
        dict(img_size=64),
        (64, 64),
        {"FusedMultiScaleAttention": 10},
        {"_pool_attention_fwd": 10},
    ),
}
IDS = list(CASES)


class OpCounter(TorchDispatchMode):
    """Counts the torch.ops.vitkernels.* calls that reach the dispatcher (eager, TorchScript, fx)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = str(func.overloadpacket).partition(".")
        if ns == "vitkernels":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _seeded(fn, *args, seed=1):
    """fn(*args) with a fixed RNG state (timm's stochastic depth draws the same masks for both models)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args)


def _pair(case, **overrides):
    """(unpatched, patched) timm models with the same weights, eval mode, and an input."""
    name, kwargs, hw, _, _ = CASES[case]
    ref = timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()
    for m in ref.modules():  # v2_cr's meta MLP drops out in training (its fused path then falls back: tested below)
        if isinstance(m, torch.nn.Dropout) and "meta_mlp" in _module_names(ref).get(id(m), ""):
            m.p = 0.0
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial weights everywhere (biases, norms, temperatures, bias tables)
            p.add_(0.02 * torch.randn_like(p))
    patched = vk.patch_timm(copy.deepcopy(ref))
    return ref, patched, torch.randn(2, 3, *hw)


def _module_names(model):
    return {id(m): n for n, m in model.named_modules()}


def _fused_names(model):
    out = {}
    for m in model.modules():
        if type(m).__name__.startswith("Fused"):
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _grads_close(model, ref_grads, tol=1e-5):
    """Every parameter's grad within tol x the largest |grad| of that tensor (float32 sums reorder), with a
    floor of tol x 1e-2 x the model's largest |grad| for gradients that are zero in exact arithmetic (a key
    bias shifts every score of a row equally: softmax ignores it)."""
    floor = tol * 1e-2 * max(g.abs().max().item() for g in ref_grads.values())
    for name, p in model.named_parameters():
        want = ref_grads[name]
        assert p.grad is not None, name
        err = (p.grad - want).abs().max().item()
        assert err <= tol * want.abs().max().item() + floor, (
            f"{name}: max error {err:.3g}, max |grad| {want.abs().max().item():.3g}"
        )


def _outputs(y):
    if isinstance(y, dict):
        y = list(y.values())
    return torch.cat([t.flatten() for t in y]) if isinstance(y, (list, tuple)) else y


# ----------------------------------------------------------------------------- parity and the ops running


@pytest.mark.parametrize("case", IDS)
def test_patched_matches_timm_outputs_and_grads(case):
    ref, patched, x = _pair(case)
    fused, ops = CASES[case][3], CASES[case][4]
    assert _fused_names(patched) == fused
    assert list(patched.state_dict()) == list(ref.state_dict())
    for a, b in zip(ref.modules(), patched.modules()):
        assert isinstance(b, type(a))  # isinstance checks on timm's classes keep working
    ref.train(), patched.train()  # default dropouts are 0: the fused path runs while training too
    with OpCounter() as counter:  # (forward only: the CPU reference backward uses torch.func, not under a mode)
        out = _seeded(patched, x)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    want = _seeded(ref, x)
    (want * w).sum().backward()
    _close(out, want)
    assert counter.counts == ops
    _grads_close(patched, {n: p.grad for n, p in ref.named_parameters()})


def test_swin_shifted_windows_on_padded_maps_match_timm_at_several_sizes():
    """timm shifts before padding: the fused path runs the op with shift_first=True, so every size
    matches timm (and runs the op once in every block)."""
    for hw in [(40, 40), (44, 52), (36, 60)]:
        ref, patched, _ = _pair("swin_tiny_pad", img_size=hw, depths=(2, 2, 1, 1))
        x = torch.randn(1, 3, *hw)
        with torch.no_grad(), OpCounter() as counter:
            _close(patched(x), ref(x))
        assert counter.counts == {"_window_attention_fwd": sum(_fused_names(patched).values())}


@pytest.mark.parametrize("kind", ["float", "bool", "causal"])
def test_vit_attention_mask_and_causal_match_timm(kind):
    ref, patched, x = _pair("vit_tiny")
    n = 1 + (32 // 8) ** 2
    if kind == "float":
        kw = dict(attn_mask=torch.randn(2, 1, n, n))
    elif kind == "bool":
        kw = dict(attn_mask=(torch.rand(2, 1, n, n) > 0.3) | torch.eye(n, dtype=torch.bool))
    else:
        kw = dict(is_causal=True)
    with torch.no_grad(), OpCounter() as counter:
        _close(patched(x, **kw), ref(x, **kw))
    assert counter.counts == {"_attention_fwd": 3}  # masked attention still runs a fused op


def test_vit_attention_variants_scale_norm_gate_head_dim():
    """timm's Attention with scale norm, sigmoid gate and attn_head_dim != dim / heads is fused too."""
    from timm.layers.attention import Attention

    attn = Attention(
        48, num_heads=4, attn_head_dim=8, qkv_bias=True, scale_norm=True, gated=True, norm_layer=torch.nn.LayerNorm
    ).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = copy.deepcopy(attn)
    assert type(vk.patch_timm(attn)).__name__ == "FusedAttention"  # the root module itself is swapped
    x = torch.randn(2, 11, 48)
    with torch.no_grad(), OpCounter() as counter:
        _close(attn(x), ref(x))
    assert counter.counts == {"_self_attention_fwd": 1}


@pytest.mark.parametrize(
    "cfg",
    [
        dict(use_cls_token=True),
        dict(use_cls_token=True, expand_attn=False, use_abs_pos=True),
        dict(mode="max"),
        dict(mode="avg", use_cls_token=True),
        dict(rel_pos_type="none", residual_pooling=False),
    ],
    ids=["cls", "cls-no_expand-abs_pos", "max", "avg-cls", "no_rel_pos-no_residual"],
)
def test_mvitv2_configurations_match_timm(cfg):
    """timm MViTv2 configurations its named models do not cover (class token, mvitv2_large's expand_attn=False,
    max/avg pooling, no rel-pos tables, no residual pooling), non-square input: patched == unpatched, outputs
    and every gradient (train mode with stochastic depth, same masks), one pool_attention per block."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    ref = MultiScaleVit(
        MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1, **cfg),
        img_size=64,
        num_classes=5,
        drop_path_rate=0.3,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    patched = vk.patch_timm(copy.deepcopy(ref))
    assert _fused_names(patched) == {"FusedMultiScaleAttention": 5}
    x = torch.randn(2, 3, 64, 48 if cfg.get("use_abs_pos") is None else 64)
    with OpCounter() as counter:
        out = _seeded(patched, x)
    assert counter.counts == {"_pool_attention_fwd": 5}
    want = _seeded(ref, x)
    _close(out, want)
    out.square().mean().backward()
    want.square().mean().backward()
    _grads_close(patched, {n: p.grad for n, p in ref.named_parameters()})
    patched.eval(), ref.eval()
    with torch.no_grad():
        _close(patched(x), ref(x))


def test_mvitv2_pool_first_keeps_timm_forward(caplog):
    """timm's MultiScaleAttentionPoolFirst is not fused (its forward does not run in timm: the key is not
    transposed); patch_timm says so and leaves it alone."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=16, pool_first=True), img_size=32)
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(model)
    assert _fused_names(model) == {}
    assert (
        "kept the original forward of 2 × timm.models.mvitv2.MultiScaleAttentionPoolFirst: no fused op covers"
        in caplog.text
    )


def test_calls_the_models_own_linears():
    """LoRA-style wrappers around qkv/proj keep working: the fused forward calls the submodules."""
    ref, patched, x = _pair("vit_tiny")

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return 2 * self.inner(t)

    for model in (ref, patched):
        model.blocks[0].attn.qkv = Scaled(model.blocks[0].attn.qkv)
    with torch.no_grad():
        _close(patched(x), ref(x))


def test_mix_ffn_with_wrapped_linears_keeps_timm_forward(caplog):
    ref = timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1)).eval()
    mlp = ref.stages[0].blocks[0].mlp
    mlp.fc1 = torch.nn.Sequential(mlp.fc1)  # e.g. a LoRA wrapper: mix_ffn would bypass it
    patched = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(patched)
    assert type(patched.stages[0].blocks[0].mlp).__name__ == "MlpWithDepthwiseConv"
    assert _fused_names(patched) == {"FusedPvtV2Attention": 4, "FusedMlpWithDepthwiseConv": 3}
    assert (
        "kept the original forward of 1 × timm.models.pvt_v2.MlpWithDepthwiseConv: fc1 is a Sequential" in caplog.text
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(patched(x), ref(x))


# ----------------------------------------------------------------------------- ordinary-model behaviour


def test_pickle_roundtrip_in_a_fresh_process(tmp_path):
    """torch.save(model) / torch.load(weights_only=False) in a new process that imported vitkernels."""
    expected = {}
    for case in IDS:
        _, patched, x = _pair(case)
        with torch.no_grad():
            y = patched(x)
        torch.save(patched, tmp_path / f"{case}.pt")
        torch.save({"x": x, "y": y, "classes": _fused_names(patched)}, tmp_path / f"{case}.io.pt")
        expected[case] = y
    script = textwrap.dedent(f"""
        import sys, torch, vitkernels
        from torch.utils._python_dispatch import TorchDispatchMode
        seen = set()
        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func.overloadpacket).startswith("vitkernels."):
                    seen.add(str(func.overloadpacket))
                return func(*args, **(kwargs or {{}}))
        for case in {IDS!r}:
            model = torch.load(f"{{sys.argv[1]}}/{{case}}.pt", weights_only=False)
            io = torch.load(f"{{sys.argv[1]}}/{{case}}.io.pt")
            classes = {{}}
            for m in model.modules():
                if type(m).__name__.startswith("Fused"):
                    assert type(m).__module__ == "vitkernels.integrations.timm", type(m)
                    classes[type(m).__name__] = classes.get(type(m).__name__, 0) + 1
            assert classes == io["classes"], (case, classes)
            seen.clear()
            with torch.no_grad(), Ops():
                torch.testing.assert_close(model(io["x"]), io["y"], atol=1e-6, rtol=1e-6)
            assert seen, case
        print("ok")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_fused_classes_importable_by_name():
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import SwinTransformerBlock

    from vitkernels.integrations.timm import FusedAttention, FusedSwinTransformerBlock

    assert issubclass(FusedAttention, Attention) and issubclass(FusedSwinTransformerBlock, SwinTransformerBlock)
    assert FusedAttention.__module__ == "vitkernels.integrations.timm"
    assert FusedAttention.__qualname__ == "FusedAttention"
    _, patched, _ = _pair("vit_tiny")
    assert type(patched.blocks[0].attn) is FusedAttention
    assert FusedAttention._timm_forward.__code__ is Attention.forward.__code__
    with pytest.raises(AttributeError):
        integration.FusedNothing  # noqa: B018


@pytest.mark.parametrize("case", ["vit_tiny", "swin_tiny_pad", "pvt_v2_b0", "mvitv2_tiny"])
def test_deepcopy_and_ema(case):
    _, patched, x = _pair(case)
    ema = timm.utils.ModelEmaV3(patched, decay=0.5)  # deep-copies the model
    assert _fused_names(ema.module) == _fused_names(patched)
    with torch.no_grad():
        _close(ema.module(x), patched(x), tol=0)
        for p in patched.parameters():
            p.add_(0.01)
        ema.update(patched)
        with OpCounter() as counter:
            ema.module(x)
    assert counter.counts
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), patched.parameters()))


def test_hooks_keep_working():
    ref, patched, x = _pair("vit_tiny")
    seen = []
    before = ref.blocks[1].attn.register_forward_hook(lambda m, a, out: seen.append(("before", type(m).__name__)))
    model = vk.patch_timm(ref)  # in place: a hook registered before patching still fires
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(("pre", type(m).__name__)))
    model.blocks[0].attn.register_forward_hook(lambda m, a, out: out * 0)  # a hook may replace the output
    with torch.no_grad():
        model(x)
    assert seen == [("pre", "FusedAttention"), ("before", "FusedAttention")]
    before.remove()


@pytest.mark.parametrize("case", IDS)
def test_forward_intermediates_and_grad_checkpointing(case):
    ref, patched, x = _pair(case)
    with torch.no_grad(), OpCounter() as counter:
        out, inter = patched.forward_intermediates(x)
        want_out, want_inter = ref.forward_intermediates(x)
    assert counter.counts
    _close(out, want_out)
    assert len(inter) == len(want_inter)
    for a, b in zip(inter, want_inter):
        _close(a, b)
    _close(patched.forward_features(x), out, tol=1e-6)
    # grad checkpointing (timm's checkpoint_seq / per-block checkpoint) recomputes the fused ops
    try:
        ref.set_grad_checkpointing(True)
    except AssertionError:  # timm's Twins has none
        return
    patched.set_grad_checkpointing(True)
    patched.train(), ref.train()
    _seeded(patched, x).square().mean().backward()
    _seeded(ref, x).square().mean().backward()
    _grads_close(patched, {n: p.grad for n, p in ref.named_parameters()})


@pytest.mark.parametrize("case", ["vit_tiny", "swin_tiny_pad", "pvt_v2_b0", "xcit_nano", "mvitv2_tiny"])
def test_features_only(case):
    """features_only=True (timm's default feature wrapper) then patch_timm: same features, fused."""
    name, kwargs, hw, _, _ = CASES[case]
    ref = timm.create_model(name, features_only=True, **kwargs).eval()
    patched = vk.patch_timm(copy.deepcopy(ref))
    x = torch.randn(1, 3, *hw)
    with torch.no_grad(), OpCounter() as counter:
        got = patched(x)
    assert counter.counts
    want = ref(x)
    assert len(got) == len(want) == len(ref.feature_info.channels())
    for g, w in zip(got, want):
        _close(g, w)


# ----------------------------------------------------------------------------- TorchScript and torch.fx


@pytest.mark.parametrize("case", IDS)
def test_torchscript(case):
    ref, patched, x = _pair(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        try:
            torch.jit.script(ref)
        except RuntimeError as e:  # the fused class scripts timm's forward too (its fallback)
            pytest.skip(f"timm's own model does not script: {str(e).splitlines()[1:2]}")
        scripted = torch.jit.script(patched)
    with torch.no_grad(), OpCounter() as counter:
        got = scripted(x)
    with torch.no_grad():
        _close(got, patched(x), tol=1e-6)
    assert set(counter.counts) == set(CASES[case][4])


def _timm_fx_extractor(model):
    """timm's fx feature-extraction set-up (its leaf modules and autowrapped functions)."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
@pytest.mark.parametrize("case", IDS)
def test_fx_symbolic_trace_forward_and_backward(case):
    pytest.importorskip("torchvision")
    ref, patched, x = _pair(case)
    try:
        torch.fx.symbolic_trace(ref)
        graph = torch.fx.symbolic_trace(patched)
    except torch.fx.proxy.TraceError:  # test_vit: timm's models need timm's tracer settings anyway
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m, name):
                return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, name)

        tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()))
        graph = torch.fx.GraphModule(patched, tracer.trace(patched))
    leaves = {
        n.target.__name__
        for n in graph.graph.nodes
        if n.op == "call_function" and getattr(n.target, "__module__", "") == integration.__name__
    }
    assert leaves and leaves <= {
        "_vit_attention",
        "_heads_attention",
        "_timm_window_attention",
        "sr_attention",
        "mix_ffn",
        "xca",
        "pool_attention",
    }
    with torch.no_grad(), OpCounter() as counter:
        got = graph(x)
    assert set(counter.counts) == set(CASES[case][4])
    with torch.no_grad():
        want = patched(x)
        _close(got, want, tol=0)
        _close(got, ref(x))
    # timm's own fx check: torchvision's feature extractor with timm's tracer settings, eval ...
    with torch.inference_mode():
        fx_eval = _timm_fx_extractor(patched).eval()
        assert torch.equal(_outputs(fx_eval(x)), want.flatten())
    # ... and train: every parameter gets a gradient, equal to the eager patched model's
    patched.train()
    fx_train = _timm_fx_extractor(patched).train()
    out = _outputs(_seeded(fx_train, x))
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in fx_train.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert len(grads) == len(list(patched.parameters()))  # every parameter got a gradient through the graph
    patched.zero_grad()
    _outputs(_seeded(patched, x)).square().mean().backward()
    _grads_close(fx_train, {n: p.grad for n, p in patched.named_parameters()}, tol=1e-6)


@pytest.mark.parametrize("case", ["vit_tiny", "swin_tiny_pad", "pvt_v2_b0", "xcit_nano"])
def test_fx_feature_graph_net(case):
    """timm's FeatureGraphNet (what features_only=True, feature_cls='fx' builds) over the patched model,
    and TorchScript of it."""
    from timm.models import FeatureGraphNet

    ref, patched, x = _pair(case)
    out_indices = tuple(range(len(ref.feature_info)))[-2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got = FeatureGraphNet(ref, out_indices)(x), FeatureGraphNet(patched, out_indices)
        scripted = torch.jit.script(got)
    with torch.no_grad(), OpCounter() as counter:
        got_out = got(x)
    assert counter.counts and set(counter.counts) <= set(CASES[case][4])  # (XCiT's features end before class attention)
    for g, w, s in zip(got_out, want, scripted(x)):
        _close(g, w)
        _close(s, g, tol=1e-6)


def test_patching_a_traced_feature_net_says_why_nothing_fused(caplog):
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, features_only=True, feature_cls="fx"
    )
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(model)
    assert "nothing fused" in caplog.text and "patch the model first, then trace it" in caplog.text


# ----------------------------------------------------------------------------- torch.compile and torch.export


def _graph_capturing_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("case", ["vit_tiny", "swin_tiny_pad", "mvitv2_tiny"])
def test_torch_compile_fullgraph(case):
    """No graph break anywhere in the patched model, with the vitkernels op in the one graph."""
    torch._dynamo.reset()
    ref, patched, x = _pair(case, **{"vit_tiny": {"depth": 1}, "swin_tiny_pad": {"depths": (2, 1, 1, 1)}}.get(case, {}))
    graphs = []
    compiled = torch.compile(patched, fullgraph=True, backend=_graph_capturing_backend(graphs))
    with torch.no_grad():
        _close(compiled(x), ref(x))
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("vitkernels" in t for t in targets), targets
    torch._dynamo.reset()


def test_torch_compile_fullgraph_through_the_training_fallback():
    """Attention dropout while training runs timm's forward: still one graph (the warning is skipped
    while dynamo traces)."""
    torch._dynamo.reset()
    ref, patched, x = _pair("vit_tiny", depth=1, attn_drop_rate=0.1)
    ref.train(), patched.train()
    graphs = []
    compiled = torch.compile(patched, fullgraph=True, backend=_graph_capturing_backend(graphs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integration.FusedFallbackWarning)
        _close(_seeded(compiled, x), _seeded(ref, x))
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_torch_compile_inductor_tiny_vit():
    torch._dynamo.reset()
    ref, patched, x = _pair("vit_tiny", depth=1)
    with torch.no_grad():
        _close(torch.compile(patched, fullgraph=True)(x), ref(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["vit_tiny", "swin_tiny_pad", "pvt_v2_b0", "xcit_nano", "mvitv2_tiny"])
def test_torch_export(case):
    ref, patched, x = _pair(case)
    ep = torch.export.export(patched, (x,))
    assert any(str(n.target).startswith("vitkernels.") for n in ep.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        _close(ep.module()(x), ref(x))


# ----------------------------------------------------------------------------- logging and warnings


def test_patch_log_says_what_was_fused_and_what_was_kept(caplog):
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(timm.create_model("xcit_nano_12_p16_224", img_size=32, patch_size=8, depth=2))
    assert "patch_timm(Xcit): fused 2 × timm.models.xcit.XCA -> FusedXCA (vitkernels.xca)" in caplog.text
    assert "patch_timm(Xcit): fused 2 × timm.models.cait.ClassAttn -> FusedClassAttn" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1))
    assert (
        "kept the original forward of 1 × timm.models.cait.TalkingHeadAttn: no fused op covers this module class"
        in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        model = vk.patch_timm(timm.create_model("resnet10t"))
    assert "nothing fused" in caplog.text and _fused_names(model) == {}
    caplog.clear()
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=(40, 56), window_size=4, depths=(1, 1, 1, 1), strict_img_size=False
    )
    with caplog.at_level(logging.INFO, logger="vitkernels"):
        vk.patch_timm(model)
        vk.patch_timm(model)  # patching twice changes nothing
    assert "fused 3 × timm.models.swin_transformer.SwinTransformerBlock -> FusedSwinTransformerBlock" in caplog.text
    assert (
        "kept the original forward of 1 × timm.models.swin_transformer.SwinTransformerBlock: non-square window"
        in caplog.text
    )
    assert "already fused" in caplog.text
    assert all(r.name == "vitkernels" for r in caplog.records)


def test_dropout_while_training_falls_back_and_warns_once_per_reason(monkeypatch):
    monkeypatch.setattr(_patching, "_WARNED", set())
    ref, patched, x = _pair("vit_tiny", attn_drop_rate=0.1)
    ref.train(), patched.train()
    with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.random.fork_rng():
                torch.manual_seed(1)
                got = patched(x)
            with torch.random.fork_rng():
                torch.manual_seed(1)
                want = ref(x)
            _close(got, want)  # timm's own forward ran, same dropout masks
    fallback = [w for w in caught if issubclass(w.category, integration.FusedFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert (
        "FusedAttention (timm.layers.attention.Attention) runs timm's own forward: attention dropout while "
        "training" in str(fallback[0].message)
    )
    assert "_self_attention_fwd" not in counter.counts
    patched.eval()  # dropout inactive: fused again, silently
    with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
        warnings.simplefilter("always")
        patched(x)
    assert not [w for w in caught if issubclass(w.category, integration.FusedFallbackWarning)]
    assert counter.counts.get("_self_attention_fwd") == 3
    with warnings.catch_warnings():  # the scripted model has the fallback too, without the warning
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(patched.train())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        got = scripted(x)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        want = ref(x)
    _close(got, want)


def test_swinv2_cr_meta_mlp_dropout_while_training_falls_back():
    """timm's v2_cr draws its meta-MLP dropout per pair of tokens; the fused table has one entry per
    offset, so training with that dropout runs timm's forward (warned once); eval stays fused."""
    ref = timm.create_model("swinv2_cr_tiny_224", img_size=(32, 32), window_size=4, depths=(2, 1, 1, 1)).eval()
    patched = vk.patch_timm(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), OpCounter() as counter:
        _close(patched(x), ref(x))
    assert counter.counts
    patched.train(), ref.train()
    with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
        warnings.simplefilter("always")
        _close(_seeded(patched, x), _seeded(ref, x))
    assert not counter.counts
    assert any("meta MLP's dropout" in str(w.message) for w in caught)
