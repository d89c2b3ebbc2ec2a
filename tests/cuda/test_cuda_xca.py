"""Tests of the CUDA C++ XCiT cross-covariance attention forward, `torch.ops.vitkernels_C.xca_fwd`:
on a GPU the compiled extension, without one the same csrc/ under the vkemu CPU emulator (the `ops`
fixture, tests/conftest.py). The emulated device's SM count (VKEMU_SM_COUNT) decides between one
CTA per head and heads split in token chunks joined by a workspace, so both paths run here.

Pass rule (tests/helpers.py): error vs the float64 CPU oracle <= 2 x the error of the same-precision
eager composition + a small floor.
"""

import pytest
import torch

from vitkernels.reference import xca as reference_xca

from helpers import assert_within

pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, N, heads, D): XCiT-T/S (D = 48) at 224 px and odd token counts; every padded head dim.
SHAPES = [
    (2, 196, 8, 48),
    (1, 1, 1, 32),
    (2, 50, 4, 64),
    (3, 65, 2, 40),
    (1, 197, 3, 16),
    (1, 33, 2, 8),
    (36, 64, 8, 48),  # B·heads = 288 ≥ 2 CTAs per SM on a 132-SM H100/H200: one CTA per head there too
]


def check(ops, qkv, heads, temperature, dtype, name):
    out = ops.xca_fwd(qkv, heads, temperature)
    ops.sync()
    b, n, c3 = qkv.shape
    assert out.shape == (b, n, c3 // 3) and out.dtype == qkv.dtype and out.is_contiguous()
    oracle = reference_xca(qkv.detach().double().cpu(), heads, temperature.detach().double().cpu())
    assert_within(name, out, reference_xca(qkv, heads, temperature), oracle, dtype)


def temperature_for(heads, device, shape=None):
    return (torch.rand(heads, 1, 1, device=device) * 2 + 0.5).reshape(shape or (heads, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_xca_fwd_matches_oracle(ops, dtype, shape):
    B, N, H, D = shape
    qkv = torch.randn(B, N, 3 * H * D, device=ops.device, dtype=dtype)
    check(ops, qkv, H, temperature_for(H, ops.device), dtype, f"xca_fwd {shape} {dtype}")


@pytest.mark.parametrize("sm_count", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_one_pass_and_split_heads(ops, monkeypatch, sm_count, dtype):
    """1 SM: one CTA per head does both passes. 7 and 1000 SMs: the tokens of a head are split in
    2..all-tile chunks, whose fp32 partials the apply kernel sums. Emulator only: on a GPU the real
    SM count is the only case (and the other tests run whichever path it picks)."""
    if not ops.emulated:
        pytest.skip("the SM count is the hardware's on a GPU")
    monkeypatch.setenv("VKEMU_SM_COUNT", str(sm_count))
    qkv = torch.randn(2, 300, 3 * 2 * 48, device=ops.device, dtype=dtype)
    check(ops, qkv, 2, temperature_for(2, ops.device), dtype, f"xca_fwd {sm_count} SMs {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_zero_channels_and_temperature_shapes(ops, dtype):
    B, N, H, D = 2, 70, 4, 32
    C = H * D
    wide = torch.randn(B, N, 3 * C + 32, device=ops.device, dtype=dtype)
    qkv = wide[..., 32:]  # a channel slice: read in place
    qkv[:, :, 0] = 0  # q channel 0 of head 0 has zero norm: clamped to 1e-12, a uniform softmax row
    qkv[:, :, C + 5] = 0  # a zero k channel
    check(ops, qkv, H, temperature_for(H, ops.device, (H,)), dtype, f"sliced {dtype}")
    # A misaligned base and a strided last dim are copied by the glue.
    odd = torch.randn(B * N * 3 * C + 1, device=ops.device, dtype=dtype)[1:].view(B, N, 3 * C)
    check(ops, odd, H, temperature_for(H, ops.device).to(dtype), dtype, f"misaligned {dtype}")
    tr = torch.randn(B, 3 * C, N, device=ops.device, dtype=dtype).transpose(1, 2)
    check(ops, tr, H, temperature_for(H, ops.device), dtype, f"transposed {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, monkeypatch, dtype):
    for sm_count in ("1", "132"):  # one pass, split
        monkeypatch.setenv("VKEMU_SM_COUNT", sm_count)
        qkv = torch.randn(2, 150, 3 * 3 * 48, device=ops.device, dtype=dtype)
        check(ops, qkv, 3, temperature_for(3, ops.device), dtype, f"reverse order {sm_count} SMs {dtype}")


def test_bad_arguments(ops):
    qkv = torch.randn(1, 10, 3 * 64, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim"):
        ops.xca_fwd(
            torch.randn(1, 10, 3 * 72, device=ops.device, dtype=torch.float16), 1, torch.ones(1, device=ops.device)
        )
    with pytest.raises(RuntimeError, match="temperature must have"):
        ops.xca_fwd(qkv, 2, torch.ones(3, 1, 1, device=ops.device))
    with pytest.raises(RuntimeError, match="not 3 \\* num_heads"):
        ops.xca_fwd(qkv, 5, torch.ones(5, device=ops.device))
    assert ops.xca_supports_head_dim(48) and not ops.xca_supports_head_dim(72)
    # the shared query shape: xca_supports(head_dim, dtype=None, device=None)
    assert ops.xca_supports(48) and ops.xca_supports(64, torch.float32, torch.device(ops.device))
    assert not ops.xca_supports(72) and not ops.xca_supports(44) and not ops.xca_supports(48, torch.float64)
