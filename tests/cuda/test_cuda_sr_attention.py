"""GPU tests of the compiled CUDA sr_attention forward, `torch.ops.vitkernels_C.sr_attention_fwd`,
and of the "cuda" backend of vk.sr_attention.

Pass rule (tests/helpers.py): error vs the float64 reference ≤ 2 × the error of the same-precision
eager composition on the GPU + a small floor. Skipped without a CUDA GPU (conftest) or when the
extension cannot be built/loaded (VITKERNELS_REQUIRE_CUDA_EXT=1 makes that a failure).
"""

import pytest
import torch

import vitkernels as vk
from vitkernels import reference as ref

from helpers import assert_within

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # B, N, M, C, heads
    (4, 3136, 49, 64, 1),  # PVTv2-b2 stage 1 at 224
    (4, 784, 49, 128, 2),  # PVTv2-b2 stage 2
    (4, 196, 49, 320, 5),  # PVTv2-b2 stage 3
    (2, 16384, 256, 32, 1),  # SegFormer-B0 stage 1 at 512 (M = 256: four resident key blocks)
    (2, 4096, 256, 64, 2),  # SegFormer stage 2 at 512
    (2, 77, 13, 48, 1),  # ragged N, M < 64, D = 48 (padded head dim)
    (1, 200, 130, 256, 2),  # M = 130 (three key blocks, ragged), D = 128
    (3, 1, 1, 64, 8),  # one query, one key, D = 8
]


def check(ops, shape, dtype):
    b, n, m, c, heads = shape
    q = torch.randn(b, n, c, device=ops.device, dtype=dtype)
    kv = torch.randn(b, m, 2 * c, device=ops.device, dtype=dtype)
    scale = (c // heads) ** -0.5
    out, lse = ops.sr_attention_fwd(q, kv, heads, scale)
    ops.sync()
    assert out.shape == (b, n, c) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, heads, n) and lse.dtype == torch.float32
    want, want_lse = ref.sr_attention_with_lse(q.double().cpu(), kv.double().cpu(), heads, scale)
    eager = ref.sr_attention(q, kv, heads, scale)
    assert_within(f"sr_attention_fwd {shape} {dtype}", out, eager, want, dtype)
    torch.testing.assert_close(lse.double().cpu(), want_lse.double(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_M{}_C{}_h{}".format(*s))
def test_sr_attention_fwd_matches_reference(ops, shape, dtype):
    check(ops, shape, dtype)


def test_strided_inputs(ops):
    """q sliced out of a wider buffer and kv as a slice: read in place or copied, same result."""
    b, n, m, c, heads = 2, 300, 49, 64, 2
    q_wide = torch.randn(b, n, c + 64, device=ops.device, dtype=torch.bfloat16)
    kv_wide = torch.randn(b, m, 2 * c + 8, device=ops.device, dtype=torch.bfloat16)
    q, kv = q_wide[..., 64:], kv_wide[..., 8:]  # kv base 16-byte aligned, q base too
    out, _ = ops.sr_attention_fwd(q, kv, heads, 0.125)
    want, _ = ops.sr_attention_fwd(q.contiguous(), kv.contiguous(), heads, 0.125)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    odd = kv_wide[..., 1 : 2 * c + 1]  # misaligned base: the glue copies
    out2, _ = ops.sr_attention_fwd(q, odd, heads, 0.125)
    want2, _ = ops.sr_attention_fwd(q.contiguous(), odd.contiguous(), heads, 0.125)
    torch.testing.assert_close(out2, want2, atol=0, rtol=0)


def test_unsupported_sizes_are_refused(ops):
    q = torch.randn(1, 8, 64, device=ops.device, dtype=torch.float16)
    assert not ops.sr_attention_supports(257, 64, torch.float16)
    assert not ops.sr_attention_supports(49, 12, torch.float16)
    assert ops.sr_attention_supports(49, 64, torch.bfloat16)
    # the shared query shape: (m, head_dim, dtype=None, device=None); None = every dtype
    assert ops.sr_attention_supports(49, 64) and ops.sr_attention_supports(49, 64, None, torch.device(ops.device))
    assert not ops.sr_attention_supports(49, 64, torch.float64) and not ops.sr_attention_supports(0, 64)
    with pytest.raises(RuntimeError, match="not supported"):
        ops.sr_attention_fwd(q, torch.randn(1, 300, 128, device=ops.device, dtype=torch.float16), 1, 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_backend_through_the_op(cuda_backend, dtype):
    """vk.sr_attention on the forced "cuda" backend: forward from the CUDA kernel, backward via auto."""
    b, n, m, c, heads = 2, 3136, 49, 64, 1
    q = torch.randn(b, n, c, device=cuda_backend, dtype=dtype, requires_grad=True)
    kv = torch.randn(b, m, 2 * c, device=cuda_backend, dtype=dtype, requires_grad=True)
    with vk.use_backend("cuda"):
        out = vk.sr_attention(q, kv, heads)
        out.float().square().sum().backward()
    with vk.use_backend("triton" if q.is_cuda else "reference"):
        want = vk.sr_attention(q.detach(), kv.detach(), heads)
    torch.testing.assert_close(out.detach(), want, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all()


@pytest.mark.parametrize("sm_count", [1, 7, 1000])
def test_rows_per_cta_follow_the_sm_count(ops, monkeypatch, sm_count):
    """The launcher sizes each CTA's run of query tiles from the SM count (about 4 CTAs per SM):
    one SM gives every CTA many tiles (the double-buffered loop), 1000 SMs one tile each. The
    emulator's device reports VKEMU_SM_COUNT SMs; on a GPU the real count is the only case."""
    if not ops.emulated:
        pytest.skip("the SM count is the device's own on a GPU")
    monkeypatch.setenv("VKEMU_SM_COUNT", str(sm_count))
    check(ops, (2, 1000, 49, 64, 2), torch.bfloat16)


def test_shared_memory_limit_of_the_device(ops, monkeypatch):
    """K/V (M rounded up to 64 keys) and two 64-row Q tiles must fit the device's opt-in shared
    memory: at M = 256, D = 128 that is 174,080 bytes, which fits an H100 (227 KiB) and not an
    A100 (163 KiB), where the op is refused with the sizes in the message."""
    if not ops.emulated:
        pytest.skip("the limit is the device's own on a GPU")
    shape = (1, 300, 256, 256, 2)
    monkeypatch.setenv("VKEMU_SMEM_OPTIN", str(227 * 1024))
    assert ops.sr_attention_supports(256, 128, torch.float16)
    check(ops, shape, torch.float16)
    monkeypatch.setenv("VKEMU_SMEM_OPTIN", str(163 * 1024))
    assert not ops.sr_attention_supports(256, 128, torch.float16)
    assert not ops.sr_attention_supports(256, 128)  # every dtype: the 16-bit kernels do not fit
    assert ops.sr_attention_supports(256, 128, torch.float32)  # float32 streams the keys
    assert ops.sr_attention_supports(256, 64, torch.float16)  # 92,160 bytes
    q = torch.randn(1, 300, 256, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"174080 bytes; this device allows 166912"):
        ops.sr_attention_fwd(q, torch.randn(1, 256, 512, dtype=torch.float16), 2, 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, monkeypatch, dtype):
    monkeypatch.setenv("VKEMU_SM_COUNT", "1")  # many query tiles per CTA: the double buffer
    check(ops, (1, 1000, 130, 128, 2), dtype)
