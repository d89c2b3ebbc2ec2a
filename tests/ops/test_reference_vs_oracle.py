"""The package's reference backend against the independent float64 oracles in tests/oracles.py.

Every op, seeded random odd shapes, float64 on CPU: outputs and the gradient of every float input
(same random upstream gradient through both) must agree to ~1e-10.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

import vitkernels  # noqa: E402

import oracles

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(autouse=True)
def reference_backend():
    with vitkernels.use_backend("reference"):
        yield


def make_gen(*key):
    # stable across processes (str hash is randomised per interpreter)
    return torch.Generator().manual_seed(zlib.crc32(repr(("vk-oracle",) + key).encode()))


def rnd(gen, *shape, scale=1.0, grad=True):
    t = torch.randn(*shape, generator=gen, dtype=DT) * scale
    return t.requires_grad_(grad)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare(name, args, kwargs=None, gen=None, tol=TOL):
    """Run vitkernels.<name> and oracles.<name> on the same inputs; compare outputs and the
    gradients of every float tensor input that requires grad. Returns the package outputs."""
    kwargs = kwargs or {}
    gen = gen or torch.Generator().manual_seed(0)
    pkg_fn, orc_fn = getattr(vitkernels, name), getattr(oracles, name)
    inputs = [
        a
        for a in list(args) + list(kwargs.values())
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad
    ]
    out_p = pkg_fn(*args, **kwargs)
    out_o = orc_fn(*args, **kwargs)
    assert type(out_p) is type(out_o) or (isinstance(out_p, (tuple, list)) and isinstance(out_o, (tuple, list))), (
        f"{name}: package returned {type(out_p).__name__}, oracle {type(out_o).__name__}"
    )
    tp, to = _as_tuple(out_p), _as_tuple(out_o)
    assert len(tp) == len(to), f"{name}: {len(tp)} outputs vs oracle {len(to)}"
    for i, (a, b) in enumerate(zip(tp, to)):
        assert a.shape == b.shape, f"{name} output {i}: shape {tuple(a.shape)} vs oracle {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name} output {i}: dtype {a.dtype} vs oracle {b.dtype}"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{name} output {i}: {m}")
    if inputs:
        gos = [torch.randn(b.shape, generator=gen, dtype=DT) for b in to]
        gp = torch.autograd.grad(tp, inputs, gos, allow_unused=True, materialize_grads=True)
        go = torch.autograd.grad(to, inputs, gos, allow_unused=True, materialize_grads=True)
        for j, (a, b, x) in enumerate(zip(gp, go, inputs)):
            assert a.shape == x.shape, f"{name} grad of input {j} {tuple(x.shape)}: got shape {tuple(a.shape)}"
            assert torch.isfinite(a).all(), f"{name} grad of input {j} {tuple(x.shape)} not finite"
            torch.testing.assert_close(
                a, b, **tol, msg=lambda m, j=j, x=x: f"{name} grad of input {j} {tuple(x.shape)}: {m}"
            )
    return out_p


# ------------------------------------------------------------------------------------------
# 1. attention
# ------------------------------------------------------------------------------------------
ATTN_CASES = [
    # (B, Hh, Nq, Nk, D, bias_shape, scale)
    (2, 3, 5, 5, 4, None, None),
    (2, 3, 5, 9, 4, None, None),
    (1, 2, 13, 3, 7, None, 0.25),
    (2, 3, 5, 9, 4, (3, 5, 9), None),
    (2, 3, 5, 9, 4, (2, 1, 1, 9), None),
    (2, 3, 5, 9, 4, (1, 1, 5, 9), None),
    (2, 3, 5, 9, 4, (2, 3, 5, 9), 0.6),
    (2, 3, 5, 9, 4, (9,), None),
    (2, 3, 5, 9, 4, (2, 3, 1, 9), None),
    (1, 1, 1, 1, 3, (1, 1, 1, 1), None),
    (3, 1, 17, 11, 5, (1, 1, 17, 11), None),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=str)
def test_attention(case):
    B, Hh, Nq, Nk, D, bshape, scale = case
    g = make_gen("attention", case)
    q, k, v = rnd(g, B, Hh, Nq, D), rnd(g, B, Hh, Nk, D), rnd(g, B, Hh, Nk, D)
    bias = None if bshape is None else rnd(g, *bshape)
    compare("attention", (q, k, v, bias, scale), gen=g)


@pytest.mark.parametrize("bshape", [(2, 3, 5, 9), (1, 1, 5, 9), (3, 5, 9)], ids=str)
def test_attention_fully_masked_row(bshape):
    g = make_gen("attention-inf", bshape)
    q, k, v = rnd(g, 2, 3, 5, 4), rnd(g, 2, 3, 9, 4), rnd(g, 2, 3, 9, 4)
    b = torch.randn(*bshape, generator=g, dtype=DT)
    b[..., 1, :] = float("-inf")  # fully masked query row 1 (in every broadcast slice)
    b[..., 3, ::2] = float("-inf")  # partly masked row
    bias = b.requires_grad_()
    out = compare("attention", (q, k, v, bias), gen=g)
    assert torch.all(out[:, :, 1] == 0)
    assert torch.isfinite(out).all()


def test_attention_matches_sdpa():
    g = make_gen("sdpa")
    for bshape, scale in [((2, 3, 5, 9), None), ((1, 3, 1, 9), 0.3), (None, None), ((3, 5, 9), 1.7)]:
        q, k, v = rnd(g, 2, 3, 5, 4), rnd(g, 2, 3, 9, 4), rnd(g, 2, 3, 9, 4)
        bias = None if bshape is None else rnd(g, *bshape)
        ins = [t for t in (q, k, v, bias) if t is not None]
        for backend in ("reference", "auto"):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            with vitkernels.use_backend(backend):
                out = vitkernels.attention(q, k, v, bias, scale)
            torch.testing.assert_close(out, ref, **TOL)
            go = torch.randn(ref.shape, generator=g, dtype=DT)
            for a, b_ in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins, go)):
                torch.testing.assert_close(a, b_, **TOL)


def test_attention_noncontiguous():
    g = make_gen("attention-nc")
    q = rnd(g, 2, 5, 3, 4, grad=False).transpose(1, 2).requires_grad_()  # (2,3,5,4) non-contiguous
    k = rnd(g, 2, 3, 9, 8, grad=False)[..., ::2].requires_grad_()
    v = rnd(g, 2, 3, 9, 6, grad=False)[..., 1:5].requires_grad_()
    bias = rnd(g, 9, 5, grad=False).t().requires_grad_()
    compare("attention", (q, k, v, bias), gen=g)


# ------------------------------------------------------------------------------------------
# 2. self_attention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,N,Hh,D,scale",
    [(2, 1, 3, 4, None), (2, 5, 3, 4, None), (1, 50, 2, 8, None), (3, 7, 1, 5, 0.4), (2, 17, 4, 3, None)],
)
def test_self_attention(B, N, Hh, D, scale):
    g = make_gen("self", B, N, Hh, D)
    qkv = rnd(g, B, N, 3 * Hh * D)
    compare("self_attention", (qkv, Hh, scale), gen=g)


def test_self_attention_noncontiguous():
    g = make_gen("self-nc")
    qkv = rnd(g, 2, 9, 3 * 6 + 5, grad=False)[..., 2 : 2 + 18].requires_grad_()
    compare("self_attention", (qkv, 2), gen=g)


# ------------------------------------------------------------------------------------------
# 3. window_attention
# ------------------------------------------------------------------------------------------
GEOMS = [
    # (B, H, W, heads, D, M)
    (2, 7, 9, 2, 3, 3),
    (1, 7, 9, 3, 2, 4),
    (2, 5, 5, 2, 2, 2),
    (1, 8, 8, 2, 2, 4),  # no padding: qkv_bias gets zero gradient
]
WIN_CASES = []
for _geo in GEOMS:
    _m = _geo[-1]
    for _s in sorted({0, 1, _m // 2, _m - 1}):
        WIN_CASES.append(_geo + (_s,))
WIN_CASES += [
    (2, 3, 5, 2, 2, 1, 0),  # window_size 1
    (1, 6, 5, 2, 2, 7, 3),  # window bigger than the map (all padding)
    (1, 7, 7, 3, 4, 7, 3),  # M = H = W, Swin's last stage shape
    (1, 11, 6, 2, 3, 5, 2),
]


@pytest.mark.parametrize("case", WIN_CASES, ids=str)
@pytest.mark.parametrize("with_table", [False, True], ids=["notable", "table"])
@pytest.mark.parametrize("with_qkv_bias", [False, True], ids=["noqkvb", "qkvb"])
def test_window_attention(case, with_table, with_qkv_bias):
    B, H, W, Hh, D, M, s = case
    g = make_gen("window", case, with_table, with_qkv_bias)
    C = Hh * D
    qkv = rnd(g, B, H * W, 3 * C)
    table = rnd(g, (2 * M - 1) ** 2, Hh) if with_table else None
    qkv_bias = rnd(g, 3 * C) if with_qkv_bias else None
    compare("window_attention", (qkv, (H, W), Hh, M, s, table, qkv_bias), gen=g)


def test_window_attention_kwargs_and_scale():
    g = make_gen("window-kw")
    qkv = rnd(g, 2, 35, 3 * 6)
    table = rnd(g, 25, 2)
    qkv_bias = rnd(g, 18)
    compare(
        "window_attention",
        (qkv, (5, 7), 2, 3),
        dict(shift_size=1, rel_pos_bias_table=table, qkv_bias=qkv_bias, scale=0.7),
        gen=g,
    )
    compare("window_attention", (qkv, [7, 5], 2, 3, 2), dict(qkv_bias=qkv_bias), gen=g)


def test_window_attention_qkv_bias_grad_only_from_padding():
    g = make_gen("window-qkvb")
    qkv_bias = rnd(g, 12)
    out = vitkernels.window_attention(rnd(g, 1, 16, 12), (4, 4), 2, 2, 1, None, qkv_bias)
    (gb,) = torch.autograd.grad(out.sum(), qkv_bias, allow_unused=True, materialize_grads=True)
    assert torch.all(gb == 0)
    out = vitkernels.window_attention(rnd(g, 1, 15, 12), (3, 5), 2, 2, 1, None, qkv_bias)
    (gb,) = torch.autograd.grad(out.sum(), qkv_bias)
    assert gb.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# 4. sr_attention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,N,M,Hh,D,scale", [(2, 63, 4, 2, 3, None), (1, 150, 7, 1, 8, None), (2, 35, 1, 3, 2, None), (1, 20, 9, 5, 2, 0.3)]
)
def test_sr_attention(B, N, M, Hh, D, scale):
    g = make_gen("sr", B, N, M, Hh, D)
    C = Hh * D
    compare("sr_attention", (rnd(g, B, N, C), rnd(g, B, M, 2 * C), Hh, scale), gen=g)


# ------------------------------------------------------------------------------------------
# 5. xca
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,Hh,D", [(2, 11, 3, 4), (1, 1, 2, 3), (2, 37, 4, 5)])
@pytest.mark.parametrize("tshape", ["h11", "h"])
def test_xca(B, N, Hh, D, tshape):
    g = make_gen("xca", B, N, Hh, D, tshape)
    C = Hh * D
    qkv = rnd(g, B, N, 3 * C)
    t = torch.rand(Hh, generator=g, dtype=DT) * 2 + 0.2
    temperature = (t.reshape(Hh, 1, 1) if tshape == "h11" else t).requires_grad_()
    compare("xca", (qkv, Hh, temperature), gen=g)


# ------------------------------------------------------------------------------------------
# 6. space_time_attention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["st", "ts"])
@pytest.mark.parametrize(
    "axis,with_cls", [("time", False), ("space", False), ("space", True)], ids=["time", "space", "space-cls"]
)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("S", [5, 1])
def test_space_time_attention(layout, axis, with_cls, T, S):
    g = make_gen("st", layout, axis, with_cls, T, S)
    B, Hh, D = 2, 2, 3
    C = Hh * D
    qkv = rnd(g, B, S * T, 3 * C)
    cls = rnd(g, B, 3 * C) if with_cls else None
    out = compare("space_time_attention", (qkv, T, Hh, axis, cls, layout), gen=g)
    if with_cls:
        assert isinstance(out, (tuple, list)) and len(out) == 2 and out[1].shape == (B, T, C)
    else:
        assert isinstance(out, torch.Tensor)


def test_space_time_attention_kwargs_scale():
    g = make_gen("st-kw")
    qkv = rnd(g, 1, 12, 3 * 8)
    cls = rnd(g, 1, 3 * 8)
    compare("space_time_attention", (qkv, 4, 2, "space"), dict(cls_qkv=cls, layout="ts", scale=0.3), gen=g)
    compare("space_time_attention", (qkv, 4, 2, "time"), dict(layout="st", scale=0.9), gen=g)


# ------------------------------------------------------------------------------------------
# 7. dwconv
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_dwconv(k, activation, with_bias):
    g = make_gen("dw", k, activation, with_bias)
    B, H, W, C = 2, 5, 7, 3
    x = rnd(g, B, H * W, C)
    weight = rnd(g, C, 1, k, k)
    bias = rnd(g, C) if with_bias else None
    compare("dwconv", (x, (H, W), weight, bias, activation), gen=g)


def test_dwconv_small_maps():
    g = make_gen("dw-small")
    for H, W, k in [(1, 1, 3), (2, 3, 7), (9, 1, 5)]:
        compare("dwconv", (rnd(g, 1, H * W, 4), (H, W), rnd(g, 4, 1, k, k), rnd(g, 4), "gelu"), gen=g)


# ------------------------------------------------------------------------------------------
# 8. mix_ffn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra_relu", [False, True])
@pytest.mark.parametrize("B,H,W,Cin,Hid,Cout", [(2, 5, 3, 4, 6, 5), (1, 7, 9, 3, 8, 3)])
def test_mix_ffn(extra_relu, B, H, W, Cin, Hid, Cout):
    g = make_gen("mix", extra_relu, B, H, W)
    args = (
        rnd(g, B, H * W, Cin),
        (H, W),
        rnd(g, Hid, Cin, scale=0.5),
        rnd(g, Hid),
        rnd(g, Hid, 1, 3, 3),
        rnd(g, Hid),
        rnd(g, Cout, Hid, scale=0.5),
        rnd(g, Cout),
        extra_relu,
    )
    compare("mix_ffn", args, gen=g)


# ------------------------------------------------------------------------------------------
# 9. pool_attention
# ------------------------------------------------------------------------------------------
POOL_CASES = [
    # (B, heads, q_hw, k_hw, D, cls, residual, tables, scale)
    (2, 2, (4, 4), (1, 1), 4, True, True, True, None),  # kv pooled by 4 (MViTv2 stage 1 in miniature)
    (1, 3, (4, 4), (2, 2), 5, False, True, True, None),
    (2, 1, (3, 5), (2, 3), 4, True, False, True, 0.3),  # non-square, non-integer ratios
    (1, 2, (2, 2), (4, 4), 3, False, False, True, None),  # k bigger than q (a stage's first block)
    (2, 2, (5, 3), (5, 3), 4, True, True, True, None),  # equal maps
    (1, 2, (1, 1), (3, 2), 4, True, True, True, None),  # a single spatial query
    (2, 2, (3, 4), (2, 2), 4, True, True, False, None),  # no tables
    (1, 1, (2, 3), (4, 3), 6, False, True, False, 1.1),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pool_attention(case):
    B, Hh, q_hw, k_hw, D, cls, residual, tables, scale = case
    g = make_gen("pool", case)
    sp = 1 if cls else 0
    q = rnd(g, B, Hh, q_hw[0] * q_hw[1] + sp, D)
    k, v = (rnd(g, B, Hh, k_hw[0] * k_hw[1] + sp, D) for _ in range(2))
    th = rnd(g, 2 * max(q_hw[0], k_hw[0]) - 1, D) if tables else None
    tw = rnd(g, 2 * max(q_hw[1], k_hw[1]) - 1 + 2, D) if tables else None  # longer than needed is fine
    compare("pool_attention", (q, k, v, q_hw, k_hw, th, tw, cls, residual, scale), gen=g)


def test_pool_attention_noncontiguous_and_kwargs():
    """q / k / v as slices of a packed (3, B, heads, N, D) qkv permute (timm's layout), tables as
    column slices; keyword arguments."""
    g = make_gen("pool-nc")
    B, Hh, D, N = 2, 2, 4, 13
    qkv = rnd(g, B, N, 3, Hh, D, grad=False).permute(2, 0, 3, 1, 4)
    q, k, v = (qkv[i].requires_grad_() for i in range(3))
    th = rnd(g, 5, 2 * D, grad=False)[:, ::2].requires_grad_()
    tw = rnd(g, 7, D + 3, grad=False)[:, 1 : D + 1].requires_grad_()
    compare("pool_attention", (q, k, v, (3, 4), (3, 4)), dict(rel_pos_h=th, rel_pos_w=tw, scale=0.4), gen=g)


def test_pool_attention_empty_batch():
    g = make_gen("pool-empty")
    _check_empty(
        "pool_attention",
        (rnd(g, 0, 2, 13, 4), rnd(g, 0, 2, 5, 4), rnd(g, 0, 2, 5, 4), (3, 4), (2, 2), rnd(g, 5, 4), rnd(g, 7, 4)),
        (0, 13, 8),
    )


# ------------------------------------------------------------------------------------------
# empty batch
# ------------------------------------------------------------------------------------------
def _check_empty(name, args, want_shape):
    out = getattr(vitkernels, name)(*args)
    outs = _as_tuple(out)
    assert outs[0].shape == want_shape, f"{name}: B=0 output shape {tuple(outs[0].shape)}, want {want_shape}"
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(
        outs, inputs, [torch.zeros_like(o) for o in outs], allow_unused=True, materialize_grads=True
    )
    for gr, x in zip(grads, inputs):
        assert gr.shape == x.shape and torch.all(gr == 0)


def test_empty_batch():
    g = make_gen("empty")
    _check_empty(
        "attention", (rnd(g, 0, 2, 5, 4), rnd(g, 0, 2, 7, 4), rnd(g, 0, 2, 7, 4), rnd(g, 1, 1, 5, 7)), (0, 2, 5, 4)
    )
    _check_empty("self_attention", (rnd(g, 0, 7, 18), 3), (0, 7, 6))
    _check_empty("window_attention", (rnd(g, 0, 35, 12), (5, 7), 2, 3, 1, rnd(g, 25, 2), rnd(g, 12)), (0, 35, 4))
    _check_empty("sr_attention", (rnd(g, 0, 20, 6), rnd(g, 0, 4, 12), 2), (0, 20, 6))
    _check_empty("xca", (rnd(g, 0, 9, 12), 2, rnd(g, 2, 1, 1)), (0, 9, 4))
    _check_empty("dwconv", (rnd(g, 0, 15, 3), (3, 5), rnd(g, 3, 1, 3, 3), rnd(g, 3), "gelu"), (0, 15, 3))
    _check_empty("space_time_attention", (rnd(g, 0, 6, 12), 3, 2, "time"), (0, 6, 4))
