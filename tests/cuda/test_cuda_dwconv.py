"""GPU tests of the compiled CUDA dwconv forward (`torch.ops.vitkernels_C.dwconv_fwd`, and the op's
"cuda" backend).

Pass rule (tests/helpers.py): error vs the float64 CPU oracle (tests/oracles.py) <= 2 x the error of
the same-precision eager composition (transpose → F.conv2d(groups=C) → activation) on the GPU + a
small floor. Skipped without a CUDA GPU (conftest) or when the extension cannot be built/loaded (set
VITKERNELS_REQUIRE_CUDA_EXT=1 to make that a failure).
"""

import pytest
import torch

import vitkernels as vk

import oracles
from helpers import assert_within, eager_dwconv

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACT_CODE = {None: 0, "gelu": 1, "relu": 2}


def make(b, h, w, c, k, with_bias, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, c, generator=g)
    wt = torch.randn(c, 1, k, k, generator=g) / k
    bias = torch.randn(c, generator=g) if with_bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(wt), cast(bias)


def check(ops, x, hw, wt, bias, activation, dtype, name):
    out = ops.dwconv_fwd(x, list(hw), wt, bias, ACT_CODE[activation])
    ops.sync()
    assert out.shape == (x.shape[0], hw[0] * hw[1], wt.shape[0])
    assert out.dtype == dtype and out.is_contiguous() and out.device == x.device
    want = oracles.dwconv(
        x.double().cpu(), hw, wt.double().cpu(), None if bias is None else bias.double().cpu(), activation
    )
    assert_within(name, out, eager_dwconv(x, hw, wt, bias, activation), want, dtype)
    return out


CASES = [  # B, H, W, C, k, activation, bias
    (2, 5, 7, 64, 3, "gelu", True),
    (1, 5, 7, 24, 3, None, False),
    (2, 3, 9, 40, 3, "relu", True),
    (1, 16, 16, 24, 3, "gelu", False),
    (1, 1, 1, 16, 3, "gelu", True),
    (2, 17, 19, 72, 3, "gelu", True),  # odd H×W, ragged tiles, C % 64 != 0
    (2, 9, 11, 6, 3, "relu", True),  # C not a multiple of 8 → scalar path
    (1, 13, 7, 13, 3, None, True),  # odd C
    (2, 3, 9, 6, 1, "relu", False),
    (1, 5, 7, 24, 1, "gelu", True),
    (1, 5, 7, 8, 5, None, True),
    (2, 11, 13, 24, 5, "gelu", True),
    (1, 5, 7, 40, 7, "relu", True),
    (1, 1, 1, 24, 7, None, False),
    (1, 15, 17, 36, 7, "gelu", False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "B{}_{}x{}_C{}_k{}_{}_{}".format(c[0], c[1], c[2], c[3], c[4], c[5], "bias" if c[6] else "nobias"),
)
def test_dwconv_fwd(ops, dtype, case):
    b, h, w, c, k, act, with_bias = case
    x, wt, bias = make(b, h, w, c, k, with_bias, dtype, ops.device)
    check(ops, x, (h, w), wt, bias, act, dtype, f"cuda dwconv {case} {dtype}")


REAL_SHAPES = [  # B, H, W, C (k = 3, Mix-FFN hidden features)
    (2, 128, 128, 256),  # SegFormer-B2 stage 1 at 512 px
    (2, 56, 56, 512),  # PVTv2-b2 stage 1 at 224 px
    (2, 28, 28, 1024),  # PVTv2-b2 stage 2 at 224 px
    (2, 14, 14, 1280),  # PVTv2-b2 stage 3 at 224 px (mlp_ratio 4, dim 320)
    (2, 7, 7, 2048),  # PVTv2-b2 stage 4 at 224 px (mlp_ratio 4, dim 512)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
@pytest.mark.parametrize("activation", ["gelu", None])
def test_dwconv_fwd_real_shapes(ops, dtype, shape, activation):
    b, h, w, c = shape
    x, wt, bias = make(b, h, w, c, 3, True, dtype, ops.device)
    check(ops, x, (h, w), wt, bias, activation, dtype, f"cuda dwconv {shape} {dtype} {activation}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_inputs(ops, dtype):
    """A channel slice of a wider tensor (token stride != C, read in place: vector path when
    aligned, scalar when not) and a transposed view (channel stride != 1, copied) match the
    contiguous result exactly."""
    h, w, c = 9, 10, 64
    _, wt, bias = make(1, h, w, c, 3, True, dtype, ops.device)
    base = torch.randn(2, h * w, c + 24, device=ops.device, dtype=dtype)
    views = [
        base[..., 8 : 8 + c],
        base[..., 3 : 3 + c],
        torch.randn(2, c, h * w, device=ops.device, dtype=dtype).transpose(1, 2),
    ]
    for x in views:
        got = ops.dwconv_fwd(x, [h, w], wt, bias, 1)
        want = ops.dwconv_fwd(x.contiguous(), [h, w], wt, bias, 1)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_output_not_poisoned(ops):
    x, wt, bias = make(2, 13, 11, 72, 3, True, torch.float16, ops.device)
    for _ in range(2):
        filler = torch.full((1 << 20,), float("nan"), device=ops.device, dtype=torch.float16)
        del filler
        assert torch.isfinite(ops.dwconv_fwd(x, [13, 11], wt, bias, 2)).all()


def test_empty_batch(ops):
    x, wt, bias = make(0, 3, 5, 8, 3, True, torch.float16, ops.device)
    out = ops.dwconv_fwd(x, [3, 5], wt, bias, 1)
    assert out.shape == (0, 15, 8)


def test_bad_inputs(ops):
    x, wt, bias = make(1, 3, 5, 8, 3, True, torch.float16, ops.device)
    with pytest.raises(RuntimeError, match="hw = \\(3, 4\\)"):
        ops.dwconv_fwd(x, [3, 4], wt, bias, 0)
    with pytest.raises(RuntimeError, match="k = 9 is not supported"):
        ops.dwconv_fwd(x, [3, 5], torch.randn(8, 1, 9, 9, device=ops.device, dtype=torch.float16), None, 0)
    with pytest.raises(RuntimeError, match="activation must be"):
        ops.dwconv_fwd(x, [3, 5], wt, bias, 3)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.dwconv_fwd(x, [3, 5], wt.float(), bias, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backend_through_op(ops, cuda_backend, dtype):
    """vk.dwconv on the forced "cuda" backend: forward from csrc, grads from the "auto" backward."""
    b, h, w, c = 2, 9, 7, 24
    x, wt, bias = make(b, h, w, c, 3, True, dtype, cuda_backend)
    x.requires_grad_()
    with vk.use_backend("cuda"):
        out = vk.dwconv(x, (h, w), wt, bias, "gelu")
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    want = ops.dwconv_fwd(x.detach(), [h, w], wt, bias, 1)
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    with vk.use_backend("reference"):
        xr = x.detach().requires_grad_()
        ref = vk.dwconv(xr, (h, w), wt, bias, "gelu")
        (dx_ref,) = torch.autograd.grad(ref, xr, torch.ones_like(ref))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(dx, dx_ref, atol=tol, rtol=tol)


def test_k_not_built_is_reported(cuda_backend):
    from vitkernels import backends

    x = torch.randn(1, 12, 4, device=cuda_backend)
    reasons = backends.not_supported_reasons(
        "dwconv", "cuda", x, (3, 4), torch.randn(4, 1, 9, 9, device=cuda_backend), None, None
    )
    assert any("k = 9" in r for r in reasons)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,c", [(3, 72), (7, 13)])
def test_reverse_thread_order(ops, reverse_thread_order, dtype, k, c):
    x, wt, bias = make(2, 17, 19, c, k, True, dtype, ops.device)
    check(ops, x, (17, 19), wt, bias, "gelu", dtype, f"reverse order k={k} C={c} {dtype}")


def test_supports_query(ops):
    """dwconv_supports(kernel_size, dtype=None, device=None): the query shape every CUDA op shares."""
    for k in (1, 3, 5, 7):
        assert ops.dwconv_supports(k) and ops.dwconv_supports(k, torch.bfloat16, torch.device(ops.device))
    for k in (0, 2, 9, -3):
        assert not ops.dwconv_supports(k)
    assert not ops.dwconv_supports(3, torch.float64)
