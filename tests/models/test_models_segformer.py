"""SegFormer models: Hugging Face key conversion (strict), outputs vs an independent eager forward
written from HF's naming (separate query / key / value linears), any input size."""

import math
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import convert_hf_segformer, create_model

from helpers import layer_norm
from helpers import linear as _lin

W = (64, 128, 320, 512)
CONFIGS = {  # name: (hidden_sizes, depths, decoder_hidden_size)
    "segformer_b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "segformer_b1": (W, (2, 2, 2, 2), 256),
    "segformer_b2": (W, (3, 4, 6, 3), 768),
    "segformer_b3": (W, (3, 4, 18, 3), 768),
    "segformer_b4": (W, (3, 8, 27, 3), 768),
    "segformer_b5": (W, (3, 6, 40, 3), 768),
}
HEADS, SR, PATCH, STRIDE = (1, 2, 5, 8), (8, 4, 2, 1), (7, 3, 3, 3), (4, 2, 2, 2)
SMALL = {"depths": (1, 2, 1, 1), "decoder_hidden_size": 32, "num_classes": 5}  # overrides on segformer_b0


def hf_segformer_shapes(dims, depths, dec, num_classes=150):
    """Hugging Face SegformerForSemanticSegmentation state_dict keys and shapes."""
    keys = {}
    e = "segformer.encoder."
    for i, (c, depth) in enumerate(zip(dims, depths)):
        cin = 3 if i == 0 else dims[i - 1]
        p = f"{e}patch_embeddings.{i}."
        keys.update(
            {
                p + "proj.weight": (c, cin, PATCH[i], PATCH[i]),
                p + "proj.bias": (c,),
                p + "layer_norm.weight": (c,),
                p + "layer_norm.bias": (c,),
            }
        )
        for j in range(depth):
            p = f"{e}block.{i}.{j}."
            keys.update({p + "layer_norm_1.weight": (c,), p + "layer_norm_1.bias": (c,)})
            for lin in ("query", "key", "value"):
                keys.update({p + f"attention.self.{lin}.weight": (c, c), p + f"attention.self.{lin}.bias": (c,)})
            if SR[i] > 1:
                keys.update(
                    {
                        p + "attention.self.sr.weight": (c, c, SR[i], SR[i]),
                        p + "attention.self.sr.bias": (c,),
                        p + "attention.self.layer_norm.weight": (c,),
                        p + "attention.self.layer_norm.bias": (c,),
                    }
                )
            keys.update(
                {
                    p + "attention.output.dense.weight": (c, c),
                    p + "attention.output.dense.bias": (c,),
                    p + "layer_norm_2.weight": (c,),
                    p + "layer_norm_2.bias": (c,),
                    p + "mlp.dense1.weight": (4 * c, c),
                    p + "mlp.dense1.bias": (4 * c,),
                    p + "mlp.dwconv.dwconv.weight": (4 * c, 1, 3, 3),
                    p + "mlp.dwconv.dwconv.bias": (4 * c,),
                    p + "mlp.dense2.weight": (c, 4 * c),
                    p + "mlp.dense2.bias": (c,),
                }
            )
        keys.update({f"{e}layer_norm.{i}.weight": (c,), f"{e}layer_norm.{i}.bias": (c,)})
    for i, c in enumerate(dims):
        keys.update({f"decode_head.linear_c.{i}.proj.weight": (dec, c), f"decode_head.linear_c.{i}.proj.bias": (dec,)})
    keys.update(
        {
            "decode_head.linear_fuse.weight": (dec, 4 * dec, 1, 1),
            "decode_head.batch_norm.weight": (dec,),
            "decode_head.batch_norm.bias": (dec,),
            "decode_head.batch_norm.running_mean": (dec,),
            "decode_head.batch_norm.running_var": (dec,),
            "decode_head.batch_norm.num_batches_tracked": (),
            "decode_head.classifier.weight": (num_classes, dec, 1, 1),
            "decode_head.classifier.bias": (num_classes,),
        }
    )
    return keys


def random_hf_state_dict(shapes, dtype=torch.float64):
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s, dtype=dtype) + 0.5
        elif "norm" in k and k.endswith(".weight"):  # layer_norm*, batch_norm
            sd[k] = 1 + 0.1 * torch.randn(s, dtype=dtype)
        else:
            fan_in = math.prod(s[1:]) if len(s) > 1 else 16
            sd[k] = torch.randn(s, dtype=dtype) / math.sqrt(fan_in) + (0.05 if len(s) == 1 else 0)
    return sd


def to_hf(sd):
    """Inverse of convert_hf_segformer, written independently (splits kv into key and value)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("decode_head."):
            out[k] = v
            continue
        parts = k.split(".")
        if k.startswith("encoder.patch_embed."):
            out["segformer.encoder.patch_embeddings.0." + parts[2].replace("norm", "layer_norm") + "." + parts[3]] = v
        elif ".downsample." in k:
            out[
                f"segformer.encoder.patch_embeddings.{parts[2]}."
                + parts[4].replace("norm", "layer_norm")
                + "."
                + parts[5]
            ] = v
        elif ".blocks." in k:
            i, j, mod, p = parts[2], parts[4], ".".join(parts[5:-1]), parts[-1]
            pre = f"segformer.encoder.block.{i}.{j}."
            if mod == "attn.kv":
                key, value = v.chunk(2, dim=0)
                out[pre + "attention.self.key." + p], out[pre + "attention.self.value." + p] = key, value
                continue
            names = {
                "norm1": "layer_norm_1",
                "norm2": "layer_norm_2",
                "attn.q": "attention.self.query",
                "attn.sr": "attention.self.sr",
                "attn.norm": "attention.self.layer_norm",
                "attn.proj": "attention.output.dense",
                "mlp.fc1": "mlp.dense1",
                "mlp.dwconv": "mlp.dwconv.dwconv",
                "mlp.fc2": "mlp.dense2",
            }
            out[pre + names[mod] + "." + p] = v
        else:  # encoder.stages.{i}.norm.*
            out[f"segformer.encoder.layer_norm.{parts[2]}.{parts[4]}"] = v
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_names_convert_and_load_strict(name):
    dims, depths, dec = CONFIGS[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost for the large sizes
        model = create_model(name)
        shapes = hf_segformer_shapes(dims, depths, dec)
        hf = {k: torch.empty(s) if s else torch.tensor(0) for k, s in shapes.items()}
    converted = convert_hf_segformer(hf)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    assert {k: tuple(v.shape) for k, v in to_hf(model.state_dict()).items()} == shapes


def test_round_trip_through_hf_names():
    model = create_model("segformer_b0", **SMALL)
    sd = model.state_dict()
    back = convert_hf_segformer(to_hf(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_converter_packs_key_then_value():
    hf = random_hf_state_dict(hf_segformer_shapes(CONFIGS["segformer_b0"][0], (1, 1, 1, 1), 16, 3))
    out = convert_hf_segformer(hf)
    p = "segformer.encoder.block.2.0.attention.self."
    torch.testing.assert_close(
        out["encoder.stages.2.blocks.0.attn.kv.weight"], torch.cat([hf[p + "key.weight"], hf[p + "value.weight"]])
    )
    torch.testing.assert_close(
        out["encoder.stages.2.blocks.0.attn.kv.bias"], torch.cat([hf[p + "key.bias"], hf[p + "value.bias"]])
    )


def test_converter_rejects_unknown_and_incomplete_keys():
    hf = random_hf_state_dict(hf_segformer_shapes(CONFIGS["segformer_b0"][0], (1, 1, 1, 1), 16, 3))
    with pytest.raises(KeyError, match="unrecognised"):
        convert_hf_segformer({**hf, "classifier.weight": torch.zeros(3, 256)})
    del hf["segformer.encoder.block.0.0.attention.self.value.bias"]
    with pytest.raises(KeyError, match="needs both the key and the value"):
        convert_hf_segformer(hf)


# transformers >= 5 renamed the modules of its state_dict() (Hub checkpoints keep the old names).
_V5_NAMES = [
    (r"segformer\.encoder\.patch_embeddings\.(\d+)\.", r"segformer.stages.\1.patch_embeddings."),
    (r"segformer\.encoder\.layer_norm\.(\d+)\.", r"segformer.stages.\1.layer_norm."),
    (r"segformer\.encoder\.block\.(\d+)\.(\d+)\.", r"segformer.stages.\1.blocks.\2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
    (r"attention\.self\.query", "attention.q_proj"),
    (r"attention\.self\.key", "attention.k_proj"),
    (r"attention\.self\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction."),
    (r"attention\.self\.layer_norm", "attention.sequence_reduction.layer_norm"),
    (r"mlp\.dense1", "mlp.fc1"),
    (r"mlp\.dense2", "mlp.fc2"),
    (r"decode_head\.linear_c\.", "decode_head.linear_projections."),
]


def test_converter_reads_transformers_5_names():
    legacy = random_hf_state_dict(hf_segformer_shapes(CONFIGS["segformer_b0"][0], (1, 2, 1, 1), 16, 3))
    v5 = {}
    for key, value in legacy.items():
        for pattern, repl in _V5_NAMES:
            key = re.sub(pattern, repl, key)
        v5[key] = value
    assert set(v5) != set(legacy)
    want, got = convert_hf_segformer(legacy), convert_hf_segformer(v5)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


_ln = partial(layer_norm, eps=1e-5)


def _heads(z, nh):
    """HF transpose_for_scores: (B, N, C) -> (B, heads, N, D)."""
    return z.reshape(z.shape[0], z.shape[1], nh, -1).permute(0, 2, 1, 3)


def eager_hf_segformer(sd, x, depths):
    """SegformerForSemanticSegmentation (eval) from a Hugging Face state_dict, as HF computes it:
    separate query / key / value linears, heads split per linear, every LayerNorm eps 1e-5."""
    e = "segformer.encoder."
    feats = []
    for i, depth in enumerate(depths):
        p = f"{e}patch_embeddings.{i}."
        x = F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=STRIDE[i], padding=PATCH[i] // 2)
        b, c, h, w = x.shape
        t = _ln(x.flatten(2).transpose(1, 2), sd, p + "layer_norm")
        nh, d = HEADS[i], c // HEADS[i]
        for j in range(depth):
            p = f"{e}block.{i}.{j}."
            y = _ln(t, sd, p + "layer_norm_1")
            q = _heads(_lin(y, sd, p + "attention.self.query"), nh)
            if SR[i] > 1:
                r = y.permute(0, 2, 1).reshape(b, c, h, w)
                r = F.conv2d(r, sd[p + "attention.self.sr.weight"], sd[p + "attention.self.sr.bias"], stride=SR[i])
                y = _ln(r.reshape(b, c, -1).permute(0, 2, 1), sd, p + "attention.self.layer_norm")
            k, v = (
                _heads(_lin(y, sd, p + "attention.self.key"), nh),
                _heads(_lin(y, sd, p + "attention.self.value"), nh),
            )
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
            t = t + _lin(a.permute(0, 2, 1, 3).reshape(b, h * w, c), sd, p + "attention.output.dense")
            y = _lin(_ln(t, sd, p + "layer_norm_2"), sd, p + "mlp.dense1")
            y = y.transpose(1, 2).reshape(b, -1, h, w)
            y = F.conv2d(
                y, sd[p + "mlp.dwconv.dwconv.weight"], sd[p + "mlp.dwconv.dwconv.bias"], padding=1, groups=y.shape[1]
            )
            t = t + _lin(F.gelu(y.flatten(2).transpose(1, 2)), sd, p + "mlp.dense2")
        x = _ln(t, sd, f"{e}layer_norm.{i}").reshape(b, h, w, c).permute(0, 3, 1, 2)
        feats.append(x)
    ups = []
    for i, f in enumerate(feats):
        b, _, h, w = f.shape
        y = _lin(f.flatten(2).transpose(1, 2), sd, f"decode_head.linear_c.{i}.proj").permute(0, 2, 1)
        y = F.interpolate(y.reshape(b, -1, h, w), size=feats[0].shape[2:], mode="bilinear", align_corners=False)
        ups.append(y)
    y = F.conv2d(torch.cat(ups[::-1], dim=1), sd["decode_head.linear_fuse.weight"])
    bn = "decode_head.batch_norm."
    y = F.batch_norm(
        y, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"], sd[bn + "bias"], False, 0.1, 1e-5
    )
    y = F.relu(y)
    return F.conv2d(y, sd["decode_head.classifier.weight"], sd["decode_head.classifier.bias"])


@pytest.mark.parametrize("size", [(64, 64), (70, 45)])
def test_small_segformer_matches_eager_hf_forward(size):
    depths = SMALL["depths"]
    hf = random_hf_state_dict(hf_segformer_shapes(CONFIGS["segformer_b0"][0], depths, 32, 5))
    model = create_model("segformer_b0", **SMALL).double().eval()
    model.load_state_dict(convert_hf_segformer(hf), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        ref = eager_hf_segformer(hf, x, depths)
    assert out.shape == (2, 5, -(-size[0] // 4), -(-size[1] // 4))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "size,depths",
    [((512, 512), (2, 2, 2, 2)), ((1024, 1024), (1, 1, 1, 1))],
    ids=["512_b0", "1024_b0_one_block_per_stage"],
)
def test_segformer_b0_at_full_resolution_matches_eager_hf_forward(size, depths):
    """b0's widths (150 classes) at SegFormer's 512 and 1024 px: N = 16,384 / 65,536 stage-1 queries
    against M = 256 / 1,024 reduced keys; logits at 1/4 resolution. (1024 px with one block per stage
    to keep CPU CI short: the shapes are the same.)"""
    dims, _, dec = CONFIGS["segformer_b0"]
    hf = random_hf_state_dict(hf_segformer_shapes(dims, depths, dec), dtype=torch.float32)
    model = create_model("segformer_b0", depths=depths).eval()
    model.load_state_dict(convert_hf_segformer(hf), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        ref = eager_hf_segformer(hf, x, depths)
    assert out.shape == (1, 150, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 40)])
def test_any_input_size(size):
    model = create_model(
        "segformer_b1", embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_hidden_size=16, num_classes=3
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3, -(-size[0] // 4), -(-size[1] // 4)) and torch.isfinite(out).all()


def test_default_num_classes_is_150():
    assert create_model("segformer_b0").decode_head.classifier.out_channels == 150


def test_training_step_gradients_reach_every_parameter():
    model = create_model(
        "segformer_b0", embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_hidden_size=16, num_classes=4
    )
    out = model(torch.randn(2, 3, 64, 72))
    F.cross_entropy(out, torch.randint(0, 4, (2, out.shape[2], out.shape[3]))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_create_model_lists_segformer():
    assert set(CONFIGS) <= set(vk.models.list_models())


def test_transformers_segformer_state_dict_converts_and_matches():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=5, depths=[1, 2, 1, 1], decoder_hidden_size=32)
    ref = transformers.SegformerForSemanticSegmentation(config).eval()
    ours = create_model("segformer_b0", **SMALL).eval()
    ours.load_state_dict(convert_hf_segformer(ref.state_dict()), strict=True)
    for size in [(128, 128), (90, 70)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, atol=2e-4, rtol=2e-4)
