"""Every op: registered, opcheck, torch.compile(fullgraph), torch.export, empty batch, backends API.

The ops, their sample arguments, private-forward arguments and batch dims come from their specs
(`SPEC` in vitkernels/ops/<op>.py, ops/_spec.py)."""

import pytest
import torch

import vitkernels
from vitkernels._samples import samples, variant_samples
from vitkernels.ops import _spec

SPECS = {s.name: s for s in _spec.specs()}
OPS = list(SPECS)
# Argument sets that switch optional features on (window_attention's shift_first / logit_scale).
VARIANTS = [(name, label) for name, s in SPECS.items() for label in s.variants]


def _variant(name, label, **kw):
    return variant_samples(**kw)[name][label]


def test_all_ops_registered():
    for name in OPS:
        assert hasattr(torch.ops.vitkernels, name), name
        assert callable(getattr(vitkernels, name))


def test_specs_list_every_op():
    """The specs are the one list of ops: the exports, the samples and the dispatcher agree with them."""
    from vitkernels import backends

    assert OPS == vitkernels.ops.__all__ == [n for n in vitkernels.__all__ if n in SPECS]
    assert list(samples()) == OPS and set(variant_samples()) <= set(OPS)
    assert [s.number for s in SPECS.values()] == sorted(s.number for s in SPECS.values())
    for name, spec in SPECS.items():
        assert str(getattr(torch.ops.vitkernels, name).default._schema) == f"vitkernels::{spec.schema}", name
        if spec.parts is not None:  # a composite: runs where its parts run
            assert name in backends.COMPOSITES and not spec.kernels(), name
            continue
        kernels = spec.kernels()
        assert set(kernels) == set(backends.BACKENDS), name
        for backend, kernel in kernels.items():
            assert kernel.caps is not None and kernel.caps.backward == (kernel.backward is not None), (name, backend)
        assert hasattr(torch.ops.vitkernels, f"_{name}_fwd") and hasattr(torch.ops.vitkernels, f"_{name}_bwd"), name


def test_spec_pointers_resolve():
    """Every spec's bench pointers name real functions; its Triton modules exist; every op has an
    independent oracle in tests/oracles.py (test_reference_vs_oracle.py compares them)."""
    import importlib

    from vitkernels.bench import cases

    import oracles

    for name, spec in SPECS.items():
        assert callable(_spec.resolve(spec.bench.baseline)), name
        assert callable(_spec.resolve(spec.bench.cases)), name
        assert any(c.op == name for c in cases.all_cases()), name
        for module in spec.triton_modules:
            importlib.import_module(f"vitkernels.triton.{module}")
        assert callable(getattr(oracles, name, None)), f"tests/oracles.py has no {name}"


def test_declared_head_dims_match_the_triton_kernels():
    """The Triton kernels' head-dim limits are declared as data (the op files do not import triton);
    they must be the launchers' own."""
    from vitkernels.triton import attention as ta
    from vitkernels.triton import window_attention as tw
    from vitkernels.triton import xca as tx

    xca = SPECS["xca"].kernels()["triton"].caps
    assert all((d in xca.head_dims) == tx.supports(d) for d in range(0, 200))
    for name, module in (
        ("attention", ta),
        ("self_attention", ta),
        ("sr_attention", ta),
        ("space_time_attention", ta),
        ("window_attention", tw),
    ):
        assert SPECS[name].kernels()["triton"].caps.head_dims == range(1, module.MAX_HEAD_DIM + 1), name


@pytest.mark.parametrize("name", OPS)
def test_opcheck_public(name):
    args = samples(requires_grad=True)[name]
    torch.library.opcheck(getattr(torch.ops.vitkernels, name).default, args)


@pytest.mark.parametrize("name,label", VARIANTS)
def test_opcheck_public_variants(name, label):
    torch.library.opcheck(getattr(torch.ops.vitkernels, name).default, _variant(name, label, requires_grad=True))


# The private forward's arguments from the public ones (the spec's mapping), with the scale 0.3.
PRIVATE = {name: (lambda a, s=s: s.private(a, 0.3)) for name, s in SPECS.items() if s.private is not None}


@pytest.mark.parametrize("name", list(PRIVATE))
def test_opcheck_private_fwd(name):
    args = PRIVATE[name](samples(requires_grad=True)[name])
    torch.library.opcheck(getattr(torch.ops.vitkernels, f"_{name}_fwd").default, args)


@pytest.mark.parametrize("name,label", [v for v in VARIANTS if v[0] in PRIVATE])
def test_opcheck_private_fwd_variants(name, label):
    args = PRIVATE[name](_variant(name, label, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.vitkernels, f"_{name}_fwd").default, args)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", OPS)
def test_compile_fullgraph_matches_eager(name):
    _check_compile_fullgraph(name, samples(requires_grad=True)[name])


@pytest.mark.parametrize("name,label", VARIANTS)
def test_compile_fullgraph_matches_eager_variants(name, label):
    _check_compile_fullgraph(name, _variant(name, label, requires_grad=True))


def _check_compile_fullgraph(name, args):
    fn = getattr(vitkernels, name)
    eager = _outputs(fn(*args))
    torch._dynamo.reset()
    compiled = _outputs(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    # gradients through the compiled graph
    loss = sum(o.float().sum() for o in compiled)
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(loss, leaves)
    ref = torch.autograd.grad(sum(o.float().sum() for o in eager), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name", [name for name, s in SPECS.items() if s.inductor])
def test_compile_inductor(name):
    args = samples()[name]
    fn = getattr(vitkernels, name)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args))


def test_compile_inductor_window_options():
    args = _variant("window_attention", "shift_first+logit_scale")
    torch._dynamo.reset()
    torch.testing.assert_close(
        torch.compile(vitkernels.window_attention, fullgraph=True)(*args), vitkernels.window_attention(*args)
    )


@pytest.mark.parametrize("name", OPS)
def test_forward_backward_under_a_dispatch_mode(name):
    """A TorchDispatchMode (FlopCounterMode, debug modes) sees the ops and their backward run: the
    reference backward records autograd inside its kernel, which such a mode does not break."""
    _check_dispatch_mode(name, samples(requires_grad=True)[name])


@pytest.mark.parametrize("name,label", VARIANTS)
def test_forward_backward_under_a_dispatch_mode_variants(name, label):
    _check_dispatch_mode(name, _variant(name, label, requires_grad=True))


def _check_dispatch_mode(name, args):
    from torch.utils.flop_counter import FlopCounterMode

    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    expect = torch.autograd.grad(sum(o.float().sum() for o in _outputs(getattr(vitkernels, name)(*args))), leaves)
    with FlopCounterMode(display=False):
        got = torch.autograd.grad(sum(o.float().sum() for o in _outputs(getattr(vitkernels, name)(*args))), leaves)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", OPS)
def test_export(name):
    _check_export(name, samples()[name])


@pytest.mark.parametrize("name,label", VARIANTS)
def test_export_variants(name, label):
    _check_export(name, _variant(name, label))


def _check_export(name, args):
    fn = getattr(vitkernels, name)

    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    class Wrapped(torch.nn.Module):  # export takes tensors; the static arguments are baked in
        def forward(self, *ts):
            full = list(args)
            for i, x in zip(positions, ts):
                full[i] = x
            return fn(*full)

    ep = torch.export.export(Wrapped(), tensors)
    for e, x in zip(_outputs(ep.module()(*tensors)), _outputs(fn(*args))):
        torch.testing.assert_close(e, x)


BATCHED = {name: s.batched for name, s in SPECS.items()}


@pytest.mark.parametrize("name", OPS)
def test_empty_batch(name):
    _check_empty_batch(name, list(samples(requires_grad=True)[name]))


@pytest.mark.parametrize("name,label", VARIANTS)
def test_empty_batch_variants(name, label):
    _check_empty_batch(name, list(_variant(name, label, requires_grad=True)))


def _check_empty_batch(name, args):
    for i in BATCHED[name]:
        args[i] = args[i][:0].detach().requires_grad_()
    out = _outputs(getattr(vitkernels, name)(*args))
    assert out[0].shape[0] == 0
    sum(o.sum() for o in out).backward()
    assert args[0].grad is not None and args[0].grad.shape == args[0].shape


# ----------------------------------------------------------------------------- backends


def test_backend_selection_api(monkeypatch):
    assert vitkernels.get_backend() == "auto"
    with vitkernels.use_backend("reference"):
        assert vitkernels.get_backend() == "reference"
        with vitkernels.use_backend("triton"):
            assert vitkernels.get_backend() == "triton"
        assert vitkernels.get_backend() == "reference"
    vitkernels.set_backend("reference")
    try:
        assert vitkernels.get_backend() == "reference"
    finally:
        vitkernels.set_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkernels.set_backend("tpu")


def test_backend_env_default(monkeypatch):
    import vitkernels.backends as b

    monkeypatch.setattr(b, "_global_default", None)
    monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
    assert vitkernels.get_backend() == "reference"
    monkeypatch.setenv("VITKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="VITKERNELS_BACKEND"):
        vitkernels.get_backend()


def test_forced_cuda_on_cpu_explains():
    args = samples()["attention"]
    with vitkernels.use_backend("cuda"), pytest.raises(vitkernels.BackendUnavailableError, match="cuda.*CUDA tensors"):
        vitkernels.attention(*args)


def test_forced_backend_without_kernel_explains(monkeypatch):
    # Every op has a kernel on every backend today: take xca's CUDA one away for this test.
    from vitkernels import backends

    monkeypatch.delitem(backends._KERNELS["xca"], "cuda")
    args = samples()["xca"]
    with vitkernels.use_backend("cuda"), pytest.raises(vitkernels.BackendUnavailableError, match="no kernel for xca"):
        vitkernels.xca(*args)


def test_not_supported_reasons():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    reasons = vitkernels.not_supported_reasons("attention", "triton", q, q, q, None)
    assert any("float64" in r for r in reasons)
    assert vitkernels.not_supported_reasons("attention", "reference", q, q, q, None) == []


def test_auto_on_cpu_is_reference():
    from vitkernels import backends

    q = torch.randn(1, 1, 4, 8)
    assert backends.select("attention", q, q, q, None).backend == "reference"


def test_cuda_reason_helpers():
    from vitkernels.ops._common import ext_op_reasons, int32_reasons

    # An extension built from older sources lacks newer ops: the reason says to rebuild, "auto" moves on.
    assert "rebuild" in ext_op_reasons("no_such_op_in_any_build")[0]
    assert int32_reasons(tokens=2**31 - 1) == []
    assert "32-bit" in int32_reasons(tokens=2**31)[0]
