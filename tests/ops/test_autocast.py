"""Every op under torch.autocast (SPEC.md, "Mixed precision"): float32 inputs and parameters run in
the autocast dtype, the output has the autocast dtype, each input's gradient has the input's own
dtype, and output and gradients are as accurate as the eager composition under the same autocast
(the reference math run inside the autocast region: its matmuls autocast like timm's code).

Backends: the reference (CPU), the Triton kernels in the interpreter (float16 only: the
interpreter's bfloat16 dots are wrong) and the CUDA C++ kernels on the vkemu emulator (bfloat16
and float16). Also: torch.compile / torch.export of an autocast region, mixed dtypes outside
autocast, and float64 and boolean inputs left alone.
"""

import pytest
import torch

import vitkernels
from vitkernels import reference
from vitkernels._samples import samples

import oracles
from helpers import assert_within

OPS = list(samples())
# The Triton interpreter only runs on CPU tensors with TRITON_INTERPRET=1 (tests/conftest.py).
_TRITON_CPU = not torch.cuda.is_available()


def _outputs(out):
    return tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _reference_outputs(name, args):
    if name == "space_time_attention":
        return _outputs(reference.space_time_attention(*args))
    return _outputs(getattr(reference, name)(*args))


def _grads(outs, leaves, cotangents):
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
    return torch.autograd.grad(loss, leaves)


def _check_op(name, dtype, backend):
    """The op under autocast(cpu, dtype) against its eager composition under the same autocast,
    both measured against the float64 oracle (tests/oracles.py) on the same float32 inputs."""
    args = samples(requires_grad=True)[name]
    leaves = _leaves(args)
    with torch.autocast("cpu", dtype=dtype), vitkernels.use_backend(backend):
        outs = _outputs(getattr(vitkernels, name)(*args))
    assert [o.dtype for o in outs] == [dtype] * len(outs), f"{name}: output dtypes {[o.dtype for o in outs]}"
    cot = [torch.randn(o.shape) for o in outs]
    grads = _grads(outs, leaves, cot)
    for g, a in zip(grads, leaves):
        assert g.dtype == a.dtype == torch.float32, f"{name}: grad dtype {g.dtype} for a {a.dtype} input"

    with torch.autocast("cpu", dtype=dtype):
        eager = _reference_outputs(name, args)
    eager_grads = _grads(eager, leaves, cot)

    args64 = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    oracle = _outputs(getattr(oracles, name)(*args64))
    oracle_grads = _grads(oracle, _leaves(args64), [c.double() for c in cot])
    for i, (o, e, r) in enumerate(zip(outs, eager, oracle)):
        assert_within(f"{name} out{i}", o, e, r, dtype)
    for i, (g, e, r) in enumerate(zip(grads, eager_grads, oracle_grads)):
        assert_within(f"{name} grad{i}", g, e, r, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPS)
def test_autocast_reference(name, dtype):
    _check_op(name, dtype, "reference")


@pytest.mark.skipif(not _TRITON_CPU, reason="the CPU leg of the Triton test (a GPU runs test_autocast_cuda)")
@pytest.mark.parametrize("name", OPS)
def test_autocast_triton_interpreter(name):
    _check_op(name, torch.float16, "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["attention", "window_attention", "xca", "dwconv"])
def test_autocast_cuda_kernels(name, dtype, cuda_backend):
    """The CUDA C++ forwards (emulated on CPU, or on the GPU) under autocast; their backward runs
    on the "auto" choice from the cast inputs."""
    if cuda_backend != "cpu":
        pytest.skip("the GPU leg is test_autocast_cuda")
    _check_op(name, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPS)
def test_autocast_cuda(name, dtype):
    args = samples(device="cuda", requires_grad=True)[name]
    leaves = _leaves(args)
    with torch.autocast("cuda", dtype=dtype):
        outs = _outputs(getattr(vitkernels, name)(*args))
        eager = _reference_outputs(name, args)
    assert all(o.dtype == dtype for o in outs)
    cot = [torch.randn(o.shape, device="cuda") for o in outs]
    grads, eager_grads = _grads(outs, leaves, cot), _grads(eager, leaves, cot)
    args64 = [a.detach().cpu().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    oracle = _outputs(getattr(oracles, name)(*args64))
    oracle_grads = _grads(oracle, _leaves(args64), [c.cpu().double() for c in cot])
    for o, e, r in zip(outs, eager, oracle):
        assert_within(f"{name} out", o, e, r, dtype)
    for g, a, e, r in zip(grads, leaves, eager_grads, oracle_grads):
        assert g.dtype == a.dtype
        assert_within(f"{name} grad", g, e, r, dtype)


def test_autocast_leaves_float64_and_bool_alone():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vitkernels.attention(q, k, v).dtype == torch.float64
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vitkernels.attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), oracles.attention(q.double(), k.double(), v.double(), mask).float(), atol=3e-2, rtol=3e-2
    )


def test_mixed_dtypes_outside_autocast_still_raise():
    qkv = torch.randn(1, 16, 3 * 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="rel_pos_bias_table must have the dtype of qkv"):
        vitkernels.window_attention(qkv, (4, 4), 2, 4, 0, torch.randn(49, 2))
    with pytest.raises(TypeError, match="temperature must have the dtype of qkv"):
        vitkernels.xca(qkv, 2, torch.ones(2, 1, 1))


def test_autocast_disabled_region_keeps_float32():
    args = samples()["xca"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert vitkernels.xca(*args).dtype == torch.float32


class _Swin(torch.nn.Module):
    """A float32 module whose op call runs under autocast: a bias table and a qkv bias as parameters."""

    def __init__(self, c=16, heads=2, m=4):
        super().__init__()
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.table = torch.nn.Parameter(torch.randn((2 * m - 1) ** 2, heads))
        self.heads, self.m = heads, m

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vitkernels.window_attention(self.qkv(x), (6, 5), self.heads, self.m, 2, self.table, self.qkv.bias)


def test_autocast_compile_fullgraph():
    m, x = _Swin(), torch.randn(2, 30, 16)
    eager = m(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)
    compiled.float().sum().backward()
    assert m.table.grad.dtype == torch.float32 and m.qkv.weight.grad.dtype == torch.float32


def test_autocast_export():
    m, x = _Swin(), torch.randn(2, 30, 16)
    ep = torch.export.export(m, (x,))
    out = ep.module()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, m(x))
