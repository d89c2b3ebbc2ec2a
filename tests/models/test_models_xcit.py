"""XCiT models: timm parameter names, outputs vs an independent eager forward, gradients, timm parity."""

import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import create_model

import oracles

CONFIGS = {  # name: (embed_dim, depth, heads)
    "xcit_tiny_12_p16_224": (192, 12, 4),
    "xcit_small_12_p16_224": (384, 12, 8),
}


def timm_xcit_keys(dim, depth, heads, num_classes=1000):
    """timm (1.0) Xcit state_dict keys and shapes (patch 16, two class-attention blocks)."""
    keys = {}
    dims = [3, dim // 8, dim // 4, dim // 2, dim]
    for i in range(4):
        p = f"patch_embed.proj.{2 * i}."
        c = dims[i + 1]
        keys.update(
            {
                p + "0.weight": (c, dims[i], 3, 3),
                p + "1.weight": (c,),
                p + "1.bias": (c,),
                p + "1.running_mean": (c,),
                p + "1.running_var": (c,),
                p + "1.num_batches_tracked": (),
            }
        )
    keys.update(
        {
            "cls_token": (1, 1, dim),
            "pos_embed.token_projection.weight": (dim, 64, 1, 1),
            "pos_embed.token_projection.bias": (dim,),
        }
    )
    mlp = lambda p: {
        p + "mlp.fc1.weight": (4 * dim, dim),
        p + "mlp.fc1.bias": (4 * dim,),
        p + "mlp.fc2.weight": (dim, 4 * dim),
        p + "mlp.fc2.bias": (dim,),
    }
    for j in range(depth):
        p = f"blocks.{j}."
        keys.update(
            {
                p + "gamma1": (dim,),
                p + "gamma3": (dim,),
                p + "gamma2": (dim,),
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.temperature": (heads, 1, 1),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm3.weight": (dim,),
                p + "norm3.bias": (dim,),
                p + "local_mp.conv1.weight": (dim, 1, 3, 3),
                p + "local_mp.conv1.bias": (dim,),
                p + "local_mp.bn.weight": (dim,),
                p + "local_mp.bn.bias": (dim,),
                p + "local_mp.bn.running_mean": (dim,),
                p + "local_mp.bn.running_var": (dim,),
                p + "local_mp.bn.num_batches_tracked": (),
                p + "local_mp.conv2.weight": (dim, 1, 3, 3),
                p + "local_mp.conv2.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                **mlp(p),
            }
        )
    for j in range(2):
        p = f"cls_attn_blocks.{j}."
        keys.update(
            {
                p + "gamma1": (dim,),
                p + "gamma2": (dim,),
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                **mlp(p),
            }
        )
        for n in "qkv":
            keys.update({p + f"attn.{n}.weight": (dim, dim), p + f"attn.{n}.bias": (dim,)})
        keys.update({p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,)})
    keys.update(
        {"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    )
    return keys


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_timm_names(name):
    dim, depth, heads = CONFIGS[name]
    with torch.device("meta"):
        model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == timm_xcit_keys(dim, depth, heads)


def randomize_buffers_and_scales(model, seed=0):
    """Non-trivial BatchNorm statistics/affines, layer-scale gammas and temperatures (init makes them 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith(("running_var", "gamma1", "gamma2", "gamma3", "temperature")):
                v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
            elif (
                k.endswith(("running_mean", ".1.weight", ".1.bias", "bn.weight", "bn.bias")) or "token_projection" in k
            ):
                v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.2)
    return model


def fourier_positions(h, w, hidden=32, temperature=10000.0):
    """(H·W, 2·hidden) XCiT Fourier features (as in the official XCiT code), float64."""
    y, x = torch.meshgrid(
        torch.arange(1, h + 1, dtype=torch.float64), torch.arange(1, w + 1, dtype=torch.float64), indexing="ij"
    )
    y = y / (h + 1e-6) * 2 * math.pi
    x = x / (w + 1e-6) * 2 * math.pi
    feats = []
    for coord in (y, x):
        for i in range(hidden):
            a = coord / temperature ** (2 * (i // 2) / hidden)
            feats.append(a.sin() if i % 2 == 0 else a.cos())
    return torch.stack(feats, dim=-1).reshape(h * w, 2 * hidden)


def eager_xcit(sd, x, depth, heads):
    """XCiT forward (eval mode) from a state_dict: conv stem, Fourier positions, XCA -> LPI -> MLP blocks
    (XCA on the independent test oracle, LPI with F.conv2d on the (B, C, H, W) map), class attention.
    Returns (normalised tokens, logits): the patch tokens after the class-attention blocks do not reach
    the logits (LayerNorm is scale invariant), so they are compared separately."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)
    bn = lambda t, p: F.batch_norm(
        t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5
    )
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd[p + ".bias"])
    mlp = lambda t, p: lin(F.gelu(lin(t, p + ".fc1")), p + ".fc2")
    for i in range(4):
        if i:
            x = F.gelu(x)
        x = bn(
            F.conv2d(x, sd[f"patch_embed.proj.{2 * i}.0.weight"], stride=2, padding=1), f"patch_embed.proj.{2 * i}.1"
        )
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = fourier_positions(h, w).T.reshape(1, -1, h, w)  # (1, 64, H, W) -> 1×1 conv
    pos = F.conv2d(pos, sd["pos_embed.token_projection.weight"], sd["pos_embed.token_projection.bias"])
    x = x + pos.flatten(2).transpose(1, 2)
    for j in range(depth):
        p = f"blocks.{j}."
        a = oracles.xca(lin(ln(x, p + "norm1"), p + "attn.qkv"), heads, sd[p + "attn.temperature"])
        x = x + sd[p + "gamma1"] * lin(a, p + "attn.proj")
        m = ln(x, p + "norm3").transpose(1, 2).reshape(b, c, h, w)
        m = F.conv2d(m, sd[p + "local_mp.conv1.weight"], sd[p + "local_mp.conv1.bias"], padding=1, groups=c)
        m = bn(F.gelu(m), p + "local_mp.bn")
        m = F.conv2d(m, sd[p + "local_mp.conv2.weight"], sd[p + "local_mp.conv2.bias"], padding=1, groups=c)
        x = x + sd[p + "gamma3"] * m.flatten(2).transpose(1, 2)
        x = x + sd[p + "gamma2"] * mlp(ln(x, p + "norm2"), p + "mlp")
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    d = c // heads
    for j in range(2):
        p = f"cls_attn_blocks.{j}."
        y = ln(x, p + "norm1")
        q = lin(y[:, :1], p + "attn.q").reshape(b, 1, heads, d).transpose(1, 2)
        k = lin(y, p + "attn.k").reshape(b, -1, heads, d).transpose(1, 2)
        v = lin(y, p + "attn.v").reshape(b, -1, heads, d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        cls = lin((att @ v).transpose(1, 2).reshape(b, 1, c), p + "attn.proj")
        x = x + sd[p + "gamma1"] * torch.cat([cls, y[:, 1:]], dim=1)
        x = ln(x, p + "norm2")  # tokens_norm=True
        x = x + torch.cat([sd[p + "gamma2"] * mlp(x[:, :1], p + "mlp"), x[:, 1:]], dim=1)
    x = ln(x, "norm")
    return x, lin(x[:, 0], "head")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_eager_forward_float64(name):
    _, _, heads = CONFIGS[name]
    model = randomize_buffers_and_scales(create_model(name, depth=2, num_classes=7)).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        feats, logits = eager_xcit(model.state_dict(), x, 2, heads)
        torch.testing.assert_close(model.forward_features(x), feats)
        torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("size", [(64, 96), (32, 32), (16, 48)])
def test_any_input_size(size):
    model = create_model("xcit_tiny_12_p16_224", depth=1, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_training_step_gradients_reach_every_parameter():
    model = create_model("xcit_tiny_12_p16_224", embed_dim=32, depth=2, num_heads=4, num_classes=4).train()
    model(torch.randn(2, 3, 64, 48)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    bn = model.blocks[0].local_mp.bn
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_create_model_lists_xcit():
    assert set(CONFIGS) <= set(vk.models.list_models())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_timm_xcit_state_dict_loads_and_matches(name):
    timm = pytest.importorskip("timm")
    ref = randomize_buffers_and_scales(timm.create_model(name, pretrained=False)).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        for size in [(224, 224), (64, 96)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=2e-4, rtol=2e-4)
    # training mode (BatchNorm on batch statistics): same outputs and same running-stat updates
    ours.train(), ref.train()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=1e-5, rtol=1e-5)


def test_patch_timm_xcit_fuses_and_matches(monkeypatch):
    timm = pytest.importorskip("timm")
    import vitkernels.integrations.timm as integration

    calls = []
    real = integration.xca
    monkeypatch.setattr(integration, "xca", lambda *a: calls.append(1) or real(*a))
    ref = timm.create_model("xcit_tiny_12_p16_224", pretrained=False).eval()
    patched = timm.create_model("xcit_tiny_12_p16_224", pretrained=False).eval()
    patched.load_state_dict(ref.state_dict())
    vk.patch_timm(patched)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), atol=2e-4, rtol=2e-4)
        assert len(calls) == 12, "every XCA block must run the fused op"
        for block in patched.blocks:  # the fused op really carries the computation
            block.attn.temperature.mul_(2)
        assert not torch.allclose(patched(x), ref(x), atol=1e-4)
