"""MViTv2 models: timm parameter names, outputs and gradients equal to timm's (same weights, fp32), every pooling
attention on `pool_attention`, training features, the Triton path in the interpreter.

timm's `create_model("mvitv2_*")` takes no depth overrides (its config is fixed per name), so the named sizes are
compared at img_size 64 and the smaller variants are built from timm's `MultiScaleVit(MultiScaleVitCfg(...))`.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitkernels as vk
import vitkernels.models._layers as layers
from vitkernels import backends
from vitkernels.models import create_model, list_models
from vitkernels.models.mvitv2 import MultiScaleVit

timm = pytest.importorskip("timm")
from timm.models.mvitv2 import MultiScaleVit as TimmMultiScaleVit  # noqa: E402
from timm.models.mvitv2 import MultiScaleVitCfg  # noqa: E402

NAMES = ["mvitv2_tiny", "mvitv2_small", "mvitv2_base", "mvitv2_small_cls", "mvitv2_base_cls"]
DEPTHS = {"mvitv2_tiny": (1, 2, 5, 2), "mvitv2_small": (1, 2, 11, 2), "mvitv2_base": (2, 3, 16, 3)}
SMALL = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1)  # heads 1, 2, 4, 8 of head dim 16


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = str(func.overloadpacket).partition(".")
        if ns == "vitkernels":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _randomize(model, std=0.05, all_params=True):
    """Non-trivial weights everywhere (biases, norm affines, rel-pos tables, class token); with all_params
    False only those (the linear and conv weights are random already)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if all_params or p.dim() < 2 or "rel_pos" in name or "token" in name:
                p.add_(std * torch.randn_like(p))
    return model


def _timm_small(img_size=64, num_classes=5, drop_path_rate=0.0, **cfg):
    return TimmMultiScaleVit(
        MultiScaleVitCfg(**{**SMALL, **cfg}), img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate
    )


def _ours_small(img_size=64, num_classes=5, drop_path_rate=0.0, **cfg):
    return MultiScaleVit(**{**SMALL, **cfg}, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate)


def _pair(**cfg):
    ref = _randomize(_timm_small(**cfg)).eval()
    ours = _ours_small(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _n_blocks(model):
    return sum(len(s.blocks) for s in model.stages)


# ----------------------------------------------------------------------------- names, shapes, registry


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_timm_names_and_shapes(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    assert ours == ref


def test_registered_and_created_by_name():
    assert set(NAMES) <= set(list_models())
    model = create_model("mvitv2_tiny", num_classes=3, img_size=64)
    assert isinstance(model, MultiScaleVit) and model.depths == DEPTHS["mvitv2_tiny"]
    assert [b.attn.num_heads for s in model.stages for b in s.blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 8, 8]


# ----------------------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("name", NAMES[:4])  # (mvitv2_base_cls is mvitv2_base with the class token of _small_cls)
def test_named_sizes_load_timm_weights_and_match(name):
    """The real configurations (full depth) at 64 px: strict load, equal features and logits; one
    `pool_attention` per block."""
    ref = _randomize(timm.create_model(name, pretrained=False, img_size=64), all_params=False).eval()
    ours = create_model(name, img_size=64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), OpCounter() as counter:
        got = ours.forward_features(x)
    with torch.no_grad():
        want = ref.forward_features(x)
        assert _rel(got, want) < 1e-5
        assert _rel(ours.forward_head(got), ref.forward_head(want)) < 1e-5
    assert counter.counts.get("_pool_attention_fwd") == _n_blocks(ours) == sum(ours.depths)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(expand_attn=False),  # mvitv2_large's layout: the width grows in the MLP branch
        dict(use_cls_token=True, use_abs_pos=True),
        dict(use_cls_token=True, expand_attn=False),
        dict(mode="max"),
        dict(mode="avg", use_cls_token=True),
        dict(rel_pos_type="none", residual_pooling=False),
        dict(residual_pooling=False, num_heads=(1, 2, 2, 2)),
        dict(embed_dim=(16, 24, 32, 64), num_heads=(2, 2, 4, 4), mlp_ratio=2.0),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_configs_match_timm(cfg):
    ours, ref = _pair(**cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-5
        assert _rel(ours.forward_features(x), ref.forward_features(x)) < 1e-5


@pytest.mark.parametrize("hw", [(64, 40), (32, 64), (48, 48), (96, 96)])
def test_other_input_sizes_match_timm(hw):
    """Non-square and smaller inputs on a model built at 96 px (maps 24 -> 12 -> 6 -> 3, odd q/k sizes)
    run as timm runs them: sizes read off the pooled maps, q_h != k_h and q_h != q_w in the op."""
    ours, ref = _pair(img_size=96, use_cls_token=True)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-5


def test_inputs_beyond_the_tables_raise_as_in_timm():
    """timm sizes its rel-pos tables from img_size; a larger input needs indices past them: both raise."""
    ours, ref = _pair(img_size=64)
    x = torch.randn(1, 3, 128, 128)
    with pytest.raises(IndexError):
        ref(x)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        ours(x)


def test_unsupported_configurations_raise():
    with pytest.raises(ValueError, match="pool_first"):
        _ours_small(pool_first=True)
    with pytest.raises(ValueError, match="conv_unshared"):
        _ours_small(mode="conv_unshared")
    with pytest.raises(ValueError, match="global_pool"):
        _ours_small(global_pool="token")  # no class token


def _step(model, x, seed=1234):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_grads_close(got, want, tol=2e-5):
    assert set(got) == set(want)
    floor = tol * 1e-2 * max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= tol * g.abs().max().item() + floor, f"{name}: error {err:.3g}, max |grad| {g.abs().max():.3g}"


@pytest.mark.parametrize("cfg", [dict(), dict(use_cls_token=True, expand_attn=False)], ids=["default", "cls"])
def test_train_step_with_drop_path_equals_timm(cfg):
    """Same seed -> same stochastic-depth masks (timm's rates, timm's draws) -> same output and every
    parameter's gradient, rel-pos tables included."""
    ref = _randomize(_timm_small(drop_path_rate=0.5, **cfg))
    ours = _ours_small(drop_path_rate=0.5, **cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    want_y, want_g = _step(ref, x)
    got_y, got_g = _step(ours, x)
    torch.testing.assert_close(got_y, want_y, atol=2e-5, rtol=2e-4)
    _assert_grads_close(got_g, want_g)
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(got_y, ours(x), atol=1e-4)  # the masks did drop something


@pytest.mark.parametrize("cfg", [dict(), dict(use_cls_token=True, global_pool="avg")], ids=["avg", "cls"])
def test_gradients_reach_every_parameter(cfg):
    # (with token pooling the last block's rel-pos tables get no gradient: only the class token's row
    # is read, and the class token has no relative-position terms)
    model = _randomize(_ours_small(**cfg))
    _, grads = _step(model, torch.randn(2, 3, 64, 48))
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_grad_checkpointing_equals_timm_and_plain(monkeypatch):
    ref = _randomize(_timm_small(drop_path_rate=0.3))
    ours = _ours_small(drop_path_rate=0.3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    plain_y, plain_g = _step(copy.deepcopy(ours), x)
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *a, **k: calls.append(k) or real(fn, *a, **k))
    ours.set_grad_checkpointing(True)
    ref.set_grad_checkpointing(True)
    assert ours.grad_checkpointing and all(s.grad_checkpointing for s in ours.stages)
    got_y, got_g = _step(ours, x)
    assert len(calls) == _n_blocks(ours) and all(k == {"use_reentrant": False} for k in calls)
    torch.testing.assert_close(got_y, plain_y, atol=1e-6, rtol=1e-6)
    _assert_grads_close(got_g, plain_g, tol=1e-5)
    want_y, want_g = _step(ref, x)
    torch.testing.assert_close(got_y, want_y, atol=2e-5, rtol=2e-4)
    _assert_grads_close(got_g, want_g)
    calls.clear()
    ours.eval()
    with torch.no_grad():
        ours(x)
    assert calls == []  # inference is not checkpointed


# ----------------------------------------------------------------------------- training features


def _drop_probs(model, attr):
    return [
        float(getattr(getattr(m, attr), "drop_prob", 0.0))
        for m in model.modules()
        if isinstance(getattr(m, attr, None), torch.nn.Module)
    ]


def test_drop_path_schedule_equals_timm():
    ref = timm.create_model("mvitv2_tiny", pretrained=False, drop_path_rate=0.4, img_size=64)
    with torch.device("meta"):
        ours = create_model("mvitv2_tiny", drop_path_rate=0.4, img_size=64)
    for attr in ("drop_path1", "drop_path2"):
        got = _drop_probs(ours, attr)
        assert got == _drop_probs(ref, attr) and len(got) == 10 and got[-1] == pytest.approx(0.4)
    with torch.device("meta"):
        assert max(_drop_probs(create_model("mvitv2_tiny"), "drop_path1")) == 0.0  # timm's default: 0


def test_forward_is_head_of_features():
    for cfg, n_tokens in ((dict(), 4), (dict(use_cls_token=True), 5)):
        ours, ref = _pair(**cfg)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            feats = ours.forward_features(x)
            assert feats.shape == (2, n_tokens, 128)  # 2x2 map after three stride-2 stages, width 16·8
            torch.testing.assert_close(ours.forward_head(feats), ours(x), rtol=0, atol=0)
            pre = ours.forward_head(feats, pre_logits=True)
            assert pre.shape == (2, 128)
            assert _rel(pre, ref.forward_head(ref.forward_features(x), pre_logits=True)) < 1e-5
    model = _ours_small(num_classes=0).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_state_dict_round_trip_and_deepcopy():
    model = _randomize(_ours_small(drop_path_rate=0.2))
    model.set_grad_checkpointing()
    plain = _ours_small()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    clone = copy.deepcopy(model)
    assert clone.grad_checkpointing
    x = torch.randn(1, 3, 64, 64)
    model.eval(), plain.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the Triton path (interpreter on CPU)


def test_triton_backend_matches_reference_with_grads():
    """Every block's pool_attention on the Triton kernels (forced; float32 through the interpreter on CPU),
    class token, rel-pos tables, q_h != k_h: output and every gradient against the reference backend."""
    pytest.importorskip("triton")
    if "triton" not in backends.kernels("pool_attention"):
        pytest.skip("no Triton kernel is registered for pool_attention yet")
    torch.manual_seed(0)
    model = _randomize(
        _ours_small(img_size=32, depths=(1, 1), stride_q=((1, 1), (2, 2)), use_cls_token=True, num_classes=3)
    )
    x = torch.randn(1, 3, 32, 24)  # q maps 8x6 then 4x3; k/v pooled to 2x2 then 4x3
    outs, grads = [], []
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with vk.use_backend(backend):
            with OpCounter() as counter:
                y = model(x)
            y.square().sum().backward()
        assert counter.counts.get("_pool_attention_fwd") == 2
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    _assert_grads_close(grads[1], grads[0], tol=1e-4)
