"""Helpers shared by the test modules (importable as `helpers`: pytest's `pythonpath` holds tests/).

- The pass rule of every kernel test (the one flash-attention and PyTorch's SDPA tests use):

      error(fused) <= 2 * error(eager composition in the same precision) + floor

  where error = max |x - oracle| and the oracle is the float64 reference on CPU (`assert_within`).
- Where the Triton kernel tests run: the interpreter on CPU tensors (TRITON_INTERPRET=1, set by
  conftest.py without a GPU; float32 and float16, as the interpreter's bfloat16 dot is wrong) or a
  CUDA GPU (bfloat16 too): `require_triton`, `device_marks`, `ConfigForcer`.
- Eager compositions the op tests compare against (`eager_attention`, `eager_dwconv`), the
  gradient helpers (`grads`, `check_against_oracle`) and the backends that run here.
- Eager layers that read their parameters from a state dict by prefix, for the model tests that
  rebuild a forward from checkpoint keys (`layer_norm`, `linear`, `mlp`).
"""

import pytest
import torch
import torch.nn.functional as F

import vitkernels as vk
from vitkernels import _env

# ------------------------------------------------------------------------------------- tolerance

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item()


def assert_within(name: str, fused, eager, oracle, dtype, factor: float = 2.0):
    assert fused.shape == oracle.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    e_fused, e_eager = max_err(fused, oracle), max_err(eager, oracle)
    bound = factor * e_eager + FLOOR[dtype] * max(1.0, oracle.abs().max().item())
    assert e_fused <= bound, f"{name}: error {e_fused:.3e} > {factor} x eager error {e_eager:.3e} + floor ({bound:.3e})"


# ------------------------------------------------------------------------------- Triton, devices


def require_triton():
    """(interpreted, device, dtypes) for a Triton kernel test module; skips the module when the
    kernels can run neither in the interpreter nor on a GPU."""
    pytest.importorskip("triton")
    interpreted = _env.enabled("TRITON_INTERPRET")
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
    dtypes = [torch.float32, torch.float16] + ([] if interpreted else [torch.bfloat16])
    return interpreted, ("cpu" if interpreted else "cuda"), dtypes


def device_marks(device: str) -> list:
    """Marks for a module whose tests run the kernels on ``device``: on a GPU they are GPU tests,
    so `pytest -m gpu` (bench/gpu_suite.sh --part tests) runs them there too."""
    return [pytest.mark.gpu] if device == "cuda" else []


def backends_here(cuda_kernel: bool = True):
    """(backend, dtype, device) triples that can run on this machine; GPU ones carry the gpu mark.
    The "cuda" backend runs the CUDA C++ forward; its backward defers to the auto choice (Triton)."""
    if torch.cuda.is_available():
        names = ("triton", "cuda") if cuda_kernel else ("triton",)
        return [
            pytest.param(b, dt, "cuda", marks=pytest.mark.gpu)
            for b in names
            for dt in (torch.float16, torch.bfloat16, torch.float32)
        ]
    return [("triton", torch.float32, "cpu"), ("triton", torch.float16, "cpu")]


class ConfigForcer:
    """Replaces ``Autotuner.run``: every tuner runs its pruned config number ``index`` (modulo its
    count) without benchmarking; ``counts`` records how many configs each tuner kept."""

    def __init__(self, index: int = 0, distinct: bool = False):
        self.index = index
        self.counts = {}
        # distinct: count configs that differ in their block sizes only. Under the interpreter warps,
        # stages and maxnreg change nothing, so configs that share their blocks compute the same.
        self.distinct = distinct

    def run(self, tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs)
        tuner.nargs = None
        if self.distinct:
            first = {}
            for c in configs:
                first.setdefault(tuple(sorted(c.kwargs.items())), c)
            configs = list(first.values())
        self.counts[id(tuner)] = max(len(configs), self.counts.get(id(tuner), 0))
        config = configs[self.index % len(configs)]
        if config.pre_hook is not None:  # as the tuner does before a launch (e.g. descriptor boxes)
            config.pre_hook({**dict(zip(tuner.arg_names, args)), **kwargs, **config.all_kwargs()})
        return tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    def install(self, setattr_fn):
        """``setattr_fn(obj, name, value)``: pytest's monkeypatch.setattr, or plain setattr."""
        from triton.runtime.autotuner import Autotuner

        forcer = self
        setattr_fn(Autotuner, "run", lambda tuner, *a, **kw: forcer.run(tuner, *a, **kw))


# ------------------------------------------------------------------------- eager ops, gradients


def eager_attention(q, k, v, bias=None, scale=None):
    s = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0) @ v


def eager_dwconv(x, hw, weight, bias=None, activation=None):
    b, _, c = x.shape
    h, w = hw
    k = weight.shape[-1]
    y = F.conv2d(x.transpose(1, 2).reshape(b, c, h, w), weight, bias, padding=k // 2, groups=c)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "relu":
        y = F.relu(y)
    return y.flatten(2).transpose(1, 2)


def grads(fn, inputs, cot):
    """[out, grad of every non-None input] of ``fn(*inputs)`` for the cotangent ``cot``; zeros where
    an input does not reach the output."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    used = [t for t in leaves if t is not None]
    got = torch.autograd.grad(out, used, cot.to(device=out.device, dtype=out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(used, got)]


def check_against_oracle(fn_vk, fn_eager, inputs, backend, dtype, device):
    """Outputs and all input grads of `backend` vs float64 reference, bounded by the eager error."""
    low = [t.to(device=device, dtype=dtype) for t in inputs]
    with vk.use_backend("reference"):
        cot = torch.randn(fn_vk(*[t.double() for t in inputs]).shape, dtype=torch.float64)
        oracle = grads(fn_vk, [t.double() for t in inputs], cot)
    with vk.use_backend(backend):
        fused = grads(fn_vk, low, cot.to(device))
    eager = grads(fn_eager, low, cot.to(device))
    names = ["out"] + [f"grad{i}" for i in range(len(inputs))]
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert_within(f"{backend} {dtype} {name}", f, e, o, dtype)


# ------------------------------------------------------------------- state-dict layers (models)


def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def linear(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def mlp(x, sd, prefix):
    """fc1 → exact GELU → fc2 (timm Mlp)."""
    return linear(F.gelu(linear(x, sd, prefix + ".fc1")), sd, prefix + ".fc2")
