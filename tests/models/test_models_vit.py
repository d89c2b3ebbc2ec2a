"""ViT/DeiT models: timm parameter names, outputs vs an independent eager forward, backends, patch_timm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkernels as vk
from vitkernels.models import create_model, list_models

SIZES = {"vit_tiny_patch16_224": (192, 3), "vit_small_patch16_224": (384, 6), "vit_base_patch16_224": (768, 12)}


def timm_vit_keys(dim, depth=12, num_classes=1000, grid=14):
    """timm VisionTransformer state_dict keys and shapes (class token, global_pool='token')."""
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim),
                p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim),
                p + "mlp.fc2.bias": (dim,),
            }
        )
    keys.update(
        {"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    )
    return keys


@pytest.mark.parametrize("name", list(SIZES))
def test_state_dict_matches_timm_names(name):
    assert name in list_models()
    model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == timm_vit_keys(SIZES[name][0])


def eager_vit(sd, x, heads, depth, eps=1e-6):
    """ViT forward written from the paper / timm's code path, straight from a state_dict."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    b, n, c = x.shape
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q, k, v = (
            F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            .reshape(b, n, 3, heads, c // heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        x = x + h
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], eps)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def test_vit_tiny_matches_eager_forward():
    model = create_model("vit_tiny_patch16_224").double().eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_vit(model.state_dict(), x, heads=3, depth=12))


def test_small_vit_triton_backend_matches_reference_with_grads():
    model = create_model("vit_tiny_patch16_224", img_size=48, depth=2, num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    outs, grads = [], []
    for backend in ("reference", "triton"):
        model.zero_grad()
        with vk.use_backend(backend):
            y = model(x)
            y.square().sum().backward()
        outs.append(y.detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_other_input_size_resamples_pos_embed():
    model = create_model("vit_tiny_patch16_224", depth=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 192)).shape == (1, 1000)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match="needs checkpoint_path"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_checkpoint_path_loads_strict(tmp_path):
    src = create_model("vit_tiny_patch16_224", depth=1)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = create_model("vit_tiny_patch16_224", depth=1, checkpoint_path=str(tmp_path / "w.pth"))
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)


# ----------------------------------------------------------------------------- patch_timm


def _fake_timm_attention_class():
    """A stand-in with timm's ViT Attention structure, registered under timm's module name."""

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.scale = self.head_dim**-0.5
            self.qkv = nn.Linear(dim, 3 * dim)
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
            self.attn_drop = nn.Dropout(0.0)
            self.norm = nn.Identity()
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(0.0)

        def forward(self, x, attn_mask=None):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
            return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c))))

    Attention.__module__ = "timm.models.vision_transformer"
    return Attention


def test_patch_timm_swaps_vit_attention_and_keeps_outputs():
    attn_cls = _fake_timm_attention_class()
    model = nn.Sequential(nn.Linear(16, 16), attn_cls(16, 2), nn.Sequential(attn_cls(16, 4)))
    x = torch.randn(2, 7, 16)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        assert vk.patch_timm(model) is model
        after = model(x)
    assert type(model[1]).__name__ == "FusedAttention" and type(model[2][0]).__name__ == "FusedAttention"
    assert isinstance(model[1], attn_cls)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    mask = torch.zeros(7, 7)  # an attention mask falls back to timm's own forward
    torch.testing.assert_close(model[1](x, attn_mask=mask), attn_cls.forward(model[1], x, attn_mask=mask))


def test_timm_vit_state_dict_loads_and_matches(monkeypatch):
    timm = pytest.importorskip("timm")
    import vitkernels.integrations.timm as integration

    calls = []

    def counting_self_attention(*args):
        calls.append(1)
        return vk.self_attention(*args)

    monkeypatch.setattr(integration, "self_attention", counting_self_attention)
    for name in SIZES:
        ref = timm.create_model(name, pretrained=False).eval()
        ours = create_model(name).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=2e-4)
            patched = vk.patch_timm(timm.create_model(name, pretrained=False).eval())
            patched.load_state_dict(ref.state_dict())
            calls.clear()
            torch.testing.assert_close(patched(x), ref(x), atol=2e-4, rtol=2e-4)
            assert len(calls) == 12, "patch_timm must run the fused op in every block"
