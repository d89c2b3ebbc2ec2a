"""Hugging Face video checkpoints: `convert_hf_timesformer` (TimesformerForVideoClassification ->
`timesformer_base_patch16_224`) and `convert_hf_vivit` (VivitForVideoClassification ->
`vivit_b_16x2_kinetics400`, ViViT model 1). Small random transformers configs: strict load, logits and
every parameter's gradient equal transformers' (float32), the Triton path (interpreter on CPU), the
default (real-size) configs once each, key layouts and clear errors. Skips without transformers."""

import os

import pytest
import torch

import vitkernels as vk
from vitkernels.models import convert_hf_timesformer, convert_hf_vivit, create_model

transformers = pytest.importorskip("transformers")

TS = "timesformer_base_patch16_224"
VV = "vivit_b_16x2_kinetics400"


def timesformer_config(**kw):
    base = dict(
        image_size=32,
        patch_size=16,
        num_frames=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=5,
    )
    return transformers.TimesformerConfig(**{**base, **kw})


def vivit_config(**kw):
    base = dict(
        image_size=32,
        num_frames=4,
        tubelet_size=[2, 16, 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.VivitConfig(**{**base, **kw})


def _size(v):
    return v if isinstance(v, int) else tuple(v)


def ours_for(config):
    """The vitkernels model a transformers config describes (create_model kwargs from the config)."""
    common = dict(
        num_frames=config.num_frames,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        num_classes=config.num_labels,
    )
    if config.model_type == "timesformer":
        assert config.attention_type == "divided_space_time" and config.hidden_act == "gelu"
        return create_model(TS, img_size=config.image_size, patch_size=config.patch_size, **common)
    t, ph, pw = config.tubelet_size
    return create_model(
        VV,
        img_size=_size(config.image_size),
        patch_size=(ph, pw),
        tubelet_size=t,
        hidden_act=config.hidden_act,
        **common,
    )


def hf_model(config):
    cls = (
        transformers.TimesformerForVideoClassification
        if config.model_type == "timesformer"
        else transformers.VivitForVideoClassification
    )
    model = cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random (LayerNorms and ViViT's zero-initialised embeddings too)
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0  # LayerNorm scales near 1
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model


def convert(config):
    return convert_hf_timesformer if config.model_type == "timesformer" else convert_hf_vivit


def pair(config):
    ref = hf_model(config)
    ours = ours_for(config).eval()
    ours.load_state_dict(convert(config)(ref.state_dict()), strict=True)
    return ref, ours


def hf_logits(ref, clip, **kw):
    return ref(pixel_values=clip.transpose(1, 2), **kw).logits  # transformers: (B, T, 3, H, W)


def clip_for(config, batch=2, gen_seed=2):
    s = _size(config.image_size)
    h, w = (s, s) if isinstance(s, int) else s
    return torch.randn(batch, 3, config.num_frames, h, w, generator=torch.Generator().manual_seed(gen_seed))


def assert_grads_equal(ours, ref, config):
    want = convert(config)({n: p.grad for n, p in ref.named_parameters()})
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert set(want) == set(got)
    for name, g in want.items():
        assert got[name] is not None, name
        tol = 2e-5 * max(1.0, g.abs().max().item())
        torch.testing.assert_close(got[name], g, atol=tol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


SMALL = {
    "timesformer": timesformer_config,
    "timesformer-eps1e-2": lambda: timesformer_config(layer_norm_eps=1e-2, num_frames=3),
    "vivit": vivit_config,
    "vivit-nobias-eps1e-2-gelu": lambda: vivit_config(
        qkv_bias=False, layer_norm_eps=1e-2, hidden_act="gelu", num_frames=6, image_size=[48, 32]
    ),
}


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("case", list(SMALL))
def test_logits_and_gradients_equal_transformers(case):
    config = SMALL[case]()
    ref, ours = pair(config)
    x = clip_for(config)
    w = torch.randn(x.shape[0], config.num_labels, generator=torch.Generator().manual_seed(3))
    want = hf_logits(ref, x)
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert_grads_equal(ours, ref, config)


@pytest.mark.parametrize("case", ["timesformer", "vivit"])
def test_features_equal_transformers_base_model(case):
    """The base model's state_dict (TimesformerModel / VivitModel without pooler: no prefix, no classifier)
    converts too; with num_classes=0 our forward_features equals transformers' last_hidden_state (same token
    order: class token, then "st" for TimeSformer, frame-major for ViViT)."""
    config = SMALL[case]()
    ref = hf_model(config)
    base = ref.timesformer if case == "timesformer" else ref.vivit
    config.num_labels = 0
    ours = ours_for(config).eval()
    ours.load_state_dict(convert(config)(base.state_dict()), strict=True)
    x = clip_for(config)
    with torch.no_grad():
        want = base(pixel_values=x.transpose(1, 2)).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), want, atol=1e-5, rtol=1e-5)
        assert ours(x).shape == want[:, 0].shape


def test_parity_details():
    """What the converter relies on: LayerNorm eps from the config, the activations, qkv bias."""
    ts, vv = ours_for(timesformer_config(layer_norm_eps=1e-2)), ours_for(vivit_config(qkv_bias=False))
    assert {m.eps for m in ts.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-2}
    assert {m.eps for m in vv.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}  # VivitConfig default
    assert transformers.VivitConfig().layer_norm_eps == 1e-6 and transformers.VivitConfig().hidden_act == "gelu_fast"
    assert transformers.TimesformerConfig().layer_norm_eps == 1e-6
    assert all(b.attn.qkv.bias is None for b in vv.blocks)
    act = transformers.activations.ACT2FN["gelu_fast"]
    x = torch.linspace(-8, 8, 4001)
    assert torch.equal(vv.blocks[0].mlp.act(x), act(x))  # same formula, same constants, same order
    assert isinstance(ts.blocks[0].mlp.act, torch.nn.GELU) and ts.blocks[0].mlp.act.approximate == "none"


def test_vivit_other_spatial_size_matches_transformers_interpolation():
    """At one tubelet in time (T' = 1) transformers' `interpolate_pos_encoding` (bicubic, align_corners=False,
    class entry kept) is well defined, and ours resamples the same way (it only does so for H != W)."""
    config = vivit_config(num_frames=2)
    ref, ours = pair(config)
    x = torch.randn(2, 3, 2, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(ref, x, interpolate_pos_encoding=True), atol=1e-5, rtol=1e-5)


def test_vivit_other_frame_count_resamples_time_linearly():
    model = ours_for(vivit_config(num_frames=4, image_size=32)).eval()  # grid (2, 2, 2)
    pos = model.pos_embed.detach()
    p = pos[0, 1:].reshape(2, 4, -1)
    got = model._pos_embed((4, 2, 2)).detach()
    want = torch.stack([p[0], 0.75 * p[0] + 0.25 * p[1], 0.25 * p[0] + 0.75 * p[1], p[1]])  # align_corners=False
    torch.testing.assert_close(got[0, 1:], want.reshape(16, -1))
    torch.testing.assert_close(got[:, :1], pos[:, :1])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 6, 48, 32))).all()  # T' = 3, 3 × 2 map


def test_triton_path_equals_transformers():
    """Every fused op forced to the Triton backend (the interpreter on CPU): logits and gradients of both
    converted models equal transformers'."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for config in (timesformer_config(num_hidden_layers=1), vivit_config(num_hidden_layers=1)):
        ref, ours = pair(config)
        ref, ours = ref.to(device), ours.to(device)
        x = clip_for(config).to(device)
        want = hf_logits(ref, x)
        want.sum().backward()
        with vk.use_backend("triton"):
            got = ours(x)
            got.sum().backward()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert_grads_equal(ours.cpu(), ref.cpu(), config)


# ----------------------------------------------------------------------------- real-size configurations


def _real(config, name, **kw):
    torch.manual_seed(0)
    ref = (
        transformers.TimesformerForVideoClassification
        if config.model_type == "timesformer"
        else transformers.VivitForVideoClassification
    )(config).eval()
    ours = create_model(name, **kw).eval()
    ours.load_state_dict(convert(config)(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, config.num_frames, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(ref, x), atol=1e-4, rtol=1e-4)


def test_real_size_timesformer():
    """TimesformerConfig defaults (the facebook/timesformer-base-finetuned-k400 architecture, 8 frames at 224 px,
    1 + 196·8 tokens), random weights, one forward each."""
    _real(transformers.TimesformerConfig(num_labels=400), TS)


_SLOW = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VITKERNELS_TEST_SLOW") != "1", reason="set VITKERNELS_TEST_SLOW=1"),
]


@pytest.mark.parametrize("frames", [16, pytest.param(32, marks=_SLOW)])
def test_real_size_vivit(frames):
    """VivitConfig defaults (the google/vivit-b-16x2-kinetics400 architecture: hidden 768, 12 layers, 12 heads,
    gelu_fast, eps 1e-6), random weights, one forward each. By default at 16 frames (1 + 8·196 tokens); the
    checkpoint's 32 frames (1 + 16·196 = 3137 tokens) runs with VITKERNELS_TEST_SLOW=1: its two CPU forwards
    take 25-40 s on 2 cores."""
    _real(transformers.VivitConfig(num_labels=400, num_frames=frames), VV, num_frames=frames)


@pytest.mark.parametrize("name", [TS, VV])
def test_default_model_shapes_equal_converted_default_config(name):
    """create_model(name) has exactly the keys and shapes of the converted default transformers config (400
    classes, as the public checkpoints) — built on the meta device."""
    config = (transformers.TimesformerConfig if name == TS else transformers.VivitConfig)(num_labels=400)
    with torch.device("meta"):
        ref = (
            transformers.TimesformerForVideoClassification if name == TS else transformers.VivitForVideoClassification
        )(config)
        ours = create_model(name)
    want = {k: tuple(v.shape) for k, v in convert(config)(ref.state_dict()).items()}
    assert want == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if name == VV:
        assert want["pos_embed"] == (1, 1 + 16 * 196, 768) and want["patch_embed.proj.weight"] == (768, 3, 2, 16, 16)
        assert want["blocks.0.attn.qkv.weight"] == (3 * 768, 768)


# ----------------------------------------------------------------------------- key layouts and errors

_LEGACY_VIVIT = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def to_legacy_vivit(sd):
    """transformers-5 ViViT names -> the Hub checkpoints' / transformers-4 names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("vivit.layers."):
            i, rest = k[len("vivit.layers.") :].split(".", 1)
            mod, p = rest.rsplit(".", 1)
            k = f"vivit.encoder.layer.{i}.{_LEGACY_VIVIT.get(mod, mod)}.{p}"
        out[k] = v
    return out


def test_vivit_legacy_and_current_layouts_convert_alike():
    sd = hf_model(vivit_config()).state_dict()
    assert any(".attention.q_proj." in k for k in sd)  # transformers >= 5 names
    legacy = to_legacy_vivit(sd)
    assert any(".attention.attention.query." in k for k in legacy) and len(legacy) == len(sd)
    a, b = convert_hf_vivit(sd), convert_hf_vivit(legacy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q, k, v = (sd[f"vivit.layers.1.attention.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(a["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))


@pytest.mark.parametrize("case", ["timesformer", "vivit"])
def test_saved_checkpoint_file_converts(case, tmp_path):
    """What `save_pretrained` writes (and the Hub serves: transformers 5 saves ViViT in the legacy layout)
    converts to the same tensors as the live `state_dict()`."""
    safetensors = pytest.importorskip("safetensors.torch")
    config = SMALL[case]()
    ref = hf_model(config)
    ref.save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files
    disk = {k: v for f in files for k, v in safetensors.load_file(str(f)).items()}
    a, b = convert(config)(ref.state_dict()), convert(config)(disk)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converter_errors_are_clear():
    ts = hf_model(timesformer_config()).state_dict()
    with pytest.raises(ValueError, match=r"convert_hf_timesformer: unrecognised key\(s\) \['timesformer.foo'\]"):
        convert_hf_timesformer({**ts, "timesformer.foo": torch.zeros(1)})
    vv = hf_model(vivit_config()).state_dict()
    with pytest.raises(ValueError, match=r"unrecognised key\(s\) \['vivit.pooler.dense.weight'\].*pooler"):
        convert_hf_vivit({**vv, "vivit.pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight' needs the query, key and value.*missing value"):
        convert_hf_vivit({k: v for k, v in vv.items() if k != "vivit.layers.0.attention.v_proj.weight"})
    with pytest.raises(ValueError, match="already filled"):
        convert_hf_vivit({**vv, **to_legacy_vivit(vv)})
    with pytest.raises(ValueError, match="convert_hf_vivit: unrecognised"):  # a TimeSformer state_dict
        convert_hf_vivit(ts)
    # a wrong architecture: torch's strict load names the keys
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"blocks\.1\."):
        ours_for(timesformer_config(num_hidden_layers=1)).load_state_dict(convert_hf_timesformer(ts), strict=True)
    with pytest.raises(RuntimeError, match=r"size mismatch for pos_embed"):
        ours_for(vivit_config(num_frames=8)).load_state_dict(convert_hf_vivit(vv), strict=True)
    with pytest.raises(ValueError, match="hidden_act"):
        create_model(VV, hidden_act="swish")


# ----------------------------------------------------------------------------- ViViT model 1 training features


def test_vivit_training_features():
    config = vivit_config()
    model = ours_for(config)
    x = clip_for(config)
    assert [b.drop_path1.drop_prob for b in model.blocks] == [0.0, 0.0]  # transformers' ViViT has no drop path
    dp = create_model(
        VV, img_size=32, num_frames=4, embed_dim=32, depth=3, num_heads=2, num_classes=5, drop_path_rate=0.4
    )
    assert [b.drop_path2.drop_prob for b in dp.blocks] == pytest.approx([0.0, 0.2, 0.4])
    dp.eval()
    plain = create_model(VV, img_size=32, num_frames=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    plain.load_state_dict(dp.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(dp(x), plain(x))  # eval: no drop
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=lambda m, n=n: f"{n}: {m}")
