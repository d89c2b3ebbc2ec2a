"""The compiled CUDA extension: find it, or JIT-build it, lazily.

`load_cuda_ext()` returns a `CudaExt` handle (ops live under `torch.ops.vitkernels_C`) or None,
with the reason available from `cuda_ext_unavailable_reason()`. Order of attempts:

0. `$VITKERNELS_CUDA_EMULATOR` — the path of an ops library built for the vkemu CPU emulator
   (`python tests/cuda_emu/build.py` in a source checkout). It registers the same ops for CPU
   tensors, and the "cuda" backend then runs its kernels on CPU tensors, as the "triton" backend
   does with TRITON_INTERPRET=1. A development and test aid: slow, and never picked by "auto".
1. `import vitkernels._C` — the extension built by setup.py (`pip install --no-build-isolation .`
   with a CUDA build of torch and nvcc).
2. JIT build with `torch.utils.cpp_extension.load` (ninja) for the archs of the visible GPUs,
   cached under `$VITKERNELS_CACHE_DIR` or `~/.cache/vitkernels/<hash of sources, torch, archs>`.
   Needs a CUDA build of torch, a visible CUDA device, nvcc and the csrc/ sources (present in a
   source checkout / editable install; point `VITKERNELS_CSRC` at a copy otherwise).
   `VITKERNELS_NO_JIT=1` disables this step.

Nothing here runs at import time: no torch import, no device query, no build.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
from typing import List, Optional

from . import _env

__all__ = [
    "CudaExt",
    "HAS_CUDA_EXT",  # noqa: F822 (resolved by the module __getattr__)
    "load_cuda_ext",
    "cuda_ext_unavailable_reason",
    "built_cuda_archs",
    "cuda_sources",
    "jit_arch_flags",
]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_JIT_NAME = "vitkernels_C_jit"

_lock = threading.Lock()
_done = False
_ext: Optional[CudaExt] = None
_reason: Optional[str] = None


class CudaExt:
    """Handle on the loaded extension. The ops themselves are `torch.ops.vitkernels_C.<name>`."""

    def __init__(self, name: str, path: Optional[str], module=None, emulated: bool = False):
        self.__name__ = name
        self.path = path
        self.module = module
        self.emulated = emulated  # the vkemu CPU build: its kernels take CPU tensors

    @property
    def ops(self):
        import torch

        return torch.ops.vitkernels_C

    def supports(self, op: str, *sizes: int, dtype=None, device=None) -> bool:
        """`torch.ops.vitkernels_C.<op>_supports(*sizes, dtype, device)`: whether the compiled kernel of
        `op` takes these sizes (head dim, window, M, kernel size: csrc/torch/<op>.cpp) in `dtype` on
        `device`. False when the extension, built from older sources, lacks the query."""
        try:
            query = getattr(self.ops, f"{op}_supports")
        except (AttributeError, RuntimeError):
            return False
        return bool(query(*(int(s) for s in sizes), dtype, device))

    def built_archs(self) -> str:
        """Compiled GPU archs, e.g. 'sm_80, sm_90' (from nvcc's __CUDA_ARCH_LIST__)."""
        raw = str(self.ops.built_archs())
        archs = []
        for tok in raw.replace(";", ",").split(","):
            tok = tok.strip()
            if tok.isdigit():
                n = int(tok) // 10
                archs.append(f"sm_{n}")
            elif tok:
                archs.append(tok)
        return ", ".join(archs) if archs else raw

    def __repr__(self) -> str:
        return f"CudaExt({self.__name__!r}, path={self.path!r})"


def __getattr__(name):
    # `HAS_CUDA_EXT` is evaluated on access (it may build or load the extension).
    if name == "HAS_CUDA_EXT":
        return load_cuda_ext() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _csrc_dir() -> Optional[str]:
    candidates = [
        _env.get("VITKERNELS_CSRC"),
        os.path.join(os.path.dirname(_PKG_DIR), "csrc"),  # source checkout / editable install
        os.path.join(_PKG_DIR, "csrc"),
    ]  # packaged copy, if any
    for c in candidates:
        if c and os.path.isdir(os.path.join(c, "kernels")) and os.path.isdir(os.path.join(c, "torch")):
            return c
    return None


def cuda_sources() -> List[str]:
    """All csrc/kernels/*.cu and csrc/torch/*.cpp files (empty if csrc/ is not found)."""
    root = _csrc_dir()
    if root is None:
        return []
    return sorted(glob.glob(os.path.join(root, "kernels", "*.cu"))) + sorted(
        glob.glob(os.path.join(root, "torch", "*.cpp"))
    )


def jit_arch_flags() -> List[str]:
    """-gencode flags for the compute capabilities of the visible CUDA devices (9.0 -> sm_90a)."""
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    flags = []
    for major, minor in caps:
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _cache_dir(sources: List[str], arch_flags: List[str]) -> str:
    import torch

    h = hashlib.sha256()
    for s in sources:
        h.update(os.path.basename(s).encode())
        with open(s, "rb") as f:
            h.update(f.read())
    root = os.path.dirname(os.path.dirname(sources[0]))
    headers = [p for ext in ("h", "cuh") for p in glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)]
    for hdr in sorted(headers):
        with open(hdr, "rb") as f:
            h.update(f.read())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{' '.join(arch_flags)}".encode())
    base = _env.get("VITKERNELS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vitkernels"
    )
    path = os.path.join(base, h.hexdigest()[:16])
    os.makedirs(path, exist_ok=True)
    return path


def _tail(text: str, n: int = 30) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _load():
    """Returns (CudaExt or None, reason or None)."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return None, f"torch is not importable: {e}"

    emulator = _env.get("VITKERNELS_CUDA_EMULATOR")
    if emulator:
        if torch.cuda.is_available():
            return None, "VITKERNELS_CUDA_EMULATOR is for machines without a CUDA GPU (this one has one)"
        try:
            torch.ops.load_library(emulator)
        except Exception as e:
            return None, f"VITKERNELS_CUDA_EMULATOR={emulator} could not be loaded: {type(e).__name__}: {_tail(e)}"
        return CudaExt("vkemu", emulator, emulated=True), None

    import_error = None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.vitkernels_C.* on import)

        return CudaExt("vitkernels._C", getattr(_C, "__file__", None), _C), None
    except ImportError as e:
        import_error = e

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if _env.enabled("VITKERNELS_NO_JIT"):
        return None, f"vitkernels._C is not built ({import_error}) and VITKERNELS_NO_JIT=1"
    if not torch.cuda.is_available():
        return None, "no CUDA device (vitkernels._C is not built, and the JIT build needs a GPU to pick archs)"
    from torch.utils import cpp_extension

    cuda_home = getattr(cpp_extension, "CUDA_HOME", None)
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return None, "nvcc not found (set CUDA_HOME), and vitkernels._C is not built"
    sources = cuda_sources()
    if not sources:
        return (
            None,
            "vitkernels._C is not built and the csrc/ sources for a JIT build were not found (set VITKERNELS_CSRC)",
        )
    try:
        arch_flags = jit_arch_flags()
        build_dir = _cache_dir(sources, arch_flags)
        path = cpp_extension.load(
            name=_JIT_NAME,
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"] + arch_flags,
            extra_include_paths=[os.path.dirname(os.path.dirname(sources[0]))],
            build_directory=build_dir,
            is_python_module=False,  # a plain shared library: torch.ops.load_library
            verbose=False,
        )
    except Exception as e:
        return None, f"JIT build of the CUDA extension failed: {type(e).__name__}: {_tail(e)}"
    return CudaExt(_JIT_NAME, path if isinstance(path, str) else None), None


def load_cuda_ext() -> Optional[CudaExt]:
    """The loaded extension (built or JIT-built and cached), or None; see cuda_ext_unavailable_reason()."""
    global _done, _ext, _reason
    if _done:
        return _ext
    with _lock:
        if not _done:
            _ext, _reason = _load()
            _done = True
    return _ext


def cuda_ext_unavailable_reason() -> Optional[str]:
    """Why load_cuda_ext() returned None (None when the extension is loaded)."""
    load_cuda_ext()
    return _reason


def built_cuda_archs() -> Optional[str]:
    """GPU archs compiled into the loaded extension, e.g. 'sm_80, sm_90'; None if not loaded."""
    ext = load_cuda_ext()
    return None if ext is None else ext.built_archs()
