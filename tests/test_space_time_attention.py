"""space_time_attention on the fused (Triton) path: every axis / layout pair runs the FlashAttention
kernels on zero-copy (B, groups, heads, length, D) views of qkv — contiguous token runs (time axis
of "st", space axis of "ts") and interleaved sequences (time axis of "ts", space axis of "st").
Oracle: the float64 reference; rule: tolerance.assert_within (via test_attention's helper)."""
import pytest
import torch

import vitkernels as vk
from test_attention import backends_here, check_against_oracle, eager_attention

FUSED = [("time", "st"), ("space", "ts"), ("time", "ts"), ("space", "st")]


def eager_space_time(qkv, frames, heads, axis, layout):
    """The rearrange-based composition a user would write, in the tested dtype."""
    b, n, c3 = qkv.shape
    c, s = c3 // 3, n // frames
    x = qkv.reshape(b, s, frames, 3, heads, c // heads) if layout == "st" else \
        qkv.reshape(b, frames, s, 3, heads, c // heads).transpose(1, 2)
    seq = x if axis == "time" else x.transpose(1, 2)  # (B, groups, length, 3, heads, D)
    q, k, v = seq.permute(3, 0, 1, 4, 2, 5)
    o = eager_attention(q, k, v).transpose(2, 3)  # (B, groups, length, heads, D)
    o = o if axis == "time" else o.transpose(1, 2)  # (B, S, T, heads, D)
    o = o if layout == "st" else o.transpose(1, 2)
    return o.reshape(b, n, c)


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False))
@pytest.mark.parametrize("axis,layout", FUSED)
@pytest.mark.parametrize("s,t,heads,d", [(7, 3, 2, 16), (1, 8, 1, 32), (49, 1, 2, 32), (10, 4, 3, 64)])
def test_fused_axes(backend, dtype, device, axis, layout, s, t, heads, d):
    qkv = torch.randn(2, s * t, 3 * heads * d)
    check_against_oracle(lambda x: vk.space_time_attention(x, t, heads, axis, layout=layout),
                         lambda x: eager_space_time(x, t, heads, axis, layout), [qkv], backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False)[:1])
def test_non_contiguous_qkv(backend, dtype, device):
    wide = torch.randn(2, 12, 3 * 32 + 8, device=device, dtype=dtype)[..., 8:]
    with vk.use_backend(backend):
        got = [vk.space_time_attention(wide, 4, 2, a, layout=lay) for a, lay in FUSED]
    with vk.use_backend("reference"):
        want = [vk.space_time_attention(wide.contiguous(), 4, 2, a, layout=lay) for a, lay in FUSED]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)


def test_class_token_explains_and_runs_on_the_reference():
    qkv = torch.randn(1, 6, 3 * 8)
    cls_qkv = torch.randn(1, 3 * 8)
    reasons = vk.not_supported_reasons("space_time_attention", "triton", qkv, 3, 1, "space", cls_qkv, "st")
    assert any("class token" in r for r in reasons), reasons
    with vk.use_backend("reference"):
        out, cls_out = vk.space_time_attention(qkv, 3, 1, "space", cls_qkv, "st")
    assert out.shape == (1, 6, 8) and cls_out.shape == (1, 3, 8)
