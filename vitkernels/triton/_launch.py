"""Launch-side helpers shared by the Triton kernel files: interpreter detection, matmul precision,
device context."""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch


def is_interpreted(kernel) -> bool:
    """triton.jit decides at decoration (import) time whether a kernel runs in the interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def fp32_precision() -> str:
    """'tf32' only if the user allowed TF32 for fp32 matmuls in PyTorch, else exact 'ieee'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixing the legacy and new TF32 APIs warns
        p = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
        if p in ("tf32", "ieee"):
            return p
        try:
            return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        except (AttributeError, RuntimeError):
            return "ieee"


def precision(dtype) -> str:
    """tl.dot input_precision: it only affects fp32 operands; fp16/bf16 always use tensor cores."""
    return fp32_precision() if dtype == torch.float32 else "tf32"


def family(dtype) -> str:
    """Autotune config family of a dtype."""
    return "fp32" if dtype == torch.float32 else "half"


def use_fixed(t: torch.Tensor, interpreted: bool, what: str) -> bool:
    """True -> interpreter path with a fixed small config; False -> autotuned GPU path."""
    if interpreted:
        return True
    if t.device.type != "cuda":
        raise RuntimeError(
            f"vitkernels triton {what}: tensors are on {t.device}, but Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is first imported)")
    return False


def device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
