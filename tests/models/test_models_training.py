"""Training features of every vitkernels.models family (SPEC.md "Mixed precision, saving, training at
scale"): `drop_path_rate` (stochastic depth as timm / transformers apply it), `set_grad_checkpointing`,
`forward_features` / `forward_head`, and state_dicts unchanged by them. Tiny configs, float32, CPU."""

import copy
import io

import pytest
import torch

import vitkernels.models._layers as layers
from vitkernels.models import convert_hf_segformer, convert_hf_timesformer, create_model
from vitkernels.models._layers import DropPath, drop_path_rates

# family: (model name, tiny overrides, input shape)
FAMILIES = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=32, embed_dim=32, depth=3, num_heads=2, num_classes=5),
        (2, 3, 32, 32),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=5),
        (2, 3, 32, 32),
    ),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32, 40, 64), depths=(1, 2, 1, 1), num_classes=5), (2, 3, 64, 64)),
    "segformer": (
        "segformer_b0",
        dict(embed_dims=(16, 32, 40, 64), depths=(1, 2, 1, 1), decoder_hidden_size=16, num_classes=5),
        (2, 3, 64, 64),
    ),
    "xcit": ("xcit_tiny_12_p16_224", dict(embed_dim=32, depth=2, num_heads=4, num_classes=5), (2, 3, 32, 32)),
    "mvitv2": (
        "mvitv2_tiny",
        dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_classes=5),
        (2, 3, 64, 64),
    ),
    "timesformer": (
        "timesformer_base_patch16_224",
        dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_frames=4, num_classes=5),
        (2, 3, 4, 32, 32),
    ),
    "vivit": (
        "vivit_base_factorized",
        dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_frames=8, num_classes=5),
        (2, 3, 8, 32, 32),
    ),
}
# timm builds these with the same names and overrides (timm's mvitv2_* take no size overrides: MViTv2's
# timm parity, drop path and checkpointing included, is in test_models_mvitv2.py)
TIMM = ("vit", "swin", "pvt_v2", "xcit")
# blocks (each with drop paths, each checkpointed) of the tiny configurations above
N_BLOCKS = {"vit": 3, "swin": 4, "pvt_v2": 5, "segformer": 5, "xcit": 4, "mvitv2": 5, "timesformer": 2, "vivit": 2}


def build(family, **kwargs):
    name, kw, shape = FAMILIES[family]
    return create_model(name, **{**kw, **kwargs}), torch.randn(*shape)


def drop_probs(model, attr="drop_path1"):
    """The stochastic-depth rate of every module holding `attr`, in module order (a missing or
    nn.Identity drop path counts as 0) — works on vitkernels, timm and transformers models alike."""
    return [
        float(getattr(getattr(m, attr), "drop_prob", 0.0))
        for m in model.modules()
        if isinstance(getattr(m, attr, None), torch.nn.Module)
    ]


def all_rates(model):
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


# ----------------------------------------------------------------------------- DropPath itself


def test_drop_path_is_per_sample_and_rescaled():
    dp = DropPath(0.25).train()
    y = dp(torch.ones(4000, 3, 5))
    rows = y.reshape(4000, -1)
    assert ((rows == 0).all(1) | (rows == 1 / 0.75).all(1)).all()  # a whole sample kept (scaled) or dropped
    assert abs((rows[:, 0] == 0).float().mean().item() - 0.25) < 0.04
    assert abs(y.mean().item() - 1.0) < 0.06  # expectation preserved


@pytest.mark.parametrize("style", ["timm", "hf"])
def test_drop_path_inactive_draws_nothing(style):
    x = torch.randn(3, 4)
    for dp in (DropPath(0.3, style).eval(), DropPath(0.0, style).train()):
        state = torch.get_rng_state()
        assert dp(x) is x and dp.mask((3, 1), x) is None
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(DropPath(1.0, style).train()(x), torch.zeros_like(x))  # no 0/0


def test_drop_path_bad_arguments():
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)
    with pytest.raises(ValueError, match="style"):
        DropPath(0.1, style="jax")


def test_drop_path_draws_as_timm_and_transformers():
    x = torch.randn(64, 7, 3)
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    ref = timm.layers.DropPath(0.4).train()(x)
    torch.manual_seed(5)
    torch.testing.assert_close(DropPath(0.4).train()(x), ref)
    seg = pytest.importorskip("transformers.models.segformer.modeling_segformer")
    torch.manual_seed(5)
    ref = seg.SegformerDropPath(0.4).train()(x)
    torch.manual_seed(5)
    torch.testing.assert_close(DropPath(0.4, style="hf").train()(x), ref)


def test_schedule_is_linear_from_zero():
    assert drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]
    assert drop_path_rates(0.3, 1) == [0.0]
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- schedules per family


def test_default_rates_follow_the_reference_libraries():
    # timm: ViT, PVTv2, XCiT 0, Swin 0.1; transformers SegformerConfig 0.1; TimesformerConfig 0
    expected = {
        "vit": 0.0,
        "swin": 0.1,
        "pvt_v2": 0.0,
        "segformer": 0.1,
        "xcit": 0.0,
        "mvitv2": 0.0,
        "timesformer": 0.0,
        "vivit": 0.0,
    }
    for family, rate in expected.items():
        model, _ = build(family)
        assert max(all_rates(model)) == pytest.approx(rate), family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rate_schedule(family):
    model, _ = build(family, drop_path_rate=0.5)
    if family == "xcit":  # timm's XCiT: the same rate in every XCA block, none in class attention
        for attr in ("drop_path1", "drop_path3", "drop_path2"):
            assert [b.__getattr__(attr).drop_prob for b in model.blocks] == [0.5, 0.5]
        assert not any(isinstance(m, DropPath) and m.drop_prob for m in model.cls_attn_blocks.modules())
        return
    attr = "drop_path" if family in ("timesformer", "vivit") else "drop_path1"
    got = drop_probs(model, attr)
    assert got == drop_path_rates(0.5, len(got))  # one ramp over every block of every stage
    assert len(got) == N_BLOCKS[family]
    if attr == "drop_path1":
        assert drop_probs(model, "drop_path2") == got


@pytest.mark.parametrize("family", TIMM)
def test_rate_schedule_equals_timm(family):
    timm = pytest.importorskip("timm")
    name, kw, _ = FAMILIES[family]
    ref = timm.create_model(name, pretrained=False, drop_path_rate=0.5, **kw)
    ours = create_model(name, drop_path_rate=0.5, **kw)
    for attr in ("drop_path1", "drop_path2", "drop_path3"):
        assert drop_probs(ours, attr) == drop_probs(ref, attr), attr


def test_rate_schedule_equals_transformers_segformer():
    transformers = pytest.importorskip("transformers")
    ref = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(depths=[1, 2, 1, 1]))
    ours = create_model("segformer_b0", depths=(1, 2, 1, 1))  # both at their default rate, 0.1
    hf = [float(getattr(m.drop_path, "drop_prob", 0.0)) for m in ref.modules() if type(m).__name__ == "SegformerLayer"]
    assert drop_probs(ours) == pytest.approx(hf) and max(hf) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- train / eval behaviour


@pytest.mark.parametrize("family", list(FAMILIES))
def test_drop_path_only_acts_in_training(family):
    kw = {"classifier_dropout": 0.0} if family == "segformer" else {}
    model, x = build(family, drop_path_rate=0.5, **kw)
    plain, _ = build(family, drop_path_rate=0.0, **kw)
    plain.load_state_dict(model.state_dict(), strict=True)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model.train(), plain.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        b = plain(x)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------- parity with the references


def _same_step(ours, ref, x, ref_call, convert=dict):
    """One seeded train-mode forward/backward of both; outputs and every gradient must agree
    (`convert` maps a dict keyed by the reference's parameter names to vitkernels names)."""
    outs, grads = [], []
    for model, call in ((ref, ref_call), (ours, lambda m, t: m(t))):
        model.train()
        model.zero_grad()
        torch.manual_seed(1234)
        y = call(model, x)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-4)
    want = convert(grads[0])
    assert set(want) == set(grads[1])
    for name, g in want.items():
        torch.testing.assert_close(grads[1][name], g, atol=2e-5, rtol=2e-4, msg=lambda m, name=name: f"{name}: {m}")
    return outs[1]


@pytest.mark.parametrize("family", TIMM)
def test_train_step_with_drop_path_equals_timm(family):
    timm = pytest.importorskip("timm")
    name, kw, shape = FAMILIES[family]
    ref = timm.create_model(name, pretrained=False, drop_path_rate=0.5, **kw)
    ours = create_model(name, drop_path_rate=0.5, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(*shape)
    y = _same_step(ours, ref, x, lambda m, t: m(t))
    ours.eval(), ref.eval()
    with torch.no_grad():
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), atol=2e-5, rtol=2e-4)  # same layout as timm
        torch.testing.assert_close(
            ours.forward_head(feats, pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=2e-5,
            rtol=2e-4,
        )
        assert not torch.allclose(y, ours(x), atol=1e-4)  # the seeded masks did drop something


def test_train_step_with_drop_path_equals_transformers_segformer():
    transformers = pytest.importorskip("transformers")
    _, kw, shape = FAMILIES["segformer"]
    config = transformers.SegformerConfig(
        num_labels=5, depths=[1, 2, 1, 1], hidden_sizes=[16, 32, 40, 64], decoder_hidden_size=16, drop_path_rate=0.5
    )
    ref = transformers.SegformerForSemanticSegmentation(config)
    ours = create_model("segformer_b0", drop_path_rate=0.5, **kw)
    ours.load_state_dict(convert_hf_segformer(ref.state_dict()), strict=True)
    x = torch.randn(*shape)
    # decode-head dropout (0.1 in both) and BatchNorm on batch statistics run as well
    _same_step(ours, ref, x, lambda m, t: m(pixel_values=t).logits, convert_hf_segformer)
    ours.eval(), ref.eval()
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
        feats = ours.forward_features(x)
        assert len(feats) == 4
        for got, want in zip(feats, hidden):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)


def test_train_step_with_drop_path_equals_transformers_timesformer():
    """TimeSformer drops per (clip, position) in its temporal branch and per (clip, frame) in its spatial
    branch, as the official code and transformers do; same seed -> same masks -> same step."""
    transformers = pytest.importorskip("transformers")
    mod = pytest.importorskip("transformers.models.timesformer.modeling_timesformer")
    _, kw, shape = FAMILIES["timesformer"]
    config = transformers.TimesformerConfig(
        image_size=32,
        patch_size=16,
        num_frames=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=5,
    )
    ref = transformers.TimesformerForVideoClassification(config)
    # (TimesformerConfig types drop_path_rate as an int, so its float schedule is set on the layers)
    for layer, rate in zip(ref.timesformer.encoder.layer, drop_path_rates(0.6, 2)):
        layer.drop_path = mod.TimesformerDropPath(rate) if rate > 0 else torch.nn.Identity()
    ours = create_model("timesformer_base_patch16_224", drop_path_rate=0.6, **kw)
    ours.load_state_dict(convert_hf_timesformer(ref.state_dict()), strict=True)
    x = torch.randn(*shape)
    y = _same_step(ours, ref, x, lambda m, t: m(pixel_values=t.transpose(1, 2)).logits, convert_hf_timesformer)
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(y, ours(x), atol=1e-4)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grad_checkpointing_same_loss_and_grads(family, monkeypatch):
    model, x = build(family, drop_path_rate=0.4)
    ckpt = copy.deepcopy(model)
    assert model.grad_checkpointing is False
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing is True
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *a, **k: calls.append(k) or real(fn, *a, **k))
    results = []
    for m in (model, ckpt):
        m.train()
        torch.manual_seed(7)
        loss = m(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert len(calls) == N_BLOCKS[family] and all(k == {"use_reentrant": False} for k in calls)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(
            results[1][1][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    # no checkpointing in eval / no-grad inference, nor once disabled
    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    ckpt.train()
    ckpt.set_grad_checkpointing(False)
    ckpt(x)
    assert calls == [] and ckpt.grad_checkpointing is False


# ----------------------------------------------------------------------------- forward_features / forward_head


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_is_head_of_features(family):
    model, x = build(family, drop_path_rate=0.2)
    model.eval()
    with torch.no_grad():
        y = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), y, rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
    b = x.shape[0]
    if family == "segformer":
        assert [tuple(f.shape) for f in feats] == [(b, 16, 16, 16), (b, 32, 8, 8), (b, 40, 4, 4), (b, 64, 2, 2)]
        assert pre.shape == (b, 16, 16, 16) and y.shape == (b, 5, 16, 16)
        return
    expected = {
        "vit": (b, 5, 32),
        "swin": (b, 4, 4, 32),
        "pvt_v2": (b, 64, 2, 2),
        "xcit": (b, 5, 32),
        "mvitv2": (b, 2 * 2, 128),  # tokens of the last 2x2 map, width 16·8
        "timesformer": (b, 1 + 4 * 4, 32),
        "vivit": (b, 4 * 4, 32),
    }[family]
    assert tuple(feats.shape) == expected
    assert pre.shape == (b, expected[1] if family == "pvt_v2" else expected[-1]) and y.shape == (b, 5)


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_round_trip_strict(family):
    model, x = build(family, drop_path_rate=0.3)
    model.set_grad_checkpointing()
    plain, _ = build(family, drop_path_rate=0.0)
    assert list(model.state_dict()) == list(plain.state_dict())  # DropPath has no parameters or buffers
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    clone = copy.deepcopy(model)  # EMA-style copies keep the features
    assert clone.grad_checkpointing and all_rates(clone) == all_rates(model)
    model.eval(), plain.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
