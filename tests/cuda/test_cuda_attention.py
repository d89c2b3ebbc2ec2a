"""Tests of the CUDA C++ attention forward, `torch.ops.vitkernels_C.attention_fwd`: on a GPU the
compiled extension, without one the same csrc/ under the vkemu CPU emulator (the `ops` fixture,
tests/conftest.py). Shapes marked gpu are too slow to emulate; stream and graph tests need a GPU.

Pass rule (tests/helpers.py): error vs the float64 CPU oracle <= 2 x the error of the same-precision
eager composition on the same device + a small floor.
"""

import math

import pytest
import torch

from helpers import FLOOR, assert_within

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, H, Nq, Nk, D): 1, 49, 50, 197, 577 tokens; every head dim the ViT families use.
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 3, 49, 49, 32),
    (2, 2, 50, 50, 48),
    (2, 3, 197, 197, 64),
    (1, 2, 197, 49, 80),
    pytest.param((1, 2, 577, 577, 96), marks=pytest.mark.gpu),
    (1, 2, 50, 197, 128),
    (1, 1, 1, 577, 64),
    (3, 2, 65, 129, 40),
]


def oracle(q, k, v, bias, scale):
    """float64 CPU math; fully -inf rows give 0 output and +inf lse."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None and bias.dtype == torch.bool:
        s = s.masked_fill(~bias.cpu(), -math.inf)
    elif bias is not None:
        s = s + bias.detach().double().cpu()
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse)[..., None])
    out = torch.where(dead[..., None], torch.zeros(()), p @ v)
    return out, torch.where(dead, torch.full_like(lse, math.inf), lse)


def eager(q, k, v, bias, scale):
    """timm's composition in the input precision (on the GPU)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None and bias.dtype == torch.bool:
        s = s.masked_fill(~bias, -math.inf)
    elif bias is not None:
        s = s + bias
    return torch.nan_to_num(s.softmax(dim=-1), nan=0.0) @ v


def make_bias(kind, B, H, Nq, Nk, dtype, device):
    if kind is None:
        return None
    shape = {"full": (B, H, Nq, Nk), "heads": (H, Nq, Nk), "keys": (B, 1, 1, Nk), "rows": (Nq, 1)}[kind]
    return torch.randn(shape, device=device, dtype=dtype)


def check(ops, q, k, v, bias, scale, dtype, name):
    out, lse = ops.attention_fwd(q, k, v, bias, scale)
    ops.sync()
    ref_out, ref_lse = oracle(q, k, v, bias, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    # Memory layout (B, Nq, H, D): the token-layout view is free.
    assert out.transpose(1, 2).is_contiguous()
    assert_within(name, out, eager(q, k, v, bias, scale), ref_out, dtype)
    live = torch.isfinite(ref_lse)  # rows with no key (a boolean mask) have lse = +inf
    assert torch.equal(torch.isposinf(lse.cpu()), ~live), f"{name}: lse is +inf on other rows than the oracle's"
    if live.any():
        lse_err = (lse.double().cpu()[live] - ref_lse[live]).abs().max().item()
        assert lse_err <= 1e-3 * max(1.0, ref_lse[live].abs().max().item()), f"{name}: lse error {lse_err:.3e}"
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias_kind", [None, "full", "heads", "keys", "rows"])
def test_attention_fwd_matches_oracle(ops, dtype, shape, bias_kind):
    B, H, Nq, Nk, D = shape
    dev = ops.device
    q = torch.randn(B, H, Nq, D, device=dev, dtype=dtype)
    k = torch.randn(B, H, Nk, D, device=dev, dtype=dtype)
    v = torch.randn(B, H, Nk, D, device=dev, dtype=dtype)
    bias = make_bias(bias_kind, B, H, Nq, Nk, dtype, dev)
    check(ops, q, k, v, bias, D**-0.5, dtype, f"attention_fwd {shape} {dtype} bias={bias_kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(ops, dtype):
    B, H, Nq, Nk, D = 2, 3, 50, 77, 64
    q, k, v = (torch.randn(B, H, n, D, device=ops.device, dtype=dtype) for n in (Nq, Nk, Nk))
    bias = torch.zeros(B, H, Nq, Nk, device=ops.device, dtype=dtype)
    bias[:, :, 0] = -math.inf  # a whole row masked
    bias[0, 1, 7] = -math.inf
    bias[:, :, 3, ::2] = -math.inf  # a partially masked row
    out, lse = ops.attention_fwd(q, k, v, bias, D**-0.5)
    ops.sync()
    assert (out[:, :, 0] == 0).all() and (out[0, 1, 7] == 0).all()
    assert torch.isposinf(lse[:, :, 0]).all() and torch.isposinf(lse[0, 1, 7])
    assert torch.isfinite(out).all()
    ref_out, ref_lse = oracle(q, k, v, bias, D**-0.5)
    live = torch.isfinite(ref_lse)
    tol = FLOOR[dtype] * 20
    assert (out.double().cpu() - ref_out).abs().max().item() <= tol
    assert (lse.double().cpu()[live] - ref_lse[live]).abs().max().item() <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 50, 77, 64), (1, 2, 197, 49, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["full", "heads", "keys", "rows"])
def test_bool_mask(ops, dtype, shape, mask_kind):
    """A boolean keep-mask is read as bytes at its broadcast strides (no float copy); rows with no
    True key give 0 and lse = +inf."""
    B, H, Nq, Nk, D = shape
    dev = ops.device
    q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dtype) for n in (Nq, Nk, Nk))
    mshape = {"full": (B, H, Nq, Nk), "heads": (H, Nq, Nk), "keys": (B, 1, 1, Nk), "rows": (Nq, 1)}[mask_kind]
    mask = torch.rand(mshape, device=dev) > 0.5
    if mask_kind in ("full", "heads"):
        mask[..., 3, :] = False  # rows with no key at all
    out, lse = check(ops, q, k, v, mask, D**-0.5, dtype, f"attention_fwd {shape} {dtype} mask={mask_kind}")
    dead = ~mask.expand(B, H, Nq, Nk).any(-1)
    assert (out[dead] == 0).all() and torch.isposinf(lse[dead]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_packed_qkv(ops, dtype):
    # timm: qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4) -> q, k, v are strided views.
    B, N, H, D = 2, 197, 6, 64
    qkv = torch.randn(B, N, 3, H, D, device=ops.device, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    bias = torch.randn(H, N, N, device=ops.device, dtype=dtype)
    check(ops, q, k, v, bias, D**-0.5, dtype, f"packed qkv {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_and_transposed_inputs(ops, dtype):
    B, H, N, D = 1, 2, 49, 32
    # Contiguous but with a storage offset that breaks 16-byte alignment: the glue must copy.
    flat = torch.randn(B * H * N * D + 1, device=ops.device, dtype=dtype)
    q = flat[1:].view(B, H, N, D)
    # Last dim not unit-stride: the glue must make it contiguous.
    k = torch.randn(B, H, D, N, device=ops.device, dtype=dtype).transpose(-1, -2)
    v = torch.randn(B, H, N, D, device=ops.device, dtype=dtype)
    check(ops, q, k, v, None, 0.3, dtype, f"unaligned {dtype}")


def test_bias_dtype_is_cast(ops):
    B, H, N, D = 2, 2, 50, 64
    q, k, v = (torch.randn(B, H, N, D, device=ops.device, dtype=torch.float16) for _ in range(3))
    bias32 = torch.randn(H, N, N, device=ops.device)
    out, _ = ops.attention_fwd(q, k, v, bias32, 0.125)
    ref, _ = ops.attention_fwd(q, k, v, bias32.half(), 0.125)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.gpu
def test_deterministic_and_stream_aware(ops):
    B, H, N, D = 4, 6, 197, 64
    q, k, v = (torch.randn(B, H, N, D, device=ops.device, dtype=torch.bfloat16) for _ in range(3))
    a, la = ops.attention_fwd(q, k, v, None, 0.125)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        b, lb = ops.attention_fwd(q, k, v, None, 0.125)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.gpu
def test_cuda_graph_capture(ops):
    B, H, N, D = 2, 3, 197, 64
    q, k, v = (torch.randn(B, H, N, D, device=ops.device, dtype=torch.float16) for _ in range(3))
    ref, _ = ops.attention_fwd(q, k, v, None, 0.125)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.attention_fwd(q, k, v, None, 0.125)  # warm-up (sets the smem attribute etc.)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = ops.attention_fwd(q, k, v, None, 0.125)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_empty_batch(ops):
    q = torch.randn(0, 2, 5, 64, device=ops.device, dtype=torch.float16)
    out, lse = ops.attention_fwd(q, q, q, None, 0.125)
    assert out.shape == (0, 2, 5, 64) and lse.shape == (0, 2, 5)


@pytest.mark.gpu
def test_large_batch_heads_grid(ops):
    # B*H*m_blocks far beyond 65535: the grid is 1-D.
    B, H, N, D = 1024, 96, 8, 32
    q, k, v = (torch.randn(B, H, N, D, device=ops.device, dtype=torch.float16) for _ in range(3))
    out, _ = ops.attention_fwd(q, k, v, None, D**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("d", [36, 136, 4])
def test_unsupported_head_dim_message(ops, d):
    q = torch.randn(1, 1, 4, d, device=ops.device, dtype=torch.float16)
    assert not ops.attention_supports_head_dim(d)
    with pytest.raises(RuntimeError, match="head dim"):
        ops.attention_fwd(q, q, q, None, 0.1)


def test_bad_inputs_messages(ops):
    q = torch.randn(1, 2, 4, 64, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="k has dtype"):
        ops.attention_fwd(q, q.float(), q, None, 0.1)
    with pytest.raises(RuntimeError, match="k shape"):
        ops.attention_fwd(q, q[:, :1], q[:, :1], None, 0.1)
    with pytest.raises(RuntimeError, match="not broadcastable"):
        ops.attention_fwd(q, q, q, torch.zeros(3, 4, 4, device=ops.device, dtype=torch.float16), 0.1)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.attention_fwd(q[0], q, q, None, 0.1)


def test_supported_head_dims(ops):
    for d in (32, 48, 64, 80, 96, 128, 8, 40, 112):
        assert ops.attention_supports_head_dim(d)


def test_supports_query(ops):
    """attention_supports(head_dim, dtype=None, device=None): the query shape every CUDA op shares;
    attention_supports_head_dim is its older name."""
    for d in (8, 32, 40, 64, 112, 128):
        assert ops.attention_supports(d) and ops.attention_supports(d, torch.bfloat16)
        assert ops.attention_supports(d, torch.float32, torch.device(ops.device))
    for d in (0, 4, 36, 136, -8, 2**40):
        assert not ops.attention_supports(d) and not ops.attention_supports_head_dim(d)
    assert not ops.attention_supports(64, torch.float64) and not ops.attention_supports(64, torch.int8)


@pytest.mark.gpu
def test_built_archs_cover_this_gpu(ops):
    from vitkernels import _ext

    archs = _ext.built_cuda_archs()
    assert archs and "sm_" in archs
    major, minor = torch.cuda.get_device_capability()
    assert f"sm_{major}" in archs.replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, dtype):
    B, H, Nq, Nk, D = 2, 2, 130, 77, 48
    q = torch.randn(B, H, Nq, D, dtype=dtype)
    k, v = (torch.randn(B, H, Nk, D, dtype=dtype) for _ in range(2))
    bias = make_bias("heads", B, H, Nq, Nk, dtype, "cpu")
    check(ops, q, k, v, bias, D**-0.5, dtype, f"reverse order {dtype}")


# ----------------------------------------------------------------------- kernel versions (v2 / v1)
# version 0 (the default) runs v2 where the padded head dim is ≤ 64 (32 query rows per warp, each K /
# V fragment feeding two MMAs), version 1 the v1 kernel (16 rows per warp). Every test above runs the
# default; here v2 must equal v1 bitwise: the same scores, softmax steps and P·V order per row.
V2_SHAPES = [(2, 3, 49, 49, 32), (1, 2, 130, 77, 48), (2, 2, 197, 197, 64), (1, 1, 1, 577, 64), (3, 2, 65, 129, 40)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", V2_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias_kind", [None, "heads", "mask"])
def test_v2_equals_v1_bitwise(ops, dtype, shape, bias_kind):
    B, H, Nq, Nk, D = shape
    q = torch.randn(B, H, Nq, D, device=ops.device, dtype=dtype)
    k, v = (torch.randn(B, H, Nk, D, device=ops.device, dtype=dtype) for _ in range(2))
    if bias_kind == "mask":  # a boolean keep-mask with a fully masked row
        bias = torch.rand(B, 1, Nq, Nk, device=ops.device) > 0.3
        bias[..., 0, :] = False
    else:
        bias = make_bias(bias_kind, B, H, Nq, Nk, dtype, ops.device)
    new = ops.attention_fwd(q, k, v, bias, D**-0.5)
    old = ops.attention_fwd(q, k, v, bias, D**-0.5, version=1)
    ops.sync()
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


def test_version_argument_checked(ops):
    q = torch.randn(1, 1, 4, 32, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="version must be 0"):
        ops.attention_fwd(q, q, q, None, 0.2, version=2)


@pytest.mark.parametrize("switch", ["auto", "v1", "v3"])
def test_cuda_kernel_switch(monkeypatch, switch):
    import importlib

    op = importlib.import_module("vitkernels.ops.attention")  # the module: vitkernels.ops.attention is the op
    monkeypatch.setenv("VITKERNELS_ATTN_CUDA_KERNEL", switch)
    if switch == "v3":
        with pytest.raises(ValueError, match="VITKERNELS_ATTN_CUDA_KERNEL"):
            op.cuda_kernel_version()
    else:
        assert op.cuda_kernel_version() == {"auto": 0, "v1": 1}[switch]


def test_cuda_backend_switch_reaches_the_kernel(cuda_backend, monkeypatch):
    """vk.attention on the "cuda" backend: VITKERNELS_ATTN_CUDA_KERNEL=v1 runs the v1 kernel, whose
    output equals the default v2's bitwise (D = 64, 50 tokens, a key-padding mask)."""
    import vitkernels as vk

    q, k, v = (torch.randn(2, 3, 50, 64, device=cuda_backend, dtype=torch.float16) for _ in range(3))
    mask = torch.rand(2, 1, 1, 50, device=cuda_backend) > 0.2
    real, versions = torch.ops.vitkernels_C.attention_fwd, []

    def spy(*args, **kwargs):
        versions.append(kwargs.get("version", 0))
        return real(*args, **kwargs)

    spy.default = real.default  # the op layer reads the schema (an old build has no version argument)
    monkeypatch.setattr(torch.ops.vitkernels_C, "attention_fwd", spy)
    outs = []
    for switch in ("auto", "v1"):
        monkeypatch.setenv("VITKERNELS_ATTN_CUDA_KERNEL", switch)
        with vk.use_backend("cuda"):
            outs.append(vk.attention(q, k, v, mask))
    assert versions == [0, 1]
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setenv("VITKERNELS_ATTN_CUDA_KERNEL", "v3")
    with pytest.raises(ValueError, match="VITKERNELS_ATTN_CUDA_KERNEL"), vk.use_backend("cuda"):
        vk.attention(q, k, v, mask)
