"""Swin V2 models (`vitkernels/models/swinv2.py`): timm parameter names, equality with an independent
eager forward (float64, the test oracle's window attention) and with timm's SwinTransformerV2 (outputs and
every gradient, float32), the Triton path (interpreter on CPU), other input sizes, autocast, training
features. Tiny configurations, plus the real swinv2_tiny_window8_256 once (eval forward)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
import vitkernels.models._layers as layers
from vitkernels.models import create_model
from vitkernels.models._layers import DropPath, drop_path_rates

import oracles

NAMES = {  # name: (embed_dim, depths, heads, window)
    "swinv2_tiny_window8_256": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8),
    "swinv2_small_window8_256": (96, (2, 2, 18, 2), (3, 6, 12, 24), 8),
    "swinv2_base_window8_256": (128, (2, 2, 18, 2), (4, 8, 16, 32), 8),
    "swinv2_tiny_window16_256": (96, (2, 2, 6, 2), (3, 6, 12, 24), 16),
    "swinv2_small_window16_256": (96, (2, 2, 18, 2), (3, 6, 12, 24), 16),
    "swinv2_base_window16_256": (128, (2, 2, 18, 2), (4, 8, 16, 32), 16),
}
NAME = "swinv2_tiny_window8_256"

# tiny configurations (kwargs for both timm.create_model(NAME, ...) and create_model(NAME, ...), input shape)
SMALL = {
    # maps 16x16 and 8x8 under windows of 4, shifted on odd blocks
    "w4": (dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4), (2, 3, 64, 64)),
    # maps 16, 8 (= window: no shift), 4 (window clamped to 4, its own coordinate table)
    "w8_clamped": (
        dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=8),
        (2, 3, 64, 64),
    ),
    # maps 18x22 and 9x11: padded windows, shifted first (timm's order)
    "padded": (dict(img_size=(72, 88), embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4), (2, 3, 72, 88)),
    # coordinate tables normalised by the pre-training windows
    "pretrained_window": (
        dict(
            img_size=64,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(1, 2),
            window_size=4,
            pretrained_window_sizes=(6, 3, 0, 0),
        ),
        (2, 3, 64, 64),
    ),
    # windows of 8 on 8x8 and 4x4 maps, shifted anyway: the window is larger than the map
    "always_partition": (
        dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=8, always_partition=True),
        (2, 3, 32, 32),
    ),
    "no_qkv_bias": (
        dict(img_size=32, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, qkv_bias=False),
        (2, 3, 32, 32),
    ),
}


def timm_swinv2_keys(dim, depths, heads, num_classes=1000):
    """timm (1.0) SwinTransformerV2 state_dict keys and shapes, in order."""
    keys = {
        "patch_embed.proj.weight": (dim, 3, 4, 4),
        "patch_embed.proj.bias": (dim,),
        "patch_embed.norm.weight": (dim,),
        "patch_embed.norm.bias": (dim,),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = dim * 2**i
        if i > 0:
            keys.update(
                {
                    f"layers.{i}.downsample.reduction.weight": (c, 2 * c),
                    f"layers.{i}.downsample.norm.weight": (c,),
                    f"layers.{i}.downsample.norm.bias": (c,),
                }
            )
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update(
                {
                    p + "attn.logit_scale": (h, 1, 1),
                    p + "attn.q_bias": (c,),
                    p + "attn.v_bias": (c,),
                    p + "attn.cpb_mlp.0.weight": (512, 2),
                    p + "attn.cpb_mlp.0.bias": (512,),
                    p + "attn.cpb_mlp.2.weight": (h, 512),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c),
                    p + "mlp.fc2.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                }
            )
    c = dim * 2 ** (len(depths) - 1)
    keys.update(
        {"norm.weight": (c,), "norm.bias": (c,), "head.fc.weight": (num_classes, c), "head.fc.bias": (num_classes,)}
    )
    return keys


def _randomize(model, scale=0.05):
    """Non-trivial weights everywhere (timm zero-initialises the res-post norms and the q/v biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.add_(1.0)
            p.add_(scale * torch.randn_like(p))
    return model


def _timm():
    return pytest.importorskip("timm")


def _pair(kwargs, timm_kwargs=None):
    """(timm model, ours) with the same random weights, eval mode."""
    timm = _timm()
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(NAME, pretrained=False, **(timm_kwargs or kwargs))).eval()
    ours = create_model(NAME, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _grads_close(ours, ref, tol=1e-5, floor=1e-6):
    """Every parameter's grad within tol x that tensor's largest |grad| (+ floor x the model's largest)."""
    want = dict(ref.named_parameters())
    floor = floor * max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for name, p in ours.named_parameters():
        g = want[name].grad
        assert p.grad is not None and g is not None, name
        err = (p.grad - g).abs().max().item()
        assert err <= tol * g.abs().max().item() + floor, f"{name}: error {err:.3g}, max |grad| {g.abs().max():.3g}"


def _train_step(model, x, seed=1234):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    return y.detach()


# ----------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("name", list(NAMES))
def test_state_dict_keys_and_shapes(name):
    dim, depths, heads, _ = NAMES[name]
    with torch.device("meta"):
        model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = timm_swinv2_keys(dim, depths, heads)
    assert got == want and list(got) == list(want)


@pytest.mark.parametrize("name", list(NAMES))
def test_state_dict_keys_windows_and_buffers_equal_timm(name):
    """Keys (in order), shapes, every block's window and shift, and the coordinate tables equal timm's."""
    timm = _timm()
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = create_model(name)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    got = [(b.window_size, b.shift_size) for s in ours.layers for b in s.blocks]
    want = [(b.window_size, b.shift_size) for s in ref.layers for b in s.blocks]
    assert [((m, m), (s, s)) for m, s in got] == want
    assert got[-1] == (8, 0)  # the 8x8 last stage at 256 px: one window of the map, unshifted
    ours = create_model(name, depths=(1, 1, 1, 1))
    ref = timm.create_model(name, pretrained=False, depths=(1, 1, 1, 1), pretrained_window_sizes=(0, 6, 12, 0))
    ours_pw = create_model(name, depths=(1, 1, 1, 1), pretrained_window_sizes=(0, 6, 12, 0))
    for a, b, c in zip(
        [s.blocks[0].attn for s in ref.layers],
        [s.blocks[0].attn for s in ours.layers],
        [s.blocks[0].attn for s in ours_pw.layers],
    ):
        assert c.relative_coords_table.shape == a.relative_coords_table.shape
        torch.testing.assert_close(c.relative_coords_table, a.relative_coords_table, rtol=0, atol=0)
        assert b.relative_coords_table.shape == a.relative_coords_table.shape
    assert set(ours.no_weight_decay()) == set(ref.no_weight_decay())


def test_create_model_lists_swinv2():
    assert set(NAMES) <= set(vk.models.list_models())


def test_non_square_window_is_refused():
    """timm would clamp the last stage's window to its 8x6 map: (8, 6), which the op cannot take."""
    with pytest.raises(ValueError, match=r"window \(8, 6\) and shift \(0, 0\).*square window"):
        create_model(NAME, img_size=(256, 192))
    create_model(NAME, img_size=(256, 192), depths=(2, 2, 2), num_heads=(3, 6, 12))  # 16x12 > 8: fine


# ----------------------------------------------------------------------------- an independent eager forward


def eager_swinv2(sd, x, depths, heads, windows):
    """Swin V2 forward from a state_dict with plain tensor ops and the test oracle's window attention
    (literal roll / pad / partition / mask; timm's shift-first order; cosine attention). `windows` lists
    every block's (window, shift)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    b, c, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    k = 0
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        if i > 0:
            p = f"layers.{i}.downsample."
            g = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            h, w = g.shape[1], g.shape[2]
            x = F.linear(g.reshape(b, h * w, 4 * c), sd[p + "reduction.weight"])
            c *= 2
            x = F.layer_norm(x, (c,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            m, s = windows[k]
            k += 1
            d = torch.arange(-(m - 1), m, dtype=x.dtype)
            coords = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1) / max(m - 1, 1) * 8
            coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / 3
            hid = F.relu(F.linear(coords, sd[p + "attn.cpb_mlp.0.weight"], sd[p + "attn.cpb_mlp.0.bias"]))
            table = 16 * torch.sigmoid(F.linear(hid, sd[p + "attn.cpb_mlp.2.weight"])).reshape(-1, nh)
            qkv_bias = torch.cat(
                [sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.q_bias"]), sd[p + "attn.v_bias"]]
            )
            qkv = F.linear(x, sd[p + "attn.qkv.weight"], qkv_bias)
            a = oracles.window_attention(
                qkv, (h, w), nh, m, s, table, qkv_bias, logit_scale=sd[p + "attn.logit_scale"], shift_first=True
            )
            a = F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            x = x + F.layer_norm(a, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            y = F.linear(
                F.gelu(F.linear(x, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                sd[p + "mlp.fc2.weight"],
                sd[p + "mlp.fc2.bias"],
            )
            x = x + F.layer_norm(y, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"]).mean(1)
    return F.linear(x, sd["head.fc.weight"], sd["head.fc.bias"])


@pytest.mark.parametrize("case", ["padded", "w8_clamped"])
def test_matches_eager_forward_float64(case):
    kwargs, shape = SMALL[case]
    torch.manual_seed(0)
    model = _randomize(create_model(NAME, num_classes=7, **kwargs)).double().eval()
    windows = [(blk.window_size, blk.shift_size) for s in model.layers for blk in s.blocks]
    assert any(s for _, s in windows)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), eager_swinv2(model.state_dict(), x, kwargs["depths"], kwargs["num_heads"], windows)
        )


# ----------------------------------------------------------------------------- timm parity


@pytest.mark.parametrize("case", list(SMALL))
def test_matches_timm_outputs_and_grads(case):
    """Strict load; eval outputs; a seeded training step (drop path 0.3 in both: the same masks) with every
    parameter's gradient; forward_features (B, H, W, C) and forward_head as timm."""
    kwargs, shape = SMALL[case]
    kwargs = dict(kwargs, num_classes=5, drop_path_rate=0.3)
    ref, ours = _pair(kwargs)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.forward_head(feats, pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-5,
            rtol=1e-5,
        )
    y = _train_step(ours, x)
    torch.testing.assert_close(y, _train_step(ref, x), atol=1e-5, rtol=1e-5)
    _grads_close(ours, ref)
    with torch.no_grad():
        assert not torch.allclose(y, ours.eval()(x), atol=1e-4)  # the seeded drop-path masks dropped something


def test_real_swinv2_tiny_window8_256_equals_timm():
    timm = _timm()
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(NAME, pretrained=False), scale=0.02).eval()
    ours = create_model(NAME).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(76, 52), (36, 36), (24, 100)])
def test_other_input_sizes_equal_timm_dynamic(size):
    """strict_img_size=False (timm: dynamic_img_size=True): any multiple of the patch size, with the windows
    fixed at build time — padded maps, maps smaller than the window (36 px: 9x9 then a 5x5 map under a
    shifted window of 4 built for 8x8)."""
    kwargs, _ = SMALL["w4"]
    ref, ours = _pair(dict(kwargs, strict_img_size=False), dict(kwargs, dynamic_img_size=True))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    _train_step(ours, x), _train_step(ref, x)
    _grads_close(ours, ref)


def test_img_size_is_strict_by_default_and_other_sizes_pad():
    kwargs, _ = SMALL["w4"]
    ref, ours = _pair(dict(kwargs, strict_img_size=False), dict(kwargs, dynamic_img_size=True))
    strict = create_model(NAME, **kwargs)
    with pytest.raises(ValueError, match=r"input \(60, 64\) does not match img_size \(64, 64\).*strict_img_size"):
        strict(torch.randn(1, 3, 60, 64))
    # not a multiple of the patch size: timm refuses; ours zero-pads the image (timm on the padded image)
    x = torch.randn(1, 3, 62, 51)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(F.pad(x, (0, 1, 0, 2))), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)


def test_triton_path_matches_reference():
    """Every window_attention call on the Triton kernels (forced; float32 through the interpreter on CPU):
    12x10 and 6x5 maps under windows of 4 — padded, shifted first — outputs and every gradient."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = _randomize(
        create_model(
            NAME,
            img_size=(48, 40),
            embed_dim=16,
            depths=(2, 2),
            num_heads=(1, 2),
            window_size=4,
            num_classes=5,
            drop_path_rate=0.0,
        )
    )
    x = torch.randn(1, 3, 48, 40)
    outs, grads = [], []
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with vk.use_backend(backend):
            y = model(x)
            y.square().sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    for name, g in grads[0].items():
        err = (grads[1][name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-6, f"{name}: {err:.3g}"


# ----------------------------------------------------------------------------- autocast


def test_autocast_bf16_within_twice_timms_error():
    """tests/models/test_models_autocast.py's rule: relative error of the output and of all gradients against the
    float32 model at most 2x timm's own under autocast(cpu, bfloat16) + 1e-2; float32 grads."""
    kwargs, shape = SMALL["padded"]
    ref, ours = _pair(dict(kwargs, num_classes=5))
    x = torch.randn(shape)

    def run(model, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().square().mean().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        return out.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    out32, g32 = run(ref, False)
    out_timm, g_timm = run(ref, True)
    out_vk, g_vk = run(ours, True)
    assert rel(out_vk, out32) <= 2 * rel(out_timm, out32) + 1e-2
    assert rel(g_vk, g32) <= 2 * rel(g_timm, g32) + 1e-2


# ----------------------------------------------------------------------------- training features


def test_drop_path_schedule():
    default = create_model(NAME, depths=(2, 2, 6, 2))  # timm's SwinTransformerV2 default: 0.1
    rates = [m.drop_prob for m in default.modules() if isinstance(m, DropPath)]
    assert rates[::2] == rates[1::2] == drop_path_rates(0.1, 12)  # drop_path1, drop_path2 per block
    kwargs, _ = SMALL["w8_clamped"]
    ours = create_model(NAME, drop_path_rate=0.5, **kwargs)
    got = [b.drop_path1.drop_prob for s in ours.layers for b in s.blocks]
    assert got == drop_path_rates(0.5, 6) and got == [b.drop_path2.drop_prob for s in ours.layers for b in s.blocks]
    timm = pytest.importorskip("timm")
    for rate in (None, 0.5):
        kw = {} if rate is None else {"drop_path_rate": rate}
        ref = timm.create_model(NAME, pretrained=False, **kwargs, **kw)
        mine = create_model(NAME, **kwargs, **kw)
        for attr in ("drop_path1", "drop_path2"):
            want = [float(getattr(getattr(b, attr), "drop_prob", 0.0)) for s in ref.layers for b in s.blocks]
            assert [getattr(b, attr).drop_prob for s in mine.layers for b in s.blocks] == want


def test_drop_path_only_acts_in_training():
    kwargs, shape = SMALL["w4"]
    torch.manual_seed(0)
    model = _randomize(create_model(NAME, drop_path_rate=0.5, **kwargs))
    plain = create_model(NAME, drop_path_rate=0.0, **kwargs)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)
        torch.manual_seed(0)
        a = model.train()(x)
        torch.manual_seed(0)
        b = plain.train()(x)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)


def test_grad_checkpointing_same_loss_and_grads(monkeypatch):
    kwargs, shape = SMALL["padded"]
    torch.manual_seed(0)
    model = _randomize(create_model(NAME, drop_path_rate=0.4, **kwargs))
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing and all(s.grad_checkpointing for s in ckpt.layers)
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *a, **k: calls.append(k) or real(fn, *a, **k))
    x = torch.randn(shape)
    results = []
    for m in (model, ckpt):
        loss = _train_step(m, x, seed=7).square().mean()
        results.append((loss, {n: p.grad for n, p in m.named_parameters()}))
    assert len(calls) == 4 and all(k == {"use_reentrant": False} for k in calls)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(
            results[1][1][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x)
    assert calls == []


def test_forward_is_head_of_features_and_state_dict_round_trip():
    kwargs, shape = SMALL["w8_clamped"]
    torch.manual_seed(0)
    model = _randomize(create_model(NAME, num_classes=5, drop_path_rate=0.2, **kwargs)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 4, 4, 64)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        clone = create_model(NAME, num_classes=5, drop_path_rate=0.0, **kwargs).eval()
        clone.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model)(x), model(x), rtol=0, atol=0)


def test_init_as_timm():
    """timm's init: zero res-post norms (every block starts as the identity), logit scale ln 10, zero q/v
    biases, trunc-normal(0.02) linears with zero biases (the cpb MLPs included)."""
    model = create_model(NAME, **SMALL["w4"][0])
    for s in model.layers:
        for b in s.blocks:
            for norm in (b.norm1, b.norm2):
                assert not norm.weight.any() and not norm.bias.any()
            torch.testing.assert_close(b.attn.logit_scale, torch.full_like(b.attn.logit_scale, math.log(10)))
            assert not b.attn.q_bias.any() and not b.attn.v_bias.any() and not b.attn.cpb_mlp[0].bias.any()
            assert b.attn.cpb_mlp[0].weight.std() < 0.03
