"""mix_ffn's fused path: dwconv + GELU + fc2 in one Triton kernel (vitkernels/triton/mix_ffn.py), its
recomputing backward, and the VITKERNELS_MIX_FFN_KERNEL switch.

CPU: the kernel runs in the interpreter (float32, float16); GPU: float16, bfloat16, float32, plus
real model shapes. Oracle: tests/oracles.py (float64, explicit pad-and-shift conv); eager: the
plain composition F.linear → F.conv2d(groups) → F.gelu → F.linear in the tested dtype. Rule:
helpers.assert_within on the output and on the gradient of every input.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels.triton import dwconv as t_dw
from vitkernels.triton import mix_ffn as tk

import oracles
from helpers import assert_within, device_marks, eager_dwconv, grads, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE) + [pytest.mark.filterwarnings("ignore::UserWarning")]

op = importlib.import_module("vitkernels.ops.mix_ffn")  # the module (vitkernels.ops.mix_ffn is the function)
NAMES = ["out", "dx", "dfc1_w", "dfc1_b", "ddw_w", "ddw_b", "dfc2_w", "dfc2_b"]


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of the fused kernel's launcher."""
    calls = []
    real = tk.mix_ffn_forward

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(tk, "mix_ffn_forward", spy)
    return calls


def _inputs(B, H, W, C, hidden, c_out, biases=True, k=3, device="cpu"):
    """x, fc1 weight / bias, dw weight / bias, fc2 weight / bias (float32, CPU unless `device`)."""
    t = [
        torch.randn(B, H * W, C),
        torch.randn(hidden, C) * C**-0.5,
        torch.randn(hidden) * 0.1,
        torch.randn(hidden, 1, k, k) / k,
        torch.randn(hidden) * 0.1,
        torch.randn(c_out, hidden) * hidden**-0.5,
        torch.randn(c_out) * 0.1,
    ]
    if not biases:
        t[2] = t[4] = t[6] = None
    return [None if a is None else a.to(device) for a in t]


def _eager(hw, extra_relu):
    def fn(x, w1, b1, dw, db, w2, b2):
        y = F.linear(x, w1, b1)
        if extra_relu:
            y = F.relu(y)
        return F.linear(eager_dwconv(y, hw, dw, db, "gelu"), w2, b2)

    return fn


def _check(hw, inputs, extra_relu, dtype, transform=None, backend="triton"):
    """Output and every gradient of vk.mix_ffn on `backend` vs the oracle, bounded by eager's error;
    `transform` makes x non-contiguous (the same values)."""
    present = [i for i, t in enumerate(inputs) if t is not None]

    def full(ts):
        out = [None] * len(inputs)
        for i, t in zip(present, ts):
            out[i] = t
        return out

    def with_op(*ts):
        a = full(ts)
        x = transform(a[0]) if transform else a[0]
        return vk.mix_ffn(x, hw, a[1], a[2], a[3], a[4], a[5], a[6], extra_relu)

    def with_oracle(*ts):
        a = full(ts)
        return oracles.mix_ffn(a[0], hw, *a[1:], extra_relu)

    def with_eager(*ts):
        return _eager(hw, extra_relu)(*full(ts))

    base = [inputs[i] for i in present]
    low = [t.to(device=DEVICE, dtype=dtype) for t in base]
    cot = torch.randn(inputs[0].shape[0], inputs[0].shape[1], inputs[5].shape[0], dtype=torch.float64)
    oracle = grads(with_oracle, [t.double() for t in base], cot)
    with vk.use_backend(backend):
        fused = grads(with_op, low, cot)
    eager = grads(with_eager, low, cot)
    names = ["out"] + [NAMES[1 + i] for i in present]
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype} != {dtype}"
        assert_within(f"mix_ffn fused {dtype} {name}", f, e, o, dtype)
    return fused


CASES = [  # B, H, W, C, hidden, C_out, extra_relu, biases
    (2, 5, 7, 8, 40, 9, False, True),  # hidden, C_out not block multiples; C_out odd
    (1, 1, 1, 6, 20, 3, True, True),  # a 1×1 map: only the centre tap
    (2, 3, 9, 5, 24, 7, True, False),  # no biases
    (1, 4, 4, 8, 32, 16, False, True),  # everything a block multiple
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_C{}_h{}_o{}_relu{}_bias{}".format(*c))
def test_fused_matches_oracle(case, dtype, launches):
    B, H, W, C, hidden, c_out, extra_relu, biases = case
    _check((H, W), _inputs(B, H, W, C, hidden, c_out, biases), extra_relu, dtype)
    assert launches, "the fused kernel did not run"


def test_fused_non_contiguous_x_and_kernel_size_5(launches):
    dtype = DTYPES[0]
    inputs = _inputs(2, 5, 6, 8, 24, 10, k=5)

    def strided(x):  # the same values as a (token, batch)-major strided view
        return x.transpose(0, 1).contiguous().transpose(0, 1)

    _check((5, 6), inputs, True, dtype, transform=strided)
    assert launches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_strided_h_and_fc2_weight(dtype):
    """The launcher reads h with any batch / token strides and fc2_weight with any strides."""
    B, H, W, hidden, c_out = 2, 3, 5, 24, 11
    big = torch.randn(B, H * W, hidden + 8, device=DEVICE, dtype=dtype)
    h = big[..., 4 : 4 + hidden]  # a channel slice: token stride hidden + 8
    dw = (torch.randn(hidden, 1, 3, 3) / 3).to(DEVICE, dtype)
    w2t = (torch.randn(hidden, c_out) * hidden**-0.5).to(DEVICE, dtype)
    w2 = w2t.t()  # (C_out, hidden), column-major
    got = tk.mix_ffn_forward(h, (H, W), dw, None, w2, None)
    assert got.is_contiguous() and got.shape == (B, H * W, c_out)
    oracle = F.linear(oracles.dwconv(h.cpu().double(), (H, W), dw.cpu().double(), None, "gelu"), w2.cpu().double())
    eager = F.linear(eager_dwconv(h, (H, W), dw, None, "gelu"), w2)
    assert_within("strided h", got, eager, oracle, dtype)


def test_fused_gradients_equal_the_composite(monkeypatch, launches):
    """Training on the fused path: every input's gradient is the composite's (the backward runs the
    same dwconv kernels and matmuls on a recomputed g)."""
    inputs = [t.requires_grad_() for t in _inputs(2, 4, 5, 8, 24, 6, device=DEVICE)]
    cot = torch.randn(2, 20, 6, device=DEVICE)

    def run(choice):
        monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", choice)
        with vk.use_backend("triton"):
            y = vk.mix_ffn(inputs[0], (4, 5), *inputs[1:], True)
        return [y] + list(torch.autograd.grad(y, inputs, cot))

    composite = run("composite")
    assert not launches
    fused = run("fused")
    assert len(launches) == 1
    for name, f, c in zip(NAMES, fused, composite):
        torch.testing.assert_close(f, c, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_backward_of_some_inputs_only(launches):
    """needs_input_grad: with only fc2's parameters trainable, no dwconv backward runs, and the
    gradients are still the composite's."""
    x, w1, b1, dw, db, w2, b2 = _inputs(1, 3, 4, 8, 16, 8, device=DEVICE)
    w2.requires_grad_()
    b2.requires_grad_()
    with vk.use_backend("triton"):
        y = vk.mix_ffn(x, (3, 4), w1, b1, dw, db, w2, b2)
        got = torch.autograd.grad(y.sum(), [w2, b2])
    g = F.gelu(eager_dwconv(F.linear(x, w1, b1), (3, 4), dw, db))
    torch.testing.assert_close(got[0], y.new_ones(1, 12, 8).flatten(0, 1).t() @ g.flatten(0, 1))
    torch.testing.assert_close(got[1], torch.full((8,), 12.0, device=DEVICE))


def test_empty_batch_on_the_fused_path(monkeypatch):
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "fused")
    args = [t.requires_grad_() for t in _inputs(0, 3, 4, 8, 16, 5, device=DEVICE)]
    y = vk.mix_ffn(args[0], (3, 4), *args[1:])
    assert y.shape == (0, 12, 5)
    y.sum().backward()
    assert args[0].grad.shape == args[0].shape and args[5].grad.abs().sum() == 0


# ----------------------------------------------------------------------------- the switch


def _counted(monkeypatch, args, choice, backend):
    """(fused launches, Triton dwconv launches) of one forward under VITKERNELS_MIX_FFN_KERNEL=choice."""
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", choice)
    fused, dw = [], []
    real_fused = tk.mix_ffn_forward
    monkeypatch.setattr(tk, "mix_ffn_forward", lambda *a: fused.append(1) or real_fused(*a))
    real_dw = t_dw.dwconv_forward
    monkeypatch.setattr(t_dw, "dwconv_forward", lambda *a: dw.append(1) or real_dw(*a))
    with vk.use_backend(backend):
        vk.mix_ffn(*args)
    monkeypatch.setattr(tk, "mix_ffn_forward", real_fused)
    monkeypatch.setattr(t_dw, "dwconv_forward", real_dw)
    return len(fused), len(dw)


def test_switch(monkeypatch):
    x, *params = _inputs(1, 3, 4, 8, 16, 8, device=DEVICE)
    args = (x, (3, 4), *params)
    assert _counted(monkeypatch, args, "auto", "triton") == (1, 0)  # auto: fused where Triton runs
    assert _counted(monkeypatch, args, "composite", "triton") == (0, 1)  # the old path: dwconv's kernel
    assert _counted(monkeypatch, args, "fused", "triton") == (1, 0)
    assert _counted(monkeypatch, args, "auto", "reference") == (0, 0)  # reference dwconv, no Triton
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "auto")
    assert op.uses_fused(x, (3, 4), params[2], params[3]) is (DEVICE == "cuda")  # "auto" backend: CUDA only
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "Composite ")
    assert op.kernel_choice() == "composite"
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "fast")
    with pytest.raises(ValueError, match="VITKERNELS_MIX_FFN_KERNEL must be one of"):
        vk.mix_ffn(*args)


def test_forced_fused_explains_where_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "fused")
    x, *params = [t.double() for t in _inputs(1, 3, 4, 8, 16, 8, device=DEVICE)]
    with pytest.raises(vk.BackendUnavailableError, match="MIX_FFN_KERNEL=fused needs the Triton kernel.*float64"):
        vk.mix_ffn(x, (3, 4), *params)
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "auto")
    assert vk.mix_ffn(x, (3, 4), *params).dtype == torch.float64  # auto: the composite on the reference


def test_private_op_runs_the_backend_choice_at_run_time(monkeypatch, launches):
    """A call of _mix_ffn_fwd under a choice that runs another dwconv kernel (a graph traced for
    Triton, run under "reference") computes dwconv then F.linear there."""
    x, w1, b1, dw, db, w2, b2 = _inputs(1, 3, 4, 8, 16, 8, device=DEVICE)
    h = F.linear(x, w1, b1)
    with vk.use_backend("reference"):
        got = torch.ops.vitkernels._mix_ffn_fwd(h, [3, 4], dw, db, w2, b2)
    assert not launches
    torch.testing.assert_close(got, F.linear(eager_dwconv(h, (3, 4), dw, db, "gelu"), w2, b2))


# ----------------------------------------------------------------------------- op API on the fused path


@pytest.fixture
def fused_path(monkeypatch):
    monkeypatch.setenv("VITKERNELS_MIX_FFN_KERNEL", "fused")
    x, *params = [t.requires_grad_() for t in _inputs(2, 3, 4, 8, 16, 8, device=DEVICE)]
    return (x, [3, 4], *params, True)


def test_opcheck_private_fwd(fused_path):
    x, hw, w1, b1, dw, db, w2, b2, _ = fused_path
    h = F.relu(F.linear(x, w1, b1)).detach().requires_grad_()
    torch.library.opcheck(torch.ops.vitkernels._mix_ffn_fwd.default, (h, hw, dw, db, w2, b2))
    torch.library.opcheck(torch.ops.vitkernels._mix_ffn_fwd.default, (h, hw, dw, None, w2, None))


def test_opcheck_public(fused_path, launches):
    torch.library.opcheck(torch.ops.vitkernels.mix_ffn.default, fused_path)
    assert launches


def test_compile_fullgraph_matches_eager(fused_path, launches):
    args = fused_path
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    eager = vk.mix_ffn(*args)
    torch._dynamo.reset()
    compiled = torch.compile(vk.mix_ffn, fullgraph=True, backend="aot_eager")(*args)
    assert len(launches) == 2  # eager, then the compiled graph's _mix_ffn_fwd
    torch.testing.assert_close(compiled, eager)
    for g, r in zip(torch.autograd.grad(compiled.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        torch.testing.assert_close(g, r)


def test_export_runs_the_fused_op(fused_path):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in fused_path]
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))

    class M(torch.nn.Module):
        def forward(self, x, w1, b1, dw, db, w2, b2):
            return vk.mix_ffn(x, (3, 4), w1, b1, dw, db, w2, b2, True)

    ep = torch.export.export(M(), tensors)
    torch.testing.assert_close(ep.module()(*tensors), vk.mix_ffn(*args))
    decomposed = ep.run_decompositions()  # the public op's composite body, traced
    assert "vitkernels._mix_ffn_fwd" in str(decomposed.graph) and "_dwconv_fwd" not in str(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(*tensors), vk.mix_ffn(*args))


# ----------------------------------------------------------------------------- GPU: real model shapes

REAL_SHAPES = [  # B, H, W, C, hidden (k = 3, C_out = C)
    (2, 128, 128, 64, 256),  # SegFormer-B2 stage 1 at 512 px
    (2, 56, 56, 64, 512),  # PVTv2-b2 stage 1 at 224 px
    (2, 7, 7, 512, 2048),  # PVTv2-b2 stage 4: C_out over several output blocks
]


@pytest.mark.gpu
@pytest.mark.skipif(_INTERPRET, reason="real model shapes: GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "B{}_{}x{}_C{}_h{}".format(*s))
def test_real_shapes(shape, dtype, launches):
    B, H, W, C, hidden = shape
    _check((H, W), _inputs(B, H, W, C, hidden, C), False, dtype)
    assert launches
