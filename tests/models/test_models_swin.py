"""Swin models: timm parameter names, outputs vs an independent eager forward, any input size."""

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import create_model

import oracles

CONFIGS = {  # name: (embed_dim, depths, heads, window, img)
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
}


def timm_swin_keys(dim, depths, heads, window, num_classes=1000, img_size=None):
    """timm (>= 0.9) SwinTransformer state_dict keys and shapes; a stage whose map at img_size is no
    larger than the window has a window, and a bias table, of that map's size."""
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
                    f"layers.{i}.downsample.norm.weight": (2 * c,),
                    f"layers.{i}.downsample.norm.bias": (2 * c,),
                    f"layers.{i}.downsample.reduction.weight": (c, 2 * c),
                }
            )
        w = window if img_size is None else min(window, -(-img_size // 4 // 2**i))  # ceil: padded merges
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, h),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c),
                    p + "mlp.fc2.bias": (c,),
                }
            )
    c = dim * 2 ** (len(depths) - 1)
    keys.update(
        {"norm.weight": (c,), "norm.bias": (c,), "head.fc.weight": (num_classes, c), "head.fc.bias": (num_classes,)}
    )
    return keys


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_timm_names(name):
    dim, depths, heads, window, _ = CONFIGS[name]
    got = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    assert got == timm_swin_keys(dim, depths, heads, window)


def eager_swin(sd, x, depths, heads, window):
    """Swin forward from a state_dict, block by block as in the paper / timm, with the independent
    test oracle (literal pad / roll / partition / mask) for the window attention."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    b, c, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        if i > 0:
            p = f"layers.{i}.downsample."
            g = x.reshape(b, h, w, c)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            h, w = h // 2, w // 2
            x = F.linear(
                F.layer_norm(g.reshape(b, h * w, 4 * c), (4 * c,), sd[p + "norm.weight"], sd[p + "norm.bias"]),
                sd[p + "reduction.weight"],
            )
            c *= 2
        m = min(window, h, w)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s = 0 if (j % 2 == 0 or min(h, w) <= window) else window // 2
            y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
            qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            a = oracles.window_attention(
                qkv, (h, w), nh, m, s, sd[p + "attn.relative_position_bias_table"], sd[p + "attn.qkv.bias"]
            )
            x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
            x = x + F.linear(
                F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                sd[p + "mlp.fc2.weight"],
                sd[p + "mlp.fc2.bias"],
            )
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], 1e-5).mean(1)
    return F.linear(x, sd["head.fc.weight"], sd["head.fc.bias"])


def test_swin_tiny_matches_eager_forward():
    model = create_model("swin_tiny_patch4_window7_224").double().eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_swin(model.state_dict(), x, (2, 2, 6, 2), (3, 6, 12, 24), 7))


def test_small_swin_window12_matches_eager_forward():
    model = (
        create_model("swin_base_patch4_window12_384", embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=5)
        .double()
        .eval()
    )
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)  # 24x24 then 12x12 (= window: no shift)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_swin(model.state_dict(), x, (2, 2), (2, 2), 12))


@pytest.mark.parametrize("size", [(100, 130), (64, 64), (20, 36)])
def test_any_input_size(size):
    model = create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_training_step_gradients_reach_every_parameter():
    model = create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=4)
    model(torch.randn(2, 3, 64, 72)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    table = model.layers[0].blocks[1].attn.relative_position_bias_table
    assert table.grad.abs().sum() > 0


@pytest.mark.parametrize("img_size", [32, 64, 96, 160])
def test_state_dict_matches_timm_at_other_img_sizes(img_size):
    dim, depths, heads, window, _ = CONFIGS["swin_tiny_patch4_window7_224"]
    got = {
        k: tuple(v.shape)
        for k, v in create_model("swin_tiny_patch4_window7_224", img_size=img_size).state_dict().items()
    }
    assert got == timm_swin_keys(dim, depths, heads, window, img_size=img_size)


# Every stage map a multiple of the window or no larger than it: where a map needs padding, timm
# shifts before padding and SPEC.md (like the original Swin) pads first, so outputs differ there.
@pytest.mark.parametrize("img_size", [56, 112])
def test_timm_swin_at_other_img_sizes_loads_and_matches(img_size):
    timm = pytest.importorskip("timm")
    name = "swin_tiny_patch4_window7_224"
    ref = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    ours = create_model(name, img_size=img_size).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)


def test_timm_swin_state_dict_loads_and_matches():
    timm = pytest.importorskip("timm")
    for name, (*_, img) in CONFIGS.items():
        ref = timm.create_model(name, pretrained=False).eval()
        ours = create_model(name).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(1, 3, img, img)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)


def test_create_model_lists_swin():
    assert {"swin_tiny_patch4_window7_224", "swin_base_patch4_window12_384"} <= set(vk.models.list_models())


def test_patch_timm_swin_matches_timm():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    patched = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    patched.load_state_dict(ref.state_dict())
    keys = list(patched.state_dict())
    vk.patch_timm(patched)
    assert list(patched.state_dict()) == keys
    assert type(patched.layers[0].blocks[0]).__name__ == "FusedSwinTransformerBlock"
    x = torch.randn(2, 3, 224, 224)
    import vitkernels.integrations.timm as integration

    calls = []
    real = integration.window_attention
    integration.window_attention = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            torch.testing.assert_close(patched(x), ref(x), atol=2e-4, rtol=2e-4)
    finally:
        integration.window_attention = real
    assert len(calls) == 12, "every Swin-T block must run the fused op"


def _fake_timm_swin_block_class():
    """A stand-in with the structure of timm's SwinTransformerBlock (its `_attn` on (B, H, W, C) and the
    `attn` submodule's names), under timm's module name: patch_timm's glue runs where timm is absent."""

    class WindowAttention(torch.nn.Module):
        def __init__(self, dim, num_heads, m):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.relative_position_bias_table = torch.nn.Parameter(torch.randn((2 * m - 1) ** 2, num_heads))
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.attn_drop = torch.nn.Dropout(0.0)
            self.proj = torch.nn.Linear(dim, dim)
            self.proj_drop = torch.nn.Dropout(0.0)

    class SwinTransformerBlock(torch.nn.Module):
        def __init__(self, dim, num_heads, window_size, shift_size):
            super().__init__()
            self.window_size, self.shift_size = (window_size, window_size), (shift_size, shift_size)
            self.attn = WindowAttention(dim, num_heads, window_size)

        def _attn(self, x):  # timm's eager order: roll the unpadded map, pad, partition, mask, bias, reverse
            b, h, w, c = x.shape
            a, m, s = self.attn, self.window_size[0], self.shift_size[0]
            hp, wp, n = -(-h // m) * m, -(-w // m) * m, m * m
            y = F.pad(torch.roll(x, (-s, -s), (1, 2)), (0, 0, 0, wp - w, 0, hp - h))
            win = y.reshape(b, hp // m, m, wp // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
            q, k, v = a.qkv(win).reshape(win.shape[0], n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            pos = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)
            rel = pos[:, :, None] - pos[:, None, :] + m - 1
            scores = q * a.scale @ k.transpose(-1, -2) + a.relative_position_bias_table[
                rel[0] * (2 * m - 1) + rel[1]
            ].permute(2, 0, 1)
            if s:  # region labels over the padded grid, -100 between different regions of a window
                label = torch.zeros(hp, wp)
                for i, (hs, ws) in enumerate(
                    (hs, ws)
                    for hs in (slice(0, -m), slice(-m, -s), slice(-s, None))
                    for ws in (slice(0, -m), slice(-m, -s), slice(-s, None))
                ):
                    label[hs, ws] = i
                label = label.reshape(hp // m, m, wp // m, m).permute(0, 2, 1, 3).reshape(-1, n)
                mask = (label[:, None, :] != label[:, :, None]).float() * -100.0
                scores = (scores.view(b, -1, a.num_heads, n, n) + mask[None, :, None]).view(-1, a.num_heads, n, n)
            out = a.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, q.shape[1] * q.shape[-1]))
            out = out.reshape(b, hp // m, wp // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
            return torch.roll(out[:, :h, :w], (s, s), (1, 2))

        def forward(self, x):
            return x + self._attn(x)

    SwinTransformerBlock.__module__ = "timm.models.swin_transformer"
    return SwinTransformerBlock


def test_patch_timm_swaps_swin_blocks_without_timm(monkeypatch):
    import vitkernels.integrations.timm as integration

    calls = []
    real = integration.window_attention
    monkeypatch.setattr(integration, "window_attention", lambda *a: calls.append(a[1:5] + a[9:]) or real(*a))
    block_cls = _fake_timm_swin_block_class()
    model = torch.nn.Sequential(block_cls(32, 2, 7, 0), block_cls(32, 2, 7, 3)).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 14, 21, 32)
    with torch.no_grad():
        before = model(x)
        assert vk.patch_timm(model) is model
        after = model(x)
    assert [type(b).__name__ for b in model] == ["FusedSwinTransformerBlock"] * 2
    assert list(model.state_dict()) == keys
    assert calls == [((14, 21), 2, 7, 0, True), ((14, 21), 2, 7, 3, True)]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # timm shifts before padding: a shifted map that needs padding reaches the op unpadded, in timm's
    # order (shift_first=True), with timm's result.
    calls.clear()
    x = torch.randn(1, 9, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(model[1](x), x + model[1]._timm_attn(x), atol=1e-5, rtol=1e-5)
    assert calls == [((9, 9), 2, 7, 3, True)]
