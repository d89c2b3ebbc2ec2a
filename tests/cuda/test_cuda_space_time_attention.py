"""Tests of the CUDA C++ divided space-time attention forward,
`torch.ops.vitkernels_C.space_time_attention_fwd`: the grouped attention kernel of
csrc/kernels/attention.cu reading every (batch, group, head) sequence straight from the token-layout
qkv, with TimeSformer's class token as a prefix key/value and a prefix query. On a GPU the compiled
extension, without one the same csrc/ under the vkemu CPU emulator (the `ops` fixture,
tests/conftest.py).

Pass rule (tests/helpers.py): error vs the float64 CPU oracle <= 2 x the error of the same-precision
eager composition + a small floor; lse within 1e-3 of the oracle's.
"""

import pytest
import torch

from vitkernels.reference import space_time_attention_with_lse

from helpers import assert_within

pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
AXES = [("time", "st"), ("time", "ts"), ("space", "st"), ("space", "ts")]
# (B, S, T, heads, D). The space-axis sequences (length S, plus the class row) end at 63/64/65 rows
# to put the prefix query last in a 64-row block, first in a new one, and after a partial block
# (the fp32 kernel's blocks are 32 rows: 31/32/33 do the same there).
SHAPES = [
    (2, 7, 3, 2, 32),
    (1, 63, 2, 1, 64),
    (1, 64, 2, 2, 64),
    (1, 65, 2, 1, 64),
    (1, 31, 2, 2, 32),
    (1, 32, 3, 1, 32),
    (1, 33, 2, 1, 48),
    (2, 5, 8, 3, 64),
    (1, 3, 70, 1, 128),  # time-axis sequences longer than one key block
    (1, 1, 1, 1, 64),
]


def make(B, S, T, H, D, dtype, device, cls=True):
    C = H * D
    qkv = torch.randn(B, S * T, 3 * C, device=device, dtype=dtype)
    cls_qkv = torch.randn(B, 3 * C, device=device, dtype=dtype) if cls else None
    return qkv, cls_qkv


def check(ops, qkv, frames, heads, axis, cls_qkv, layout, dtype, name):
    D = qkv.shape[-1] // 3 // heads
    scale = D**-0.5
    out, cls_out, lse, cls_lse = ops.space_time_attention_fwd(qkv, frames, heads, axis, cls_qkv, layout, scale)
    ops.sync()
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    ref_out, ref_cls, ref_lse, ref_cls_lse = space_time_attention_with_lse(
        cpu(qkv).double(), frames, heads, axis, None if cls_qkv is None else cpu(cls_qkv).double(), layout, scale
    )
    eager_out, eager_cls = space_time_attention_with_lse(qkv, frames, heads, axis, cls_qkv, layout, scale)[:2]
    B, N, C3 = qkv.shape
    assert out.shape == (B, N, C3 // 3) and out.dtype == qkv.dtype and out.is_contiguous()
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_within(name, out, eager_out, ref_out, dtype)
    err = (lse.double().cpu() - ref_lse).abs().max().item()
    assert err <= 1e-3 * max(1.0, ref_lse.abs().max().item()), f"{name}: lse error {err:.3e}"
    if cls_qkv is None:
        assert cls_out.shape == (B, 0, C3 // 3) and cls_lse.shape == (B, 0, heads, 1)
        return
    assert cls_out.shape == (B, frames, C3 // 3) and cls_lse.shape == (B, frames, heads, 1)
    assert_within(name + " cls_out", cls_out, eager_cls, ref_cls, dtype)
    err = (cls_lse.double().cpu() - ref_cls_lse).abs().max().item()
    assert err <= 1e-3 * max(1.0, ref_cls_lse.abs().max().item()), f"{name}: cls lse error {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("axis,layout", AXES)
def test_space_time_fwd_matches_oracle(ops, dtype, shape, axis, layout):
    B, S, T, H, D = shape
    qkv, cls_qkv = make(B, S, T, H, D, dtype, ops.device, cls=axis == "space")
    name = f"space_time_attention_fwd {shape} {axis}/{layout} {dtype}"
    check(ops, qkv, T, H, axis, cls_qkv, layout, dtype, name)
    if axis == "space":  # ViViT: no class token
        check(ops, qkv, T, H, axis, None, layout, dtype, name + " no cls")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timesformer_shape(ops, dtype):
    # TimeSformer-B at 224 px, one clip: 196 patches x 8 frames, 12 heads of 64.
    qkv, cls_qkv = make(1, 196, 8, 12, 64, dtype, ops.device)
    check(ops, qkv, 8, 12, "time", None, "st", dtype, f"TimeSformer time {dtype}")
    check(ops, qkv, 8, 12, "space", cls_qkv, "st", dtype, f"TimeSformer space {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_unaligned_inputs(ops, dtype):
    B, S, T, H, D = 2, 9, 4, 2, 32
    C = H * D
    # qkv and cls_qkv as column slices of wider buffers: rows 16-byte aligned, read in place.
    wide = torch.randn(B, S * T, 3 * C + 64, device=ops.device, dtype=dtype)
    cls_wide = torch.randn(B, 3 * C + 64, device=ops.device, dtype=dtype)
    for axis, layout in AXES:
        cls = cls_wide[:, 64:] if axis == "space" else None
        check(ops, wide[..., 64:], T, H, axis, cls, layout, dtype, f"sliced {axis}/{layout} {dtype}")
    # One element off: the base is misaligned, the glue copies.
    odd = torch.randn(B * S * T * 3 * C + 1, device=ops.device, dtype=dtype)[1:].view(B, S * T, 3 * C)
    cls_odd = torch.randn(B * 3 * C + 1, device=ops.device, dtype=dtype)[1:].view(B, 3 * C)
    check(ops, odd, T, H, "space", cls_odd, "ts", dtype, f"misaligned {dtype}")
    # Batch-strided (every other clip) and a strided last dim.
    check(ops, wide[::2, :, 64:], T, H, "time", None, "ts", dtype, f"batch-strided {dtype}")
    tr = torch.randn(B, 3 * C, S * T, device=ops.device, dtype=dtype).transpose(1, 2)
    check(ops, tr, T, H, "space", cls_wide[:, : 3 * C], "st", dtype, f"transposed {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, dtype):
    qkv, cls_qkv = make(2, 65, 3, 2, 64, dtype, ops.device)
    check(ops, qkv, 3, 2, "space", cls_qkv, "ts", dtype, f"reverse order space {dtype}")
    check(ops, qkv, 3, 2, "time", None, "st", dtype, f"reverse order time {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_class_token_without_patch_tokens(ops, dtype):
    # S = 0: each frame's sequence is the class token alone, so cls_out is its value in every frame.
    qkv, cls_qkv = make(2, 0, 3, 2, 32, dtype, ops.device)
    out, cls_out, lse, cls_lse = ops.space_time_attention_fwd(qkv, 3, 2, "space", cls_qkv, "st", 0.2)
    ops.sync()
    assert out.shape == (2, 0, 64) and lse.shape == (2, 3, 2, 0)
    torch.testing.assert_close(cls_out, cls_qkv[:, None, 128:].expand(2, 3, 64))
    want = (cls_qkv[:, :64].float() * cls_qkv[:, 64:128].float()).view(2, 1, 2, 32).sum(-1, keepdim=True) * 0.2
    torch.testing.assert_close(cls_lse, want.expand(2, 3, 2, 1), atol=1e-2, rtol=1e-2)


def test_bad_arguments(ops):
    qkv, cls_qkv = make(1, 4, 2, 2, 32, torch.float16, ops.device)
    with pytest.raises(RuntimeError, match="axis must be"):
        ops.space_time_attention_fwd(qkv, 2, 2, "frames", None, "st", 0.1)
    with pytest.raises(RuntimeError, match="layout must be"):
        ops.space_time_attention_fwd(qkv, 2, 2, "time", None, "tt", 0.1)
    with pytest.raises(RuntimeError, match="only valid with axis 'space'"):
        ops.space_time_attention_fwd(qkv, 2, 2, "time", cls_qkv, "st", 0.1)
    with pytest.raises(RuntimeError, match="does not divide"):
        ops.space_time_attention_fwd(qkv, 3, 2, "time", None, "st", 0.1)
    with pytest.raises(RuntimeError, match="head dim"):
        ops.space_time_attention_fwd(
            torch.randn(1, 8, 3 * 12, device=ops.device, dtype=torch.float16), 2, 1, "time", None, "st", 0.1
        )
    with pytest.raises(RuntimeError, match="cls_qkv must be"):
        ops.space_time_attention_fwd(qkv, 2, 2, "space", cls_qkv[:, :-8], "st", 0.1)


def test_supports_query(ops):
    """space_time_attention_supports(head_dim, dtype=None, device=None): the attention kernel's limits."""
    for d in (8, 32, 64, 128):
        assert ops.space_time_attention_supports(d)
        assert ops.space_time_attention_supports(d, torch.float16, torch.device(ops.device))
    for d in (12, 136, 0):
        assert not ops.space_time_attention_supports(d)
    assert not ops.space_time_attention_supports(64, torch.float64)
