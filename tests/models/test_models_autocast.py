"""Models under torch.autocast (SPEC.md, "Mixed precision"): the vitkernels models and timm models
patched by `patch_timm` train and infer under autocast(cpu, bfloat16) with outputs and gradients
as close to the float32 model as timm's own model under the same autocast.

Rule: with the float32 unpatched model as the reference, the relative error of the output and of
the parameter gradients (all parameters as one vector) is at most 2 x that of the baseline under
the same autocast + a floor. The baseline is timm's model (or Hugging Face's for SegFormer); the
video models have none in timm, so they are held to the floor alone. Outputs come back in bfloat16
and every float32 parameter gets a float32 gradient.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.models import create_model

DTYPE = torch.bfloat16
FLOOR = 1e-2  # relative error a bfloat16 forward and backward of a tiny model stays within


def _run(model, x, autocast: bool):
    """Output (float32 copy) and the parameter gradients of a sum-of-squares loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=DTYPE, enabled=autocast):
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
    if autocast:
        assert out.dtype == DTYPE, f"output dtype {out.dtype} under autocast"
    out.float().square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == p.dtype == torch.float32, f"{name}: grad dtype {p.grad.dtype}"
            grads[name] = p.grad.detach().clone()
    return out.detach().float(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _errors(model, x, ref_out, ref_grads, rename=lambda n: n):
    out, grads = _run(model, x, autocast=True)
    names = sorted(ref_grads)
    g = torch.cat([grads[rename(n)].flatten() for n in names])
    r = torch.cat([ref_grads[n].flatten() for n in names])
    return _rel(out, ref_out), _rel(g, r)


def _check(name, ours, baseline_errors, ref_out, ref_grads, x, rename=lambda n: n):
    e_out, e_grad = _errors(ours, x, ref_out, ref_grads, rename)
    b_out, b_grad = baseline_errors
    assert e_out <= 2 * b_out + FLOOR, f"{name}: output error {e_out:.3e} vs baseline {b_out:.3e}"
    assert e_grad <= 2 * b_grad + FLOOR, f"{name}: grad error {e_grad:.3e} vs baseline {b_grad:.3e}"


# (vitkernels / timm model name, tiny kwargs for both, input size)
TIMM_FAMILIES = [
    ("vit_tiny_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5), (2, 3, 32, 32)),
    (
        "swin_tiny_patch4_window7_224",
        dict(img_size=56, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7, num_classes=5),
        (2, 3, 56, 56),
    ),
    (
        "swinv2_tiny_window8_256",
        dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5),
        (2, 3, 64, 64),
    ),
    ("pvt_v2_b0", dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_classes=5), (2, 3, 64, 64)),
    ("pvt_v2_b2_li", dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_classes=5), (2, 3, 64, 64)),
    ("xcit_tiny_12_p16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=4, num_classes=5), (2, 3, 32, 32)),
    ("mvitv2_tiny", dict(img_size=32, num_classes=5), (2, 3, 32, 32)),  # timm's config per name is fixed
]


@pytest.mark.parametrize("name,kwargs,shape", TIMM_FAMILIES, ids=[f[0] for f in TIMM_FAMILIES])
def test_vitkernels_and_patched_timm_models_under_autocast(name, kwargs, shape):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    ours = create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    patched = vk.patch_timm(copy.deepcopy(ref))
    x = torch.randn(shape)

    ref_out, ref_grads = _run(ref, x, autocast=False)
    baseline = _errors(ref, x, ref_out, ref_grads)
    _check(f"vitkernels {name}", ours, baseline, ref_out, ref_grads, x)
    _check(f"patched timm {name}", patched, baseline, ref_out, ref_grads, x)


def test_segformer_under_autocast():
    transformers = pytest.importorskip("transformers")
    from vitkernels.models import convert_hf_segformer

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 40, 64], decoder_hidden_size=32
    )
    ref = transformers.SegformerForSemanticSegmentation(config).eval()
    ours = create_model(
        "segformer_b0", embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_hidden_size=32, num_classes=5
    ).eval()
    converted = convert_hf_segformer(ref.state_dict())
    ours.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    ref_out, ref_grads = _run(ref, x, autocast=False)
    baseline = _errors(ref, x, ref_out, ref_grads)
    # HF parameter names -> ours: compare the gradients parameter by parameter through the converter.
    ours_out, ours_grads = _run(ours, x, autocast=True)
    hf_names = sorted(ref_grads)
    mapped = convert_hf_segformer({n: ref_grads[n] for n in hf_names})
    g = torch.cat([ours_grads[n].flatten() for n in sorted(mapped)])
    r = torch.cat([mapped[n].flatten() for n in sorted(mapped)])
    assert _rel(ours_out, ref_out) <= 2 * baseline[0] + FLOOR
    assert _rel(g, r) <= 2 * baseline[1] + FLOOR


@pytest.mark.parametrize("name,frames", [("timesformer_base_patch16_224", 4), ("vivit_base_factorized", 4)])
def test_video_models_under_autocast(name, frames):
    torch.manual_seed(0)
    model = create_model(name, num_frames=frames, embed_dim=32, depth=2, num_heads=2, num_classes=5, img_size=32)
    model.eval()
    x = torch.randn(2, 3, frames, 32, 32)
    ref_out, ref_grads = _run(model, x, autocast=False)
    _check(name, model, (0.0, 0.0), ref_out, ref_grads, x)


def test_training_step_under_autocast_with_grad_scaler_semantics():
    """One AMP training step (bfloat16 autocast, float32 master weights) changes the weights and keeps
    them float32; the loss decreases over a few steps on a fixed batch."""
    torch.manual_seed(0)
    model = create_model(
        "swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=3
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 56, 56), torch.tensor([0, 1, 2, 0])
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=DTYPE):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
