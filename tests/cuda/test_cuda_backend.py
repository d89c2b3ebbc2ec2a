"""The op layer and the models on the forced "cuda" backend (the CUDA C++ forwards; their backward
runs on the "auto" choice). On a GPU the compiled extension; without one the same csrc/ on the
vkemu CPU emulator, through VITKERNELS_CUDA_EMULATOR (the `cuda_backend` fixture, conftest.py).

What this adds to tests/cuda/test_cuda_<op>.py, which call torch.ops.vitkernels_C directly: the
`_cuda_forward` wrappers in vitkernels/ops (argument preparation, bias broadcasting, packed qkv
views), backend selection and error reasons, and whole models whose attention and Mix-FFN
calls all go through the CUDA kernels.
"""

import pytest
import torch

import vitkernels as vk
from vitkernels import backends
from vitkernels._samples import samples
from vitkernels.models import create_model
from vitkernels.ops import _spec

from helpers import FLOOR, assert_within

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference(fn, *args, **kwargs):
    """fn in float64 on the reference backend (CPU): the oracle."""
    with vk.use_backend("reference"):
        return fn(*[a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)


def eager(fn, *args, **kwargs):
    """fn in the input precision on the reference backend: the error the 2x rule allows."""
    with vk.use_backend("reference"):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_shape", [None, (3, 77, 77), (2, 1, 1, 77), (77, 1)], ids=str)
def test_attention(cuda_backend, dtype, bias_shape):
    q, k, v = (torch.randn(2, 3, 77, 40, device=cuda_backend, dtype=dtype) for _ in range(3))
    bias = None if bias_shape is None else torch.randn(bias_shape, device=cuda_backend, dtype=dtype)
    with vk.use_backend("cuda"):
        out = vk.attention(q, k, v, bias, scale=0.2)
    assert_within(
        f"attention cuda {dtype} bias {bias_shape}",
        out,
        eager(vk.attention, q, k, v, bias, scale=0.2),
        reference(vk.attention, q, k, v, bias, scale=0.2),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_attention_packed_view(cuda_backend, dtype):
    """qkv as a channel slice of a wider activation (token stride 3C + 16): read through views."""
    b, n, c, heads = 2, 50, 96, 3
    wide = torch.randn(b, n, 3 * c + 16, device=cuda_backend, dtype=dtype)
    qkv = wide[..., 16:]
    with vk.use_backend("cuda"):
        out = vk.self_attention(qkv, heads)
    assert out.shape == (b, n, c)
    assert_within(
        f"self_attention cuda {dtype}",
        out,
        eager(vk.self_attention, qkv, heads),
        reference(vk.self_attention, qkv, heads),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_mix_ffn(cuda_backend, dtype):
    """The composite runs its dwconv+GELU on the CUDA kernel; the linears stay F.linear."""
    b, h, w, c, hidden = 2, 9, 11, 32, 64
    dev = cuda_backend
    args = (
        torch.randn(b, h * w, c, device=dev, dtype=dtype),
        (h, w),
        torch.randn(hidden, c, device=dev, dtype=dtype) / 6,
        torch.randn(hidden, device=dev, dtype=dtype),
        torch.randn(hidden, 1, 3, 3, device=dev, dtype=dtype) / 3,
        torch.randn(hidden, device=dev, dtype=dtype),
        torch.randn(c, hidden, device=dev, dtype=dtype) / 8,
        torch.randn(c, device=dev, dtype=dtype),
    )
    with vk.use_backend("cuda"):
        out = vk.mix_ffn(*args)
    assert_within(f"mix_ffn cuda {dtype}", out, eager(vk.mix_ffn, *args), reference(vk.mix_ffn, *args), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "axis,layout,cls", [("time", "st", False), ("time", "ts", False), ("space", "st", True), ("space", "ts", False)]
)
def test_space_time_attention_and_its_grads(cuda_backend, dtype, axis, layout, cls):
    """Forward on the CUDA kernel; its saved lse feeds the backward that "auto" picks."""
    b, s, t, heads, c = 2, 10, 3, 2, 64
    dev = cuda_backend
    qkv = torch.randn(b, s * t, 3 * c, device=dev, dtype=dtype, requires_grad=True)
    cls_qkv = torch.randn(b, 3 * c, device=dev, dtype=dtype, requires_grad=True) if cls else None
    args = (qkv, t, heads, axis, cls_qkv, layout)
    with vk.use_backend("cuda"):
        got = vk.space_time_attention(*args)
    got = got if cls else (got,)
    want = eager(vk.space_time_attention, *args)
    want = want if cls else (want,)
    oracle = reference(vk.space_time_attention, *args)
    oracle = oracle if cls else (oracle,)
    for g, w, o in zip(got, want, oracle):
        assert_within(f"space_time_attention cuda {axis}/{layout} {dtype}", g, w, o, dtype)
    grads = [torch.randn_like(g) for g in got]
    inputs = [qkv] + ([cls_qkv] if cls else [])
    d_got = torch.autograd.grad(got, inputs, grads)
    d_want = torch.autograd.grad(want, inputs, grads)
    for g, w in zip(d_got, d_want):
        torch.testing.assert_close(g, w, atol=20 * FLOOR[dtype], rtol=20 * FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_xca_and_its_grads(cuda_backend, dtype):
    """Forward on the CUDA kernel; the backward runs on the "auto" choice."""
    b, n, heads, d = 2, 77, 4, 48
    qkv = torch.randn(b, n, 3 * heads * d, device=cuda_backend, dtype=dtype, requires_grad=True)
    temperature = (torch.rand(heads, 1, 1, device=cuda_backend, dtype=dtype) + 0.5).requires_grad_()
    with vk.use_backend("cuda"):
        got = vk.xca(qkv, heads, temperature)
    want = eager(vk.xca, qkv, heads, temperature)
    assert_within(f"xca cuda {dtype}", got, want, reference(vk.xca, qkv, heads, temperature), dtype)
    grad = torch.randn_like(got)
    for g, w in zip(
        torch.autograd.grad(got, (qkv, temperature), grad), torch.autograd.grad(want, (qkv, temperature), grad)
    ):
        torch.testing.assert_close(g, w, atol=20 * FLOOR[dtype], rtol=20 * FLOOR[dtype])


def test_reasons_name_what_the_cuda_kernels_lack(cuda_backend):
    x = torch.randn(1, 16, 3 * 64, device=cuda_backend, dtype=torch.float16)
    assert backends.not_supported_reasons("self_attention", "cuda", x, 2) == []
    assert any("head dim" in r for r in backends.not_supported_reasons("self_attention", "cuda", x[..., : 3 * 36], 1))
    assert any("float64" in r for r in backends.not_supported_reasons("self_attention", "cuda", x.double(), 2))
    assert backends.not_supported_reasons("xca", "cuda", x, 2, torch.ones(2, device=cuda_backend)) == []
    with vk.use_backend("cuda"), pytest.raises(vk.BackendUnavailableError, match="CUDA xca kernel"):
        vk.xca(
            torch.randn(1, 16, 3 * 72, device=cuda_backend, dtype=torch.float16),
            1,
            torch.ones(1, 1, 1, device=cuda_backend, dtype=torch.float16),
        )


# Every op with a CUDA kernel, or made of ops that have one (mix_ffn), from the op specs.
CUDA_OPS = [s.name for s in _spec.specs() if "cuda" in s.kernels() or s.parts is not None]


@pytest.mark.parametrize("name", CUDA_OPS)
def test_every_op_runs_its_samples_on_cuda(cuda_backend, monkeypatch, name):
    """Each op forced onto "cuda" with its spec's sample arguments: every fused call runs there, and
    the result is within the 2x rule of the float64 reference."""
    args = samples(device=cuda_backend)[name]
    chosen = []
    select = backends.select

    def spy(op, *a, **kw):
        kernel = select(op, *a, **kw)
        chosen.append((op, kernel.backend))
        return kernel

    monkeypatch.setattr(backends, "select", spy)
    with vk.use_backend("cuda"):
        got = getattr(vk, name)(*args)
    monkeypatch.setattr(backends, "select", select)
    assert chosen and {b for _, b in chosen} == {"cuda"}, chosen
    want, oracle = eager(getattr(vk, name), *args), reference(getattr(vk, name), *args)
    for g, w, o in zip(*(out if isinstance(out, tuple) else (out,) for out in (got, want, oracle))):
        assert_within(f"{name} cuda samples", g, w, o, torch.float32)


VIDEO = {"embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 7, "img_size": 32, "num_frames": 4}
MODELS = [  # name, kwargs, input (B, C, [T,] H, W), the fused ops it calls (each has a CUDA forward)
    ("vit_tiny_patch16_224", {"img_size": 64}, (2, 3, 64, 64), {"self_attention"}),
    ("swin_tiny_patch4_window7_224", {}, (1, 3, 100, 76), {"window_attention"}),
    ("pvt_v2_b0", {}, (1, 3, 96, 64), {"sr_attention", "dwconv"}),
    ("segformer_b0", {"num_classes": 19}, (1, 3, 64, 96), {"sr_attention", "dwconv"}),
    ("xcit_tiny_12_p16_224", {"depth": 2}, (1, 3, 48, 64), {"xca", "dwconv", "attention"}),
    ("timesformer_base_patch16_224", VIDEO, (1, 3, 4, 32, 48), {"space_time_attention"}),
    ("vivit_base_factorized", {"num_frames": 8, **VIDEO}, (1, 3, 8, 32, 48), {"space_time_attention"}),
]


@pytest.mark.parametrize("name,kwargs,shape,fused", MODELS, ids=[m[0] for m in MODELS])
def test_model_forward(cuda_backend, monkeypatch, name, kwargs, shape, fused):
    """fp32 model outputs with every fused call on the CUDA kernels equal the reference backend's."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval().to(cuda_backend)
    x = torch.randn(shape, device=cuda_backend)
    with torch.no_grad():
        with vk.use_backend("reference"):
            want = model(x)
        chosen = set()
        select = backends.select

        def spy(op, *args, **kw):
            kernel = select(op, *args, **kw)
            chosen.add((op, kernel.backend))
            return kernel

        monkeypatch.setattr(backends, "select", spy)
        with vk.use_backend("cuda"):
            got = model(x)
    assert chosen == {(op, "cuda") for op in fused}
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-3 * max(1.0, want.abs().max().item()), rtol=1e-3)
