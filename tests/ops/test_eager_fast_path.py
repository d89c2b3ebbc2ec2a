"""The eager fast path (ops/_common.py: `plain_eager`, `call_public`, `call_private`): in plain eager
inference the public ops call their composite body and the private op's implementation directly.
It must give the same results as the dispatcher path and step aside wherever anything above the
kernel could observe the op: gradients, tracing, modes, the profiler, tensor subclasses."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import vitkernels as vk
from vitkernels._samples import samples
from vitkernels.ops import _common


@pytest.fixture
def fast_path_off(monkeypatch):
    def off():
        monkeypatch.setattr(_common, "EAGER_FAST_PATH", False)

    return off


def _run(name, args):
    out = getattr(vk, name)(*args)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(samples()))
def test_same_results_as_the_dispatcher_path(name, fast_path_off):
    args = samples()[name]
    with torch.no_grad():
        assert _common.plain_eager(*args)
        fast = _run(name, args)
        fast_path_off()
        assert not _common.plain_eager(*args)
        slow = _run(name, args)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, atol=0, rtol=0)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_steps_aside_for_grads_modes_tracing_and_the_profiler():
    qkv = torch.randn(1, 9, 48)
    assert _common.plain_eager(qkv)
    assert not _common.plain_eager(qkv.clone().requires_grad_())  # grad mode on: autograd must see it
    with torch.no_grad():
        assert _common.plain_eager(qkv.clone().requires_grad_())
    with _Recorder() as rec:  # a dispatch mode sees the private op
        vk.self_attention(qkv, 2)
    assert any("vitkernels._self_attention_fwd" in op for op in rec.ops), rec.ops
    with FlopCounterMode(display=False):
        assert not _common.plain_eager(qkv)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        vk.self_attention(qkv, 2)
    assert any("vitkernels::_self_attention_fwd" in e.name for e in prof.events())
    traced = torch.jit.trace(lambda x: vk.self_attention(x, 2), (qkv,), check_trace=False)
    assert "vitkernels::self_attention" in str(traced.graph)
    assert not _common.plain_eager(torch.nn.Parameter(qkv).as_subclass(_Sub))


class _Sub(torch.Tensor):
    pass


def test_training_still_records_the_private_ops():
    qkv = torch.randn(1, 9, 48, requires_grad=True)
    with _Recorder() as rec:
        out = vk.self_attention(qkv, 2)
        out.sum().backward()
    assert any("vitkernels._self_attention_bwd" in op for op in rec.ops), rec.ops
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


def test_export_traces_the_ops():
    exported = torch.export.export(_SelfAttention(), (torch.randn(1, 9, 48),))
    assert "vitkernels" in str(exported.graph)


class _SelfAttention(torch.nn.Module):
    def forward(self, x):
        return vk.self_attention(x, 2)
