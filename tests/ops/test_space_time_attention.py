"""space_time_attention on the fused (Triton) path: every axis / layout pair runs the FlashAttention
kernels on zero-copy (B, groups, heads, length, D) views of qkv — contiguous token runs (time axis
of "st", space axis of "ts") and interleaved sequences (time axis of "ts", space axis of "st") —
and the space axis with TimeSformer's shared class token (a prefix key row + a class query row).
Oracle: the float64 reference; rule: helpers.assert_within (helpers.check_against_oracle)."""

import pytest
import torch

import vitkernels as vk

from helpers import backends_here, check_against_oracle, eager_attention

FUSED = [("time", "st"), ("space", "ts"), ("time", "ts"), ("space", "st")]


def eager_space_time(qkv, frames, heads, axis, layout):
    """The rearrange-based composition a user would write, in the tested dtype."""
    b, n, c3 = qkv.shape
    c, s = c3 // 3, n // frames
    x = (
        qkv.reshape(b, s, frames, 3, heads, c // heads)
        if layout == "st"
        else qkv.reshape(b, frames, s, 3, heads, c // heads).transpose(1, 2)
    )
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
    check_against_oracle(
        lambda x: vk.space_time_attention(x, t, heads, axis, layout=layout),
        lambda x: eager_space_time(x, t, heads, axis, layout),
        [qkv],
        backend,
        dtype,
        device,
    )


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False)[:1])
def test_non_contiguous_qkv(backend, dtype, device):
    wide = torch.randn(2, 12, 3 * 32 + 8, device=device, dtype=dtype)[..., 8:]
    with vk.use_backend(backend):
        got = [vk.space_time_attention(wide, 4, 2, a, layout=lay) for a, lay in FUSED]
    with vk.use_backend("reference"):
        want = [vk.space_time_attention(wide.contiguous(), 4, 2, a, layout=lay) for a, lay in FUSED]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)


def eager_space_cls(qkv, cls_qkv, frames, heads, layout):
    """TimeSformer's spatial attention as users write it: the class token's q/k/v concatenated
    in front of every frame's tokens; returns (out, cls_out) flattened into one tensor."""
    b, n, c3 = qkv.shape
    c, s = c3 // 3, n // frames
    x = qkv.reshape(b, s, frames, c3).transpose(1, 2) if layout == "st" else qkv.reshape(b, frames, s, c3)
    seq = torch.cat([cls_qkv[:, None, None, :].expand(b, frames, 1, c3), x], 2)  # (B, T, 1+S, 3C)
    q, k, v = seq.reshape(b, frames, s + 1, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    o = eager_attention(q, k, v).transpose(2, 3).reshape(b, frames, s + 1, c)
    out = o[:, :, 1:]
    out = out.transpose(1, 2) if layout == "st" else out
    return torch.cat([out.reshape(b, n * c), o[:, :, 0].reshape(b, frames * c)], 1)


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False))
@pytest.mark.parametrize("layout", ["st", "ts"])
@pytest.mark.parametrize("s,t,heads,d", [(7, 3, 2, 16), (1, 4, 1, 32), (33, 2, 2, 48)])
def test_fused_space_axis_with_class_token(backend, dtype, device, layout, s, t, heads, d):
    """The class token as a prefix key/value of every frame plus one query row per frame: out,
    cls_out and the grads of qkv and cls_qkv against the float64 reference (2× eager rule)."""
    qkv, cls_qkv = torch.randn(2, s * t, 3 * heads * d), torch.randn(2, 3 * heads * d)

    def fused(x, c):
        out, cls_out = vk.space_time_attention(x, t, heads, "space", c, layout)
        return torch.cat([out.flatten(1), cls_out.flatten(1)], 1)

    check_against_oracle(
        fused, lambda x, c: eager_space_cls(x, c, t, heads, layout), [qkv, cls_qkv], backend, dtype, device
    )


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False)[:2])
@pytest.mark.parametrize("kernel", ["fused", "fused-deterministic"])
@pytest.mark.parametrize("layout", ["st", "ts"])
def test_single_kernel_backward_with_class_token(backend, dtype, device, kernel, layout, monkeypatch):
    """The single-kernel attention backward (VITKERNELS_ATTN_BWD_KERNEL) with the class token: the
    prefix key's dQ terms and dK/dV partials come from key block 0's programs, the class query's
    dK/dV terms from every key block."""
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    s, t, heads, d = 37, 2, 2, 32
    qkv, cls_qkv = torch.randn(2, s * t, 3 * heads * d), torch.randn(2, 3 * heads * d)

    def fused(x, c):
        out, cls_out = vk.space_time_attention(x, t, heads, "space", c, layout)
        return torch.cat([out.flatten(1), cls_out.flatten(1)], 1)

    check_against_oracle(
        fused, lambda x, c: eager_space_cls(x, c, t, heads, layout), [qkv, cls_qkv], backend, dtype, device
    )


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False)[:1])
def test_class_token_runs_the_kernels(backend, dtype, device, monkeypatch):
    """The fused class-token path calls the FlashAttention kernels (with the prefix row) rather
    than falling back, and cls_out only (no out gradient) still gives the cls_qkv gradient."""
    from vitkernels.triton import attention as K

    calls = []
    for name in ("attention_forward", "attention_backward"):

        def spy(*a, _real=getattr(K, name), _name=name, **kw):  # noqa: B008 (binds this loop's function)
            calls.append((_name, "prefix" in kw))
            return _real(*a, **kw)

        monkeypatch.setattr(K, name, spy)
    qkv = torch.randn(1, 12, 3 * 32, device=device, dtype=dtype, requires_grad=True)
    cls_qkv = torch.randn(1, 3 * 32, device=device, dtype=dtype, requires_grad=True)
    with vk.use_backend(backend):
        _, cls_out = vk.space_time_attention(qkv, 3, 2, "space", cls_qkv, "st")
        cls_out.sum().backward()
    assert ("attention_forward", True) in calls and ("attention_backward", True) in calls
    q64, c64 = qkv.detach().double().requires_grad_(), cls_qkv.detach().double().requires_grad_()
    with vk.use_backend("reference"):
        vk.space_time_attention(q64, 3, 2, "space", c64, "st")[1].sum().backward()
    torch.testing.assert_close(cls_qkv.grad.double(), c64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qkv.grad.double(), q64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,dtype,device", backends_here(cuda_kernel=False)[:1])
@pytest.mark.parametrize("axis,layout,cls", [("time", "ts", False), ("space", "st", True)])
def test_opcheck_on_triton(backend, dtype, device, axis, layout, cls):
    """The private ops pass opcheck with the Triton kernels behind them: the forward's saved
    logsumexp (lse, cls_lse) has the fake kernel's shapes, and the backward consumes it."""
    qkv = torch.randn(2, 12, 3 * 32, device=device, dtype=dtype)
    cls_qkv = torch.randn(2, 3 * 32, device=device, dtype=dtype) if cls else None
    args = (qkv, 3, 2, axis, cls_qkv, layout, 0.25)
    with vk.use_backend(backend):
        torch.library.opcheck(torch.ops.vitkernels._space_time_attention_fwd.default, args)
        out, cls_out, lse, cls_lse = torch.ops.vitkernels._space_time_attention_fwd(*args)
        with vk.use_backend("reference"):
            ref = torch.ops.vitkernels._space_time_attention_fwd(*args)
        torch.testing.assert_close(lse, ref[2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cls_lse, ref[3], atol=1e-4, rtol=1e-4)
        bwd_args = (
            torch.randn_like(out),
            torch.randn_like(cls_out),
            qkv,
            cls_qkv,
            out,
            cls_out,
            lse,
            cls_lse,
            3,
            2,
            axis,
            layout,
            0.25,
        )
        torch.library.opcheck(torch.ops.vitkernels._space_time_attention_bwd.default, bwd_args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "axis,layout,cls,t",
    [("time", "st", False, 8), ("space", "st", True, 8), ("time", "ts", False, 16), ("space", "ts", False, 16)],
    ids=["timesformer-time", "timesformer-space-cls", "vivit-time", "vivit-space"],
)
def test_real_shapes_gpu(dtype, axis, layout, cls, t):
    """TimeSformer-B (S 196, T 8, class token on the space axis) and ViViT-B (T 16, layout "ts")
    on the GPU tiles (the first config each tuner keeps: conftest.py), against the float64 reference
    (2× eager rule)."""
    s, heads, d = 196, 12, 64
    qkv = torch.randn(2, s * t, 3 * heads * d)
    if cls:
        cls_qkv = torch.randn(2, 3 * heads * d)

        def fused(x, c):
            out, cls_out = vk.space_time_attention(x, t, heads, axis, c, layout)
            return torch.cat([out.flatten(1), cls_out.flatten(1)], 1)

        check_against_oracle(
            fused, lambda x, c: eager_space_cls(x, c, t, heads, layout), [qkv, cls_qkv], "triton", dtype, "cuda"
        )
    else:
        check_against_oracle(
            lambda x: vk.space_time_attention(x, t, heads, axis, layout=layout),
            lambda x: eager_space_time(x, t, heads, axis, layout),
            [qkv],
            "triton",
            dtype,
            "cuda",
        )
