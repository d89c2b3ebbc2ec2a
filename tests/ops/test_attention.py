"""attention / self_attention / sr_attention through the op layer on every backend that runs here.

CPU: the Triton kernels run in the interpreter (float32, float16); GPU (marked gpu): Triton and CUDA
in float16/bfloat16/float32. Oracle: the reference backend in float64 on CPU. Eager: the plain
softmax(q·kᵀ·scale + bias)·v composition in the tested dtype. Rule: helpers.assert_within.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk

from helpers import backends_here, check_against_oracle, eager_attention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


ATTN_SHAPES = [  # B, H, Nq, Nk, D
    (1, 2, 1, 1, 32),
    (2, 1, 49, 49, 32),
    (1, 2, 50, 33, 48),
    (1, 1, 17, 23, 80),
    (1, 1, 9, 9, 128),
]


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("bias_kind", [None, "full", "heads", "keys"])
def test_attention(backend, dtype, device, shape, bias_kind):
    b, h, nq, nk, d = shape
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    bias = {
        None: None,
        "full": torch.randn(b, h, nq, nk),
        "heads": torch.randn(h, nq, nk),
        "keys": torch.randn(b, 1, 1, nk),
    }[bias_kind]
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    fn = lambda q, k, v, bias=None: vk.attention(q, k, v, bias)
    eager = lambda q, k, v, bias=None: eager_attention(q, k, v, bias)
    check_against_oracle(fn, eager, inputs, backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here())
def test_attention_fully_masked_rows(backend, dtype, device):
    b, h, nq, nk, d = 2, 2, 6, 7, 32
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for n in (nq, nk, nk))
    bias = torch.zeros(b, h, nq, nk, device=device, dtype=dtype)
    bias[0, 1, 2] = -math.inf  # one row fully masked
    bias[1, :, :, 3:] = -math.inf  # key padding
    bias.requires_grad_()
    with vk.use_backend(backend):
        out = vk.attention(q, k, v, bias)
        out.float().sum().backward()
    assert (out[0, 1, 2] == 0).all()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()
    assert (bias.grad[0, 1, 2] == 0).all()
    with vk.use_backend("reference"):
        expect = vk.attention(*(t.detach().double().cpu() for t in (q, k, v, bias)))
    torch.testing.assert_close(out.double().cpu(), expect, atol=2e-3, rtol=2e-3)


def _keep_mask(shape, generator=None):
    """A random boolean keep-mask (True = the key takes part) of `shape`."""
    return torch.rand(shape, generator=generator) > 0.4


@pytest.mark.parametrize("backend,dtype,device", backends_here() + [("reference", torch.float32, "cpu")])
@pytest.mark.parametrize("mask_shape", ["full", "heads", "keys", "rows"])
def test_attention_bool_mask(backend, dtype, device, mask_shape):
    """A boolean bias is SDPA's keep-mask (False = -inf), in every broadcast shape; rows with no True
    key give 0 and finite grads. Checked against SDPA itself (float64) and the oracle rule."""
    b, h, nq, nk, d = 2, 3, 37, 29, 32
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    shape = {"full": (b, h, nq, nk), "heads": (h, nq, nk), "keys": (b, 1, 1, nk), "rows": (nq, 1)}[mask_shape]
    mask = _keep_mask(shape)
    if mask_shape == "full":
        mask[0, 1, 4] = False  # a row with no key at all
    if mask_shape == "rows":
        mask[5] = False

    def fn(q, k, v):
        return vk.attention(q, k, v, mask.to(q.device))

    def sdpa(q, k, v):
        return torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device)), nan=0.0)

    check_against_oracle(fn, sdpa, [q, k, v], backend, dtype, device)
    with vk.use_backend(backend):
        qd, kd, vd = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
        out = fn(qd, kd, vd)
        out.float().sum().backward()
    dead = ~mask.expand(b, h, nq, nk).any(-1)
    assert (out.cpu()[dead] == 0).all()
    for t in (qd, kd, vd):
        assert torch.isfinite(t.grad).all()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double().cpu()[~dead], ref[~dead], atol=5e-3, rtol=5e-3)


def test_attention_bool_mask_opcheck_and_compile():
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (5, 6, 6))
    mask = _keep_mask((2, 1, 5, 6))
    torch.library.opcheck(torch.ops.vitkernels.attention.default, (q, k, v, mask, None))
    torch.library.opcheck(torch.ops.vitkernels._attention_fwd.default, (q, k, v, mask, 0.3))
    torch._dynamo.reset()
    compiled = torch.compile(vk.attention, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(compiled, vk.attention(q, k, v, mask))


def test_attention_bool_mask_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"bias must broadcast to \(B, heads, Nq, Nk\)"):
        vk.attention(q, q, q, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bias must be float32, float16 or bfloat16"):
        vk.attention(q, q, q, torch.ones(5, 5, dtype=torch.int64))


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize("n,heads,d", [(1, 1, 32), (50, 3, 32), (37, 2, 64), (12, 2, 96)])
def test_self_attention(backend, dtype, device, n, heads, d):
    qkv = torch.randn(2, n, 3 * heads * d)

    def eager(x):
        q, k, v = x.reshape(2, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        return eager_attention(q, k, v).transpose(1, 2).reshape(2, n, heads * d)

    check_against_oracle(lambda x: vk.self_attention(x, heads), eager, [qkv], backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here())
@pytest.mark.parametrize("n,m,heads,d", [(70, 7, 1, 32), (64, 16, 2, 64)])
def test_sr_attention(backend, dtype, device, n, m, heads, d):
    q, kv = torch.randn(2, n, heads * d), torch.randn(2, m, 2 * heads * d)

    def eager(q, kv):
        qh = q.reshape(2, n, heads, d).transpose(1, 2)
        k, v = kv.reshape(2, m, 2, heads, d).permute(2, 0, 3, 1, 4)
        return eager_attention(qh, k, v).transpose(1, 2).reshape(2, n, heads * d)

    check_against_oracle(lambda a, b: vk.sr_attention(a, b, heads), eager, [q, kv], backend, dtype, device)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_non_contiguous_inputs(backend, dtype, device):
    """Sliced / permuted / last-dim-strided views give the same result as contiguous copies."""
    big = torch.randn(2, 20, 3, 3, 40, device=device, dtype=dtype)  # (B, N, 3, H, D+8)
    q, k, v = big[..., :32].permute(2, 0, 3, 1, 4)  # (B, H, N, 32) views with odd strides
    bias = torch.randn(2, 3, 20, 40, device=device, dtype=dtype)[..., ::2]  # last-dim stride 2
    qkv_wide = torch.randn(2, 11, 3 * 64 + 5, device=device, dtype=dtype)[..., 5:]  # sliced packed qkv
    qkv_t = torch.randn(2, 3 * 64, 11, device=device, dtype=dtype).transpose(1, 2)  # last-dim stride != 1
    with vk.use_backend(backend):
        got = [vk.attention(q, k, v, bias), vk.self_attention(qkv_wide, 2), vk.self_attention(qkv_t, 2)]
    with vk.use_backend("reference"):
        want = [
            vk.attention(q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous()),
            vk.self_attention(qkv_wide.contiguous(), 2),
            vk.self_attention(qkv_t.contiguous(), 2),
        ]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend,dtype,device", backends_here()[:1])
def test_output_not_poisoned(backend, dtype, device):
    """Kernels write every output element: NaN-filled memory from the allocator never leaks through."""
    q = torch.randn(1, 2, 19, 48, device=device, dtype=dtype)
    with vk.use_backend(backend):
        for _ in range(2):
            filler = torch.full((1 << 16,), float("nan"), device=device, dtype=dtype)
            del filler
            assert torch.isfinite(vk.attention(q, q, q)).all()


REAL_SHAPES = [  # B, H, Nq, Nk, D from real models
    (4, 12, 197, 197, 64),  # ViT-B/16 at 224
    (1, 12, 577, 577, 64),  # ViT-B/16 at 384
    (2, 1, 3136, 49, 64),  # PVTv2-b2 stage 1 (sr)
    (8, 3, 49, 49, 32),  # Swin-T window
    (1, 16, 50, 50, 80),  # odd head dims
    (1, 8, 144, 144, 96),
    (1, 6, 300, 300, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_attention_real_shapes_gpu(backend, dtype, shape):
    b, h, nq, nk, d = shape
    inputs = [torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d), torch.randn(1, h, nq, nk)]
    check_against_oracle(
        lambda q, k, v, bias: vk.attention(q, k, v, bias), eager_attention, inputs, backend, dtype, "cuda"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_kind", [None, "float", "bool"])
def test_reference_cpu_fast_path_equals_the_literal_math(dtype, bias_kind):
    """The reference forward on CPU (ATen's tiled attention, no Nq×Nk scores) gives the literal math's
    output and logsumexp, rows with no key included (output 0, lse +inf), for any leading dims."""
    import importlib

    ra = importlib.import_module(
        "vitkernels.reference.attention"
    )  # the module (the package exports a function of that name)
    q, k, v = (torch.randn(2, 3, 2, n, 16, dtype=dtype) for n in (9, 11, 11))
    bias = None
    if bias_kind == "float":
        bias = torch.randn(3, 1, 9, 11, dtype=dtype)
        bias[1, 0, 4] = -math.inf
    elif bias_kind == "bool":
        bias = torch.rand(3, 1, 9, 11) > 0.3
        bias[0, 0, 2] = False
    assert ra._flash_cpu_applies(q, k, v, bias)
    out, lse = ra.attention_with_lse(q, k, v, bias, 0.3)
    literal = [t.detach().requires_grad_() for t in (q, k, v)]  # a differentiated input: the literal math
    assert not ra._flash_cpu_applies(*literal, bias)
    want_out, want_lse = ra.attention_with_lse(*literal, bias, 0.3)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, want_out.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)  # (+inf rows compare equal)
    if bias is not None:
        assert torch.isposinf(lse).any() and (out[torch.isposinf(lse)] == 0).all()
