"""The Triton kernels of vitkernels/triton/xca.py, directly and through ``vitkernels.xca``.

Without a GPU they run in the Triton interpreter on CPU (float32, float16); with one, on CUDA with
bfloat16 too. Oracle: tests/oracles.py's xca in float64. Pass rule: error ≤ 2 × the same math's
error in the input dtype + floor (helpers.assert_within), for out, dqkv and dtemperature.
"""

import pytest
import torch

import vitkernels as vk

import oracles
from helpers import assert_within, device_marks, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

from vitkernels.triton import xca as K  # noqa: E402


def math(qkv, heads, temperature, dout):
    """out, dqkv, dtemperature of the oracle's formula evaluated in qkv's dtype."""
    x, t = qkv.detach().requires_grad_(), temperature.detach().requires_grad_()
    out = oracles.xca(x, heads, t)
    out.backward(dout)
    return out.detach(), x.grad, t.grad


def run_kernels(qkv, heads, temperature, dout):
    return (K.xca_forward(qkv, heads, temperature),) + tuple(K.xca_backward(dout, qkv, heads, temperature))


def check(qkv, heads, temperature, dout, got, dtype):
    oracle = math(qkv.double(), heads, temperature.double(), dout.double())
    eager = math(qkv, heads, temperature, dout)
    for name, g, e, o in zip(("out", "dqkv", "dtemperature"), got, eager, oracle):
        assert g.dtype == dtype, name
        assert_within(name, g, e, o, dtype)


def inputs(B, N, heads, D, dtype, tshape=None):
    qkv = torch.randn(B, N, 3 * heads * D, device=DEVICE).to(dtype)
    temperature = (torch.rand(*(tshape or (heads, 1, 1)), device=DEVICE) + 0.5).to(dtype)
    dout = torch.randn(B, N, heads * D, device=DEVICE).to(dtype)
    return qkv, temperature, dout


@pytest.fixture(params=[None, 16], ids=["one-pass", "split"])
def rows(request, monkeypatch):
    """None: one program per head (the fused one-pass kernels); 16: heads split over several
    programs, whose stats partials the apply kernels sum."""
    monkeypatch.setattr(K, "ROWS_PER_PROGRAM", request.param)
    return request.param


SHAPES = [  # B, N, heads, D
    (2, 37, 2, 48),  # XCiT's D = 48 (BLOCK_D 64, masked channels), ragged N
    (1, 64, 1, 64),  # the largest head dim; N a multiple of the blocks
    (2, 20, 3, 5),  # D < 16
    (1, 1, 2, 16),  # a single token
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_oracle(shape, dtype, rows):
    qkv, temperature, dout = inputs(*shape, dtype)
    check(qkv, shape[2], temperature, dout, run_kernels(qkv, shape[2], temperature, dout), dtype)


def test_split_and_one_pass_agree(monkeypatch):
    """Chunks of 16, of 40 (not a multiple of the token block) and one chunk give the same results."""
    qkv, temperature, dout = inputs(2, 100, 2, 32, torch.float32)
    results = []
    for rows in (None, 16, 40):
        monkeypatch.setattr(K, "ROWS_PER_PROGRAM", rows)
        results.append(run_kernels(qkv, 2, temperature, dout))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic(rows):
    qkv, temperature, dout = inputs(3, 50, 2, 24, torch.float32)
    first, second = run_kernels(qkv, 2, temperature, dout), run_kernels(qkv, 2, temperature, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_clamped_norms(rows):
    """A q channel that is zero over all tokens and a k channel whose norm (~1e-13) is below the
    1e-12 clamp of F.normalize: they are divided by 1e-12, and their gradients take no projection
    term (the clamp's gradient is 0). Matches the oracle."""
    qkv, temperature, dout = inputs(2, 30, 2, 16, torch.float32)
    qkv[:, :, 3] = 0.0  # q, head 0, channel 3
    qkv[:, :, 32 + 16 + 5] = torch.randn(2, 30, device=DEVICE) * 1e-14  # k, head 1, channel 5
    check(qkv, 2, temperature, dout, run_kernels(qkv, 2, temperature, dout), torch.float32)


def test_strided_qkv_and_flat_temperature(rows):
    """qkv as a slice of a wider buffer (row stride 3C + 8) and of a batch-strided one; temperature
    of shape (heads,): the kernels read the strides, and dtemperature keeps the shape."""
    B, N, heads, D = 2, 33, 2, 32
    wide = torch.randn(B, N, 3 * heads * D + 8, device=DEVICE)[..., 8:]
    every_other = torch.randn(2 * B, N, 3 * heads * D, device=DEVICE)[::2]
    temperature = torch.rand(heads, device=DEVICE) + 0.5
    dout = torch.randn(B, N, heads * D, device=DEVICE)
    for qkv in (wide, every_other):
        assert not qkv.is_contiguous()
        got = run_kernels(qkv, heads, temperature, dout)
        assert got[2].shape == (heads,)
        check(qkv, heads, temperature, dout, got, torch.float32)


def test_op_runs_the_kernels_with_autograd(monkeypatch):
    """vitkernels.xca on the "triton" backend: forward and backward go through the kernels, and a
    non-contiguous qkv (last dim strided) is copied, not misread."""
    calls = []
    for name in ("xca_forward", "xca_backward"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    B, N, heads, D = 2, 25, 2, 16
    base = torch.randn(B, N, 2 * 3 * heads * D, device=DEVICE)
    qkv = base[..., ::2].requires_grad_()  # stride(-1) == 2
    temperature = (torch.rand(heads, 1, 1, device=DEVICE) + 0.5).requires_grad_()
    with vk.use_backend("triton"):
        out = vk.xca(qkv, heads, temperature)
        out.square().sum().backward()
    assert calls == ["xca_forward", "xca_backward"]
    q64, t64 = qkv.detach().double().requires_grad_(), temperature.detach().double().requires_grad_()
    ref = oracles.xca(q64, heads, t64)
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), q64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(temperature.grad.double(), t64.grad, atol=1e-4, rtol=1e-4)


def test_opcheck_compile_and_empty_batch_on_triton():
    """The custom ops pass opcheck with the kernels behind them; torch.compile(fullgraph) traces
    through the op with gradients; an empty batch returns empty / zero gradients."""
    qkv, temperature, dout = inputs(2, 19, 2, 16, torch.float32)
    with vk.use_backend("triton"):
        torch.library.opcheck(torch.ops.vitkernels._xca_fwd.default, (qkv, 2, temperature))
        torch.library.opcheck(torch.ops.vitkernels._xca_bwd.default, (dout, qkv, 2, temperature))
        fn = torch.compile(lambda x, t: vk.xca(x, 2, t), fullgraph=True, backend="aot_eager")
        leaves = [qkv.clone().requires_grad_(), temperature.clone().requires_grad_()]
        fn(*leaves).backward(dout)
        eager = [qkv.clone().requires_grad_(), temperature.clone().requires_grad_()]
        vk.xca(eager[0], 2, eager[1]).backward(dout)
        for a, b in zip(leaves, eager):
            torch.testing.assert_close(a.grad, b.grad)
        empty = torch.randn(0, 7, 96, device=DEVICE, requires_grad=True)
        t = temperature.clone().requires_grad_()
        out = vk.xca(empty, 2, t)
        out.sum().backward()
    assert out.shape == (0, 7, 32) and empty.grad.shape == empty.shape
    assert (t.grad == 0).all()


def test_head_dim_limit_is_explained():
    qkv = torch.randn(1, 4, 3 * 80, device=DEVICE)
    t = torch.ones(1, 1, 1, device=DEVICE)
    why = vk.not_supported_reasons("xca", "triton", qkv, 1, t)
    assert any("head dim 80" in r for r in why), why
    with vk.use_backend("triton"), pytest.raises(vk.BackendUnavailableError, match="head dim 80"):
        vk.xca(qkv, 1, t)
    with pytest.raises(ValueError, match="head dim 80"):
        K.xca_forward(qkv, 1, t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "B,N,heads,D",
    [(64, 196, 8, 48), (4, 196, 8, 48), (2, 1200, 4, 64)],
    ids=["xcit-s12-b64", "xcit-s12-b4-split", "d64-long"],
)
def test_real_shapes_gpu(B, N, heads, D, dtype):
    """XCiT-S12 at batch 64 (one pass per head) and 4 (heads split over chunks), and D = 64 with
    many tokens, on the GPU tiles (tests run the first config each tuner keeps: conftest.py)."""
    qkv, temperature, dout = inputs(B, N, heads, D, dtype)
    check(qkv, heads, temperature, dout, run_kernels(qkv, heads, temperature, dout), dtype)
