"""vitkernels: fused Triton and CUDA kernels for Vision Transformer attention variants.

Every op is a `torch.ops.vitkernels.<name>` custom op (fake kernel, autograd, torch.compile and
torch.export ready) with the same name here. See SPEC.md / docs/ for the exact semantics.
"""

from . import ops
from .backends import BackendUnavailableError, get_backend, not_supported_reasons, set_backend, use_backend
from .ops import *  # noqa: F403 - every op's Python function (ops.__all__, from the op specs)

__version__ = "0.1.0"

__all__ = [
    *ops.__all__,
    "set_backend",
    "get_backend",
    "use_backend",
    "not_supported_reasons",
    "BackendUnavailableError",
    "HAS_CUDA_EXT",  # noqa: F405 (from _ext, resolved lazily)
    "patch_timm",
    "patch_hf",
    "__version__",
]


def patch_timm(model):
    """Swap, in place, the attention modules of a timm model for fused ones; returns the model."""
    from .integrations.timm import patch_timm as _patch

    return _patch(model)


def patch_hf(model):
    """Swap, in place, the attention (and conv-FFN) modules of a transformers model for fused ones; returns
    the model. (Importing `vitkernels` does not import transformers; this does.)"""
    from .integrations.hf import patch_hf as _patch

    return _patch(model)


def __getattr__(name):
    # Computed on first access: no extension load or device query at import time.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    if name == "HAS_CUDA_EXT":
        from . import _ext

        return _ext.load_cuda_ext() is not None
    raise AttributeError(f"module 'vitkernels' has no attribute {name!r}")
