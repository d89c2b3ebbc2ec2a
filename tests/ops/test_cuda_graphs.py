"""CUDA graphs capture and replay every op (GPU only): `torch.cuda.graph` around the forward,
`torch.cuda.make_graphed_callables` for a training step, and torch.compile(mode="reduce-overhead").
A replay after new data is copied into the static inputs must equal an eager call on that data."""

import pytest
import torch

import vitkernels as vk
from vitkernels._samples import samples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _refill(args, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a.copy_(torch.randn(a.shape, device="cuda", dtype=a.dtype, generator=g) * a.abs().mean())


@pytest.mark.parametrize("name", list(samples()))
def test_graph_capture_and_replay(name):
    args = samples(dtype=torch.bfloat16, device="cuda", batch=2)[name]
    fn = getattr(vk, name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up: autotuning and lazy initialisation happen outside the capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = _tuple(fn(*args))
    _refill(args, seed=7)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        want = _tuple(fn(*args))
    for got, w in zip(static_out, want):
        torch.testing.assert_close(got, w, atol=0, rtol=0)


def test_graphed_training_step():
    x = torch.randn(2, 50, 3 * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    class Block(torch.nn.Module):
        def forward(self, qkv):
            return vk.self_attention(qkv, 2)

    graphed = torch.cuda.make_graphed_callables(Block(), (x,))
    for seed in (1, 2):
        torch.manual_seed(seed)
        data = torch.randn_like(x).requires_grad_()
        out = graphed(data)
        out.float().square().sum().backward()
        ref = data.detach().clone().requires_grad_()
        vk.self_attention(ref, 2).float().square().sum().backward()
        torch.testing.assert_close(out, vk.self_attention(ref.detach(), 2), atol=0, rtol=0)
        torch.testing.assert_close(data.grad, ref.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["self_attention", "window_attention", "sr_attention", "dwconv"])
def test_compile_reduce_overhead(name):
    args = samples(dtype=torch.bfloat16, device="cuda", batch=2)[name]
    fn = getattr(vk, name)
    compiled = torch.compile(lambda *a: fn(*a), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            got = _tuple(compiled(*args))
        want = _tuple(fn(*args))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-2)
