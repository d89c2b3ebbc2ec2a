"""GPU tests of the compiled CUDA window-attention forward,
`torch.ops.vitkernels_C.window_attention_fwd`, and of the "cuda" backend of vk.window_attention.

Pass rule (tests/tolerance.py): error vs the float64 CPU reference <= 2 x the error of the
same-precision eager reference composition on the GPU + a small floor. Skipped without a CUDA GPU
(conftest) or when the extension cannot be built/loaded (VITKERNELS_REQUIRE_CUDA_EXT=1 makes that a
failure).
"""

import pytest
import torch
from tolerance import assert_within

import vitkernels as vk
from vitkernels import reference as ref

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, H, W, C, heads, M, s)
SHAPES = [
    (2, 56, 56, 96, 3, 7, 3),      # Swin-T stage 1 (D = 32), shifted
    (2, 28, 28, 192, 6, 7, 0),     # Swin-T stage 2
    (2, 14, 14, 384, 12, 7, 3),    # Swin-T stage 3
    (2, 7, 7, 768, 24, 7, 0),      # Swin-T stage 4 (one window)
    (1, 96, 96, 128, 4, 12, 6),    # Swin-B 384 stage 1 (M = 12, N = 144)
    (1, 12, 12, 1024, 32, 12, 0),  # Swin-B 384 stage 4
    (2, 50, 38, 96, 3, 7, 3),      # odd map: padding + shift
    (1, 13, 9, 64, 1, 5, 2),       # odd map, D = 64, N = 25
    (1, 17, 20, 128, 1, 16, 7),    # M = 16 (N = 256), D = 128, padding + shift
    (1, 9, 11, 120, 3, 4, 1),      # D = 40 (padded head dim), N = 16
]


def make(b, h, w, c, heads, m, table, qkv_bias, dtype, device):
    qkv = torch.randn(b, h * w, 3 * c, device=device, dtype=dtype)
    tab = torch.randn((2 * m - 1) ** 2, heads, device=device, dtype=dtype) if table else None
    bias = torch.randn(3 * c, device=device, dtype=dtype) if qkv_bias else None
    return qkv, tab, bias


def check(ops, shape, dtype, table=True, qkv_bias=True, scale=None):
    b, h, w, c, heads, m, s = shape
    qkv, tab, bias = make(b, h, w, c, heads, m, table, qkv_bias, dtype, ops.device)
    scale = (c // heads) ** -0.5 if scale is None else scale
    out = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, scale)
    ops.sync()
    assert out.shape == (b, h * w, c) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    d64 = [None if t is None else t.double().cpu() for t in (qkv, tab, bias)]
    want = ref.window_attention(d64[0], (h, w), heads, m, s, d64[1], d64[2], scale)
    eager = ref.window_attention(qkv, (h, w), heads, m, s, tab, bias, scale)
    assert_within(f"window_attention_fwd {shape} {dtype} table={table} bias={qkv_bias}", out, eager, want, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c))
def test_window_attention_fwd_matches_reference(ops, shape, dtype):
    check(ops, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(2, 50, 38, 96, 3, 7, 3), (1, 30, 30, 64, 2, 12, 5)],
                         ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c))
def test_optional_table_and_bias(ops, shape, dtype, table, qkv_bias):
    check(ops, shape, dtype, table=table, qkv_bias=qkv_bias)


@pytest.mark.gpu
def test_many_windows(ops):
    """B·nW·heads = 1040·64·1 = 66,560 > 65,535 CTAs on the 1-D grid (checked on a few batches)."""
    b, h, w, c, heads, m, s = 1040, 56, 56, 32, 1, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.bfloat16, ops.device)
    out = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 32 ** -0.5)
    ops.sync()
    for i in (0, 517, b - 1):
        want = ref.window_attention(qkv[i:i + 1].float(), (h, w), heads, m, s, tab.float(), bias.float(), 32 ** -0.5)
        assert (out[i:i + 1].float() - want).abs().max().item() <= 3e-2 * max(1.0, want.abs().max().item())


def test_many_small_windows(ops):
    """257·256 = 65,792 > 65,535 windows of 2×2 (513×511 padded, shifted, with table and qkv_bias), one
    CTA each: cheap enough for the emulator, so CPU CI covers the 1-D grid's index math past 16 bits."""
    b, h, w, c, heads, m, s = 1, 513, 511, 8, 1, 2, 1
    assert b * (-(-h // m)) * (-(-w // m)) * heads > 65535
    check(ops, (b, h, w, c, heads, m, s), torch.float16, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_qkv(ops, dtype):
    b, h, w, c, heads, m, s = 2, 21, 19, 96, 3, 7, 3
    big = torch.randn(b, h * w, 4 * c, device=ops.device, dtype=dtype)
    qkv = big[..., c:]  # token stride 4C, 16-byte aligned: read in place
    tab = torch.randn(2 * ((2 * m - 1) ** 2), heads, device=ops.device, dtype=dtype)[::2]  # strided table
    bias = torch.randn(3 * c, device=ops.device, dtype=dtype)
    out = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2)
    want = ref.window_attention(qkv.contiguous(), (h, w), heads, m, s, tab.contiguous(), bias, 0.2)
    ops.sync()
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    assert (out.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def test_supports_query(ops):
    assert ops.window_attention_supports(7, 32) and ops.window_attention_supports(16, 128)
    assert not ops.window_attention_supports(17, 32)
    assert not ops.window_attention_supports(7, 36) and not ops.window_attention_supports(7, 136)


def test_unsupported_window_raises(ops):
    qkv = torch.randn(1, 17 * 17, 96, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not supported"):
        ops.window_attention_fwd(qkv, [17, 17], 1, 17, 0, None, None, 0.2)


def test_cuda_backend_forward_and_auto_backward(cuda_backend):
    b, h, w, c, heads, m, s = 2, 14, 14, 96, 3, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.float16, cuda_backend)
    leaves = [t.detach().requires_grad_() for t in (qkv, tab, bias)]
    with vk.use_backend("cuda"):
        out = vk.window_attention(leaves[0], (h, w), heads, m, s, leaves[1], leaves[2])
    out.float().square().sum().backward()  # backward runs on the "auto" choice
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    want = ref.window_attention(qkv.float(), (h, w), heads, m, s, tab.float(), bias.float(), (c // heads) ** -0.5)
    assert (out.float() - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, dtype):
    check(ops, (2, 50, 38, 96, 3, 7, 3), dtype)
    check(ops, (1, 30, 30, 64, 2, 12, 5), dtype)
