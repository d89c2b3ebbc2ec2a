"""Where the Triton kernel tests run: the interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py on CPU builds of torch; float32 and float16, as the interpreter's bfloat16 dot is
wrong) or a CUDA GPU (bfloat16 too)."""
import os

import pytest
import torch


def require_triton():
    """(interpreted, device, dtypes) for a Triton kernel test module; skips the module when the
    kernels can run neither in the interpreter nor on a GPU."""
    pytest.importorskip("triton")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
    dtypes = [torch.float32, torch.float16] + ([] if interpreted else [torch.bfloat16])
    return interpreted, ("cpu" if interpreted else "cuda"), dtypes


def device_marks(device: str) -> list:
    """Marks for a module whose tests run the kernels on ``device``: on a GPU they are GPU tests,
    so `pytest -m gpu` (bench/gpu_suite.sh --part tests) runs them there too."""
    return [pytest.mark.gpu] if device == "cuda" else []


class ConfigForcer:
    """Replaces ``Autotuner.run``: every tuner runs its pruned config number ``index`` (modulo its
    count) without benchmarking; ``counts`` records how many configs each tuner kept."""

    def __init__(self, index: int = 0):
        self.index = index
        self.counts = {}

    def run(self, tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs)
        tuner.nargs = None
        self.counts[id(tuner)] = max(len(configs), self.counts.get(id(tuner), 0))
        config = configs[self.index % len(configs)]
        return tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    def install(self, setattr_fn):
        """``setattr_fn(obj, name, value)``: pytest's monkeypatch.setattr, or plain setattr."""
        from triton.runtime.autotuner import Autotuner
        forcer = self
        setattr_fn(Autotuner, "run", lambda tuner, *a, **kw: forcer.run(tuner, *a, **kw))
