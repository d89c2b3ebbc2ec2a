"""TimeSformer and ViViT (model 3): parameter names, outputs vs independent eager forwards written from
the papers' / official code's structure (plain reshapes and softmax attention, float64), any clip
size, gradients to every parameter, and the fused Triton path (interpreter on CPU)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import create_model

from helpers import layer_norm, mlp
from helpers import linear as _lin

SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 7, "img_size": 32}


_ln = partial(layer_norm, eps=1e-6)


def _mha(x, sd, p, heads):
    """timm / TimeSformer Attention on (B', L, C): qkv → softmax(q kᵀ / √d) v → proj."""
    b, n, c = x.shape
    q, k, v = _lin(x, sd, p + ".qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1)
    return _lin((a @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".proj")


# ----------------------------------------------------------------------------- TimeSformer


def timesformer_keys(dim, depth, grid, frames, classes, patch=16):
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "time_embed": (1, frames, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm1", "temporal_norm1", "norm2"):
            keys.update({p + n + ".weight": (dim,), p + n + ".bias": (dim,)})
        for a in ("attn", "temporal_attn"):
            keys.update(
                {
                    p + a + ".qkv.weight": (3 * dim, dim),
                    p + a + ".qkv.bias": (3 * dim,),
                    p + a + ".proj.weight": (dim, dim),
                    p + a + ".proj.bias": (dim,),
                }
            )
        keys.update(
            {
                p + "temporal_fc.weight": (dim, dim),
                p + "temporal_fc.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim),
                p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim),
                p + "mlp.fc2.bias": (dim,),
            }
        )
    return keys


def eager_timesformer(sd, x, depth, heads):
    """The official divided space-time forward (facebookresearch/TimeSformer), rearranges as reshapes."""
    B, C, T, H, W = x.shape
    f = F.conv2d(
        x.transpose(1, 2).reshape(B * T, C, H, W),
        sd["patch_embed.proj.weight"],
        sd["patch_embed.proj.bias"],
        stride=sd["patch_embed.proj.weight"].shape[-1],
    )
    h, w = f.shape[-2:]
    x = torch.cat((sd["cls_token"].expand(B * T, -1, -1), f.flatten(2).transpose(1, 2)), 1)
    pos = sd["pos_embed"]
    if x.shape[1] != pos.shape[1]:
        p = int((pos.shape[1] - 1) ** 0.5)
        other = F.interpolate(pos[:, 1:].transpose(1, 2).reshape(1, -1, p, p), size=(h, w), mode="nearest")
        pos = torch.cat((pos[:, :1], other.flatten(2).transpose(1, 2)), 1)
    x = x + pos
    cls = x[:B, 0].unsqueeze(1)
    x = x[:, 1:].reshape(B, T, h * w, -1).transpose(1, 2).reshape(B * h * w, T, -1)  # (b t) n m -> (b n) t m
    te = sd["time_embed"]
    if T != te.shape[1]:
        te = F.interpolate(te.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
    x = (x + te).reshape(B, h * w * T, -1)  # (b n) t m -> b (n t) m
    x = torch.cat((cls, x), 1)
    S, D = h * w, x.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        xt = x[:, 1:].reshape(B * S, T, D)  # b (h w t) m -> (b h w) t m
        rt = _mha(_ln(xt, sd, p + "temporal_norm1"), sd, p + "temporal_attn", heads).reshape(B, S * T, D)
        xt = x[:, 1:] + _lin(rt, sd, p + "temporal_fc")
        init_cls = x[:, :1]
        cls_t = init_cls.repeat(1, T, 1).reshape(B * T, 1, D)
        xs = xt.reshape(B, S, T, D).transpose(1, 2).reshape(B * T, S, D)  # b (h w t) m -> (b t) (h w) m
        rs = _mha(_ln(torch.cat((cls_t, xs), 1), sd, p + "norm1"), sd, p + "attn", heads)
        cls_r = rs[:, 0].reshape(B, T, D).mean(1, keepdim=True)
        rs = rs[:, 1:].reshape(B, T, S, D).transpose(1, 2).reshape(B, S * T, D)
        x = torch.cat((init_cls, xt), 1) + torch.cat((cls_r, rs), 1)
        x = x + mlp(_ln(x, sd, p + "norm2"), sd, p + "mlp")
    return _lin(_ln(x, sd, "norm")[:, 0], sd, "head")


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_timesformer_names_and_shapes():
    got = {k: tuple(v.shape) for k, v in create_model("timesformer_base_patch16_224").state_dict().items()}
    assert got == timesformer_keys(768, 12, 14, 8, 400)


@pytest.mark.parametrize("clip", [(2, 3, 4, 32, 32), (1, 3, 3, 48, 32)], ids=["native", "resized"])
def test_timesformer_matches_official_structure(clip):
    model = _randomise(create_model("timesformer_base_patch16_224", num_frames=4, **SMALL)).double().eval()
    x = torch.randn(clip, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_timesformer(model.state_dict(), x, 2, 2), atol=1e-10, rtol=1e-10)


def test_timesformer_strict_load_of_official_names():
    model = create_model("timesformer_base_patch16_224", num_frames=4, **SMALL)
    sd = {k: torch.randn(s) for k, s in timesformer_keys(64, 2, 2, 4, 7).items()}
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- ViViT


def eager_vivit(sd, x, depth, heads, grid0):
    """Factorised self-attention (ViViT model 3): spatial MHA per frame, temporal MHA per position, MLP."""
    w = sd["patch_embed.proj.weight"]
    f = F.conv3d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[2:])
    B, D, T, h, ww = f.shape
    S = h * ww
    pos = sd["pos_embed"]
    if (T, h, ww) != grid0:
        pos = (
            F.interpolate(
                pos.reshape(1, *grid0, D).permute(0, 4, 1, 2, 3), size=(T, h, ww), mode="trilinear", align_corners=False
            )
            .permute(0, 2, 3, 4, 1)
            .reshape(1, -1, D)
        )
    x = f.flatten(2).transpose(1, 2) + pos  # (B, T·S, D), frame-major
    for i in range(depth):
        p = f"blocks.{i}."
        xs = x.reshape(B * T, S, D)
        x = x + _mha(_ln(xs, sd, p + "norm1"), sd, p + "attn", heads).reshape(B, T * S, D)
        xt = x.reshape(B, T, S, D).transpose(1, 2).reshape(B * S, T, D)
        rt = _mha(_ln(xt, sd, p + "temporal_norm1"), sd, p + "temporal_attn", heads)
        x = x + rt.reshape(B, S, T, D).transpose(1, 2).reshape(B, T * S, D)
        x = x + mlp(_ln(x, sd, p + "norm2"), sd, p + "mlp")
    return _lin(_ln(x, sd, "norm").mean(1), sd, "head")


def test_vivit_shapes():
    sd = create_model("vivit_base_factorized").state_dict()
    assert tuple(sd["patch_embed.proj.weight"].shape) == (768, 3, 2, 16, 16)
    assert tuple(sd["pos_embed"].shape) == (1, 16 * 14 * 14, 768)
    assert len([k for k in sd if k.startswith("blocks.")]) == 12 * 18
    assert not any("cls_token" in k for k in sd)


@pytest.mark.parametrize("clip", [(2, 3, 8, 32, 32), (1, 3, 6, 48, 32)], ids=["native", "resized"])
def test_vivit_matches_factorised_attention(clip):
    model = _randomise(create_model("vivit_base_factorized", num_frames=8, **SMALL)).double().eval()
    x = torch.randn(clip, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), eager_vivit(model.state_dict(), x, 2, 2, (4, 2, 2)), atol=1e-10, rtol=1e-10
        )


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("name,frames", [("timesformer_base_patch16_224", 4), ("vivit_base_factorized", 8)])
def test_gradients_reach_every_parameter(name, frames):
    model = create_model(name, num_frames=frames, **SMALL)
    model(torch.randn(2, 3, frames, 32, 32)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name,frames", [("timesformer_base_patch16_224", 4), ("vivit_base_factorized", 8)])
def test_fused_space_time_attention_matches_reference(monkeypatch, name, frames):
    """Each space_time_attention call of the model runs the Triton kernel where it can (the interpreter on
    CPU), the reference elsewhere; the logits equal the all-reference run."""
    import os

    from vitkernels import backends

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(name, num_frames=frames, **SMALL).to(device).eval()
    x = torch.randn(2, 3, frames, 32, 32, device=device)
    with torch.no_grad(), vk.use_backend("reference"):
        want = model(x)

    kernels, select, used = backends._KERNELS["space_time_attention"], backends.select, []

    def prefer_triton(op, *args, backward=False, **kwargs):
        if op != "space_time_attention":
            return select(op, *args, backward=backward, **kwargs)
        name = "reference" if list(kernels["triton"].reasons(*args, **kwargs)) else "triton"
        used.append(name)
        return kernels[name]

    monkeypatch.setattr(backends, "select", prefer_triton)
    with torch.no_grad():
        got = model(x)
    assert "triton" in used
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
