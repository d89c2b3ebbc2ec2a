"""dwconv (and mix_ffn, its composite) through the op layer on the "triton" backend.

CPU: the Triton kernels run in the interpreter (float32, float16); GPU (marked gpu): float16,
bfloat16, float32 at real model shapes. Oracle: tests/oracles.py (explicit pad-and-shift sum,
independent of the package) in float64. Eager: the timm/SegFormer composition in the tested dtype
(transpose → F.conv2d(groups=C) → activation → transpose). Rule: helpers.assert_within, applied
to the output and to the grads of x, weight and bias.
"""

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk

import oracles
from helpers import assert_within, eager_dwconv, grads

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def check(hw, inputs, activation, backend, dtype, device):
    """Output and grads of every input on `backend` vs the float64 oracle, bounded by eager's error."""

    def with_op(x, w, b=None):
        return vk.dwconv(x, hw, w, b, activation)

    def with_oracle(x, w, b=None):
        return oracles.dwconv(x, hw, w, b, activation)

    def with_eager(x, w, b=None):
        return eager_dwconv(x, hw, w, b, activation)

    low = [t.to(device=device, dtype=dtype) for t in inputs]
    cot = torch.randn(inputs[0].shape, dtype=torch.float64)
    oracle = grads(with_oracle, [t.double() for t in inputs], cot)
    with vk.use_backend(backend):
        fused = grads(with_op, low, cot)
    eager = grads(with_eager, low, cot)
    names = ["out", "dx", "dweight", "dbias"]
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype} != {dtype}"
        assert_within(f"dwconv {backend} {dtype} {name}", f, e, o, dtype)


def backends_here():
    if torch.cuda.is_available():
        return [
            pytest.param("triton", dt, "cuda", marks=pytest.mark.gpu)
            for dt in (torch.float16, torch.bfloat16, torch.float32)
        ]
    return [("triton", torch.float32, "cpu"), ("triton", torch.float16, "cpu")]


CASES = [  # B, H, W, C, k, activation, bias
    (2, 5, 7, 6, 3, "gelu", True),
    (1, 5, 7, 24, 3, None, False),
    (2, 3, 9, 40, 3, "relu", True),
    (1, 16, 16, 24, 3, "gelu", False),
    (1, 1, 1, 6, 3, "gelu", True),
    (2, 3, 9, 6, 1, "relu", False),
    (1, 5, 7, 24, 1, "gelu", True),
    (1, 5, 7, 6, 5, None, True),
    (2, 3, 9, 24, 5, "gelu", True),
    (1, 5, 7, 40, 7, "relu", True),
    (1, 1, 1, 24, 7, None, False),
    (1, 3, 9, 6, 7, "gelu", False),
]


@pytest.fixture(params=["auto", "v1"], ids=["v2", "v1"])
def kernel_version(request, monkeypatch):
    """The Triton backward of VITKERNELS_DWCONV_KERNEL: v2 (auto) and the v1 kernels kept beside it."""
    monkeypatch.setenv("VITKERNELS_DWCONV_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "B{}_{}x{}_C{}_k{}_{}_{}".format(c[0], c[1], c[2], c[3], c[4], c[5], "bias" if c[6] else "nobias"),
)
def test_dwconv(backend, dtype, device, case):
    b, h, w, c, k, act, with_bias = case
    inputs = [torch.randn(b, h * w, c), torch.randn(c, 1, k, k) * (1.0 / k)]
    if with_bias:
        inputs.append(torch.randn(c))
    check((h, w), inputs, act, backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_non_contiguous_inputs(backend, dtype, device):
    """A channel slice of a wider tensor (token stride ≠ C) and a transposed view (channel stride ≠ 1)
    give the same output and grads as contiguous copies."""
    h, w, c = 5, 7, 24
    wt = torch.randn(c, 1, 3, 3, device=device, dtype=dtype)
    bias = torch.randn(c, device=device, dtype=dtype)
    wide = torch.randn(2, h * w, c + 10, device=device, dtype=dtype)[..., 3 : 3 + c]
    trans = torch.randn(2, c, h * w, device=device, dtype=dtype).transpose(1, 2)
    assert wide.stride(1) != c and trans.stride(-1) != 1
    for x in (wide, trans):
        leaf = x.detach().requires_grad_()
        with vk.use_backend(backend):
            got = vk.dwconv(leaf, (h, w), wt, bias, "gelu")
            (dx,) = torch.autograd.grad(got, leaf, torch.ones_like(got))
        xc = x.contiguous().requires_grad_()
        with vk.use_backend("reference"):
            want = vk.dwconv(xc, (h, w), wt, bias, "gelu")
            (dx_want,) = torch.autograd.grad(want, xc, torch.ones_like(want))
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(dx, dx_want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_empty_batch(backend, dtype, device):
    x = torch.randn(0, 15, 6, device=device, dtype=dtype, requires_grad=True)
    wt = torch.randn(6, 1, 3, 3, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    with vk.use_backend(backend):
        out = vk.dwconv(x, (3, 5), wt, bias, "gelu")
        out.sum().backward()
    assert out.shape == (0, 15, 6)
    assert x.grad.shape == x.shape
    assert (wt.grad == 0).all() and (bias.grad == 0).all()


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_int64_offsets_path(backend, dtype, device, monkeypatch):
    """The WIDE (int64 in-image offsets) variant, forced at a small shape, matches the default one."""
    from vitkernels.triton import dwconv as tk

    x = torch.randn(2, 15, 6, device=device, dtype=dtype)
    wt = torch.randn(6, 1, 3, 3, device=device, dtype=dtype)
    bias = torch.randn(6, device=device, dtype=dtype)
    dy = torch.randn(2, 15, 6, device=device, dtype=dtype)
    normal = [tk.dwconv_forward(x, (3, 5), wt, bias, "gelu"), *tk.dwconv_backward(dy, x, (3, 5), wt, bias, "gelu")]
    monkeypatch.setattr(tk, "_INT32_MAX", 0)
    wide = [tk.dwconv_forward(x, (3, 5), wt, bias, "gelu"), *tk.dwconv_backward(dy, x, (3, 5), wt, bias, "gelu")]
    for a, b in zip(normal, wide):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_output_not_poisoned(backend, dtype, device):
    x = torch.randn(1, 35, 40, device=device, dtype=dtype)
    wt = torch.randn(40, 1, 3, 3, device=device, dtype=dtype)
    with vk.use_backend(backend):
        for _ in range(2):
            filler = torch.full((1 << 16,), float("nan"), device=device, dtype=dtype)
            del filler
            assert torch.isfinite(vk.dwconv(x, (5, 7), wt, None, "relu")).all()


@pytest.mark.parametrize("backend,dtype,device", backends_here()[-1:])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[8]], ids=["gelu", "none", "k5"])
def test_dwconv_v1_kernels(backend, dtype, device, case, monkeypatch):
    """The v1 backward kept beside v2 for A/B runs (VITKERNELS_DWCONV_KERNEL=v1) stays correct."""
    monkeypatch.setenv("VITKERNELS_DWCONV_KERNEL", "v1")
    test_dwconv(backend, dtype, device, case)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[-1:])
@pytest.mark.parametrize(
    "k,act,tile",
    [
        (3, "gelu", (1, 8, 32, 3, 4)),
        (7, None, (1, 4, 32, 4, 8)),
    ],
)
def test_v2_backward_gpu_tiles(backend, dtype, device, k, act, tile, monkeypatch):
    """The v2 backward at the GPU's one-row sub-tiles and bands (not the interpreter's 2-row tile), with ragged
    bands, column strips and channel blocks, vs the float64 oracle under the 2× rule."""
    from vitkernels.triton import dwconv as tk

    monkeypatch.setattr(tk, "_bwd_v2_tile", lambda *a: tile)
    inputs = [torch.randn(1, 7 * 13, 40), torch.randn(40, 1, k, k) / k, torch.randn(40)]
    check((7, 13), inputs, act, backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize("act", ["gelu", None])
def test_backward_kernels_and_dz_dtype(backend, dtype, device, act, kernel_version, monkeypatch):
    """v2 hands dz to the dx conv in x's dtype (v1 in fp32), and with no activation writes dx in its reduce
    kernel (no conv launch); both are bitwise reproducible."""
    from vitkernels.triton import dwconv as tk

    convs = []
    real = tk._launch_conv
    monkeypatch.setattr(tk, "_launch_conv", lambda src, *a: convs.append(src.dtype) or real(src, *a))
    x, dy = torch.randn(2, 35, 24, device=device, dtype=dtype), torch.randn(2, 35, 24, device=device, dtype=dtype)
    wt, bias = torch.randn(24, 1, 3, 3, device=device, dtype=dtype), torch.randn(24, device=device, dtype=dtype)
    first = tk.dwconv_backward(dy, x, (5, 7), wt, bias, act)
    v2 = kernel_version == "auto"
    if act is None:
        assert convs == ([] if v2 else [dtype])
    else:
        assert convs == [dtype if v2 else torch.float32]
    for a, b in zip(first, tk.dwconv_backward(dy, x, (5, 7), wt, bias, act)):
        assert torch.equal(a, b)


def test_bad_kernel_switch(monkeypatch):
    from vitkernels.triton import dwconv as tk

    monkeypatch.setenv("VITKERNELS_DWCONV_KERNEL", "v3")
    with pytest.raises(ValueError, match="VITKERNELS_DWCONV_KERNEL"):
        tk.kernel_version()


def test_triton_backend_is_registered():
    from vitkernels import backends

    assert "triton" in backends._KERNELS["dwconv"]


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize("extra_relu", [False, True])
def test_mix_ffn(backend, dtype, device, extra_relu):
    b, h, w, c, hid = 2, 5, 7, 8, 24
    inputs = [
        torch.randn(b, h * w, c),
        torch.randn(hid, c) * c**-0.5,
        torch.randn(hid) * 0.1,
        torch.randn(hid, 1, 3, 3) / 3,
        torch.randn(hid) * 0.1,
        torch.randn(c, hid) * hid**-0.5,
        torch.randn(c) * 0.1,
    ]

    def with_op(x, w1, b1, dw, db, w2, b2):
        return vk.mix_ffn(x, (h, w), w1, b1, dw, db, w2, b2, extra_relu)

    def with_oracle(*a):
        return oracles.mix_ffn(a[0], (h, w), *a[1:], extra_relu)

    def with_eager(x, w1, b1, dw, db, w2, b2):
        y = F.linear(x, w1, b1)
        if extra_relu:
            y = F.relu(y)
        return F.linear(eager_dwconv(y, (h, w), dw, db, "gelu"), w2, b2)

    low = [t.to(device=device, dtype=dtype) for t in inputs]
    cot = torch.randn(b, h * w, c, dtype=torch.float64)
    oracle = grads(with_oracle, [t.double() for t in inputs], cot)
    with vk.use_backend(backend):
        fused = grads(with_op, low, cot)
    eager = grads(with_eager, low, cot)
    names = ["out", "dx", "dfc1_w", "dfc1_b", "ddw_w", "ddw_b", "dfc2_w", "dfc2_b"]
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert_within(f"mix_ffn {backend} {dtype} {name}", f, e, o, dtype)


REAL_SHAPES = [  # B, H, W, C from real models (k = 3, Mix-FFN hidden features)
    (2, 128, 128, 256),  # SegFormer-B2 stage 1 at 512 px
    (2, 56, 56, 512),  # PVTv2-b2 stage 1 at 224 px
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
@pytest.mark.parametrize("activation", ["gelu", None])
def test_dwconv_real_shapes_gpu(dtype, shape, activation):
    b, h, w, c = shape
    inputs = [torch.randn(b, h * w, c), torch.randn(c, 1, 3, 3) / 3, torch.randn(c)]
    check((h, w), inputs, activation, "triton", dtype, "cuda")
