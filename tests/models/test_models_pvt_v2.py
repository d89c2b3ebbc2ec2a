"""PVTv2 models: timm parameter names, outputs vs an independent eager forward, any input size."""

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import create_model

from helpers import layer_norm as _ln
from helpers import linear as _lin

W = (64, 128, 320, 512)
CONFIGS = {  # name: (embed_dims, depths, mlp_ratios, linear)
    "pvt_v2_b0": ((32, 64, 160, 256), (2, 2, 2, 2), (8, 8, 4, 4), False),
    "pvt_v2_b1": (W, (2, 2, 2, 2), (8, 8, 4, 4), False),
    "pvt_v2_b2": (W, (3, 4, 6, 3), (8, 8, 4, 4), False),
    "pvt_v2_b3": (W, (3, 4, 18, 3), (8, 8, 4, 4), False),
    "pvt_v2_b4": (W, (3, 8, 27, 3), (8, 8, 4, 4), False),
    "pvt_v2_b5": (W, (3, 6, 40, 3), (4, 4, 4, 4), False),
    "pvt_v2_b2_li": (W, (3, 4, 6, 3), (8, 8, 4, 4), True),
}
HEADS, SR = (1, 2, 5, 8), (8, 4, 2, 1)


def timm_pvt_keys(dims, depths, mlp_ratios, linear, num_classes=1000):
    """timm PyramidVisionTransformerV2 state_dict keys and shapes."""
    keys = {
        "patch_embed.proj.weight": (dims[0], 3, 7, 7),
        "patch_embed.proj.bias": (dims[0],),
        "patch_embed.norm.weight": (dims[0],),
        "patch_embed.norm.bias": (dims[0],),
    }
    for i, (c, depth) in enumerate(zip(dims, depths)):
        s = f"stages.{i}."
        if i > 0:
            keys.update(
                {
                    s + "downsample.proj.weight": (c, dims[i - 1], 3, 3),
                    s + "downsample.proj.bias": (c,),
                    s + "downsample.norm.weight": (c,),
                    s + "downsample.norm.bias": (c,),
                }
            )
        hid = int(c * mlp_ratios[i])
        for j in range(depth):
            p = s + f"blocks.{j}."
            keys.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.q.weight": (c, c),
                    p + "attn.q.bias": (c,),
                    p + "attn.kv.weight": (2 * c, c),
                    p + "attn.kv.bias": (2 * c,),
                }
            )
            if linear or SR[i] > 1:
                k = 1 if linear else SR[i]
                keys.update(
                    {
                        p + "attn.sr.weight": (c, c, k, k),
                        p + "attn.sr.bias": (c,),
                        p + "attn.norm.weight": (c,),
                        p + "attn.norm.bias": (c,),
                    }
                )
            keys.update(
                {
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (hid, c),
                    p + "mlp.fc1.bias": (hid,),
                    p + "mlp.dwconv.weight": (hid, 1, 3, 3),
                    p + "mlp.dwconv.bias": (hid,),
                    p + "mlp.fc2.weight": (c, hid),
                    p + "mlp.fc2.bias": (c,),
                }
            )
        keys.update({s + "norm.weight": (c,), s + "norm.bias": (c,)})
    keys.update({"head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return keys


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_timm_names(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost for the large sizes
        got = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    assert got == timm_pvt_keys(*CONFIGS[name])


def eager_pvt_v2(sd, x, depths, heads, sr_ratios, linear):
    """PVTv2 forward from a timm state_dict: NCHW convs, explicit softmax attention with k and v
    split out of the kv linear as [k | v] head-major, Mix-FFN as conv2d(groups=C)."""
    for i, depth in enumerate(depths):
        p = "patch_embed" if i == 0 else f"stages.{i}.downsample"
        x = F.conv2d(
            x, sd[p + ".proj.weight"], sd[p + ".proj.bias"], stride=4 if i == 0 else 2, padding=3 if i == 0 else 1
        )
        b, c, h, w = x.shape
        x = _ln(x.flatten(2).transpose(1, 2), sd, p + ".norm", 1e-5)
        nh, d = heads[i], c // heads[i]
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            y = _ln(x, sd, p + "norm1", 1e-6)
            q = _lin(y, sd, p + "attn.q").reshape(b, -1, nh, d).transpose(1, 2)
            r = y.transpose(1, 2).reshape(b, c, h, w)
            if linear:
                r = F.adaptive_avg_pool2d(r, 7)
                r = F.gelu(
                    _ln(
                        F.conv2d(r, sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"]).flatten(2).transpose(1, 2),
                        sd,
                        p + "attn.norm",
                        1e-5,
                    )
                )
            elif sr_ratios[i] > 1:
                r = F.conv2d(r, sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"], stride=sr_ratios[i])
                r = _ln(r.flatten(2).transpose(1, 2), sd, p + "attn.norm", 1e-5)
            else:
                r = y
            kv = _lin(r, sd, p + "attn.kv").reshape(b, -1, 2, nh, d)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, -1) @ v
            x = x + _lin(a.transpose(1, 2).reshape(b, h * w, c), sd, p + "attn.proj")
            y = _lin(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")
            if linear:
                y = F.relu(y)
            y = y.transpose(1, 2).reshape(b, -1, h, w)
            y = F.conv2d(y, sd[p + "mlp.dwconv.weight"], sd[p + "mlp.dwconv.bias"], padding=1, groups=y.shape[1])
            x = x + _lin(F.gelu(y.flatten(2).transpose(1, 2)), sd, p + "mlp.fc2")
        x = _ln(x, sd, f"stages.{i}.norm", 1e-6).transpose(1, 2).reshape(b, c, h, w)
    return _lin(x.mean((-1, -2)), sd, "head")


@pytest.mark.parametrize("name,size", [("pvt_v2_b0", (64, 64)), ("pvt_v2_b2_li", (70, 45))])
def test_small_pvt_matches_eager_forward(name, size):
    depths = (1, 2, 1, 1)
    model = create_model(name, embed_dims=(16, 32, 40, 64), depths=depths, num_classes=7).double().eval()
    with torch.no_grad():  # non-zero biases and norm affines so every term is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_pvt_v2(model.state_dict(), x, depths, HEADS, SR, CONFIGS[name][3]))


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 40)])
@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_any_input_size(name, size):
    model = create_model(name, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        feats = model.forward_features(torch.randn(1, 3, *size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert feats.shape[:2] == (1, 64)


def test_too_small_map_for_sr_conv_raises():
    model = create_model("pvt_v2_b0", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="sr_ratio"):
        model(torch.randn(1, 3, 16, 16))  # stage 1 is 4x4 < sr_ratio 8


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_training_step_gradients_reach_every_parameter(name):
    model = create_model(name, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_classes=4)
    model(torch.randn(2, 3, 64, 72)).logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_create_model_lists_pvt_v2():
    assert set(CONFIGS) <= set(vk.models.list_models())


def test_timm_pvt_v2_state_dict_loads_and_matches():
    timm = pytest.importorskip("timm")
    for name in CONFIGS:
        ref = timm.create_model(name, pretrained=False).eval()
        ours = create_model(name).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_patch_timm_pvt_v2_fuses_and_matches(name, monkeypatch):
    timm = pytest.importorskip("timm")
    import vitkernels.integrations.timm as integration

    calls = {"sr_attention": 0, "mix_ffn": 0}
    for op in calls:
        real = getattr(integration, op)
        monkeypatch.setattr(
            integration, op, lambda *a, _op=op, _real=real: calls.__setitem__(_op, calls[_op] + 1) or _real(*a)
        )
    ref = timm.create_model(name, pretrained=False).eval()
    patched = timm.create_model(name, pretrained=False).eval()
    patched.load_state_dict(ref.state_dict())
    keys = list(patched.state_dict())
    vk.patch_timm(patched)
    assert list(patched.state_dict()) == keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), atol=2e-4, rtol=2e-4)
    blocks = sum(len(stage.blocks) for stage in ref.stages)
    assert calls == {"sr_attention": blocks, "mix_ffn": blocks}


def _fake_timm_pvt_classes():
    """Stand-ins with the structure of timm's pvt_v2 `Attention` and `MlpWithDepthwiseConv` (eager code,
    timm's attribute names), under timm's module name: patch_timm's glue runs where timm is absent."""
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self, dim, num_heads, sr_ratio, linear):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
            self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)
            self.pool = nn.AdaptiveAvgPool2d(7) if linear else None
            self.sr = nn.Conv2d(dim, dim, 1 if linear else sr_ratio, 1 if linear else sr_ratio)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU() if linear else None

        def forward(self, x, feat_size):
            b, n, c = x.shape
            hd = c // self.num_heads
            q = self.q(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
            y = x.transpose(1, 2).reshape(b, c, *feat_size)
            y = self.sr(self.pool(y) if self.pool is not None else y).flatten(2).transpose(1, 2)
            y = self.norm(y)
            y = self.act(y) if self.act is not None else y
            k, v = self.kv(y).reshape(b, -1, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1)
            return self.proj_drop(self.proj((a @ v).transpose(1, 2).reshape(b, n, c)))

    class MlpWithDepthwiseConv(nn.Module):
        def __init__(self, dim, hidden, extra_relu):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.relu = nn.ReLU() if extra_relu else nn.Identity()
            self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
            self.act, self.drop = nn.GELU(), nn.Dropout(0.0)

        def forward(self, x, feat_size):
            b, n, _ = x.shape
            x = self.relu(self.fc1(x))
            x = self.dwconv(x.transpose(1, 2).reshape(b, -1, *feat_size)).flatten(2).transpose(1, 2)
            return self.fc2(self.drop(self.act(x)))

    for cls in (Attention, MlpWithDepthwiseConv):
        cls.__module__ = "timm.models.pvt_v2"
    return Attention, MlpWithDepthwiseConv


@pytest.mark.parametrize("linear", [False, True], ids=["sr_conv", "li"])
def test_patch_timm_swaps_pvt_modules_without_timm(linear, monkeypatch):
    import vitkernels.integrations.timm as integration

    calls = {"sr_attention": 0, "mix_ffn": 0}
    for op in calls:
        real = getattr(integration, op)
        monkeypatch.setattr(
            integration, op, lambda *a, _op=op, _real=real: calls.__setitem__(_op, calls[_op] + 1) or _real(*a)
        )
    attn_cls, mlp_cls = _fake_timm_pvt_classes()
    attn, mlp = attn_cls(64, 2, 2, linear).eval(), mlp_cls(64, 96, linear).eval()
    for m in (attn, mlp):  # non-trivial norm affine parameters
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    holder = torch.nn.ModuleDict({"attn": attn, "mlp": mlp})
    keys = list(holder.state_dict())
    x, hw = torch.randn(2, 14 * 10, 64), (14, 10)
    with torch.no_grad():
        want = attn(x, hw), mlp(x, hw)
        assert vk.patch_timm(holder) is holder
        got = holder["attn"](x, hw), holder["mlp"](x, hw)
    assert type(holder["attn"]).__name__ == "FusedPvtV2Attention"  # unique names: importable, picklable
    assert type(holder["mlp"]).__name__ == "FusedMlpWithDepthwiseConv"
    assert list(holder.state_dict()) == keys
    assert calls == {"sr_attention": 1, "mix_ffn": 1}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
