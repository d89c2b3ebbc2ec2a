"""Build script for vitkernels.

Package metadata lives in pyproject.toml; this file only adds the optional compiled CUDA
extension `vitkernels._C` (csrc/kernels/*.cu + csrc/torch/*.cpp).

The extension is built only when all of these hold:
  * torch is importable and is a CUDA build (torch.version.cuda is not None),
  * nvcc is found (CUDA_HOME / CUDA_PATH / PATH, as torch.utils.cpp_extension finds it),
  * VITKERNELS_SKIP_CUDA_BUILD is not "1".
Otherwise the package installs as pure Python (the Triton and reference backends still work,
and vitkernels._ext can JIT-build the extension later).

Install with the already-installed torch (no isolated build env):
    pip install --no-build-isolation -e .

Environment:
  VITKERNELS_CUDA_ARCHS   ";"-separated archs, default "80;90a" (e.g. "80;86;89;90a;100+PTX";
                          "+PTX" also embeds PTX for forward compatibility)
  VITKERNELS_SKIP_CUDA_BUILD=1   never build the extension
  MAX_JOBS                parallel compile jobs (honoured by torch's BuildExtension / ninja)
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;90a"


def _log(msg: str) -> None:
    print(f"[vitkernels setup] {msg}", file=sys.stderr)


def cuda_arch_flags(archs: str) -> list:
    """'80;90a;100+PTX' -> ['-gencode', 'arch=compute_80,code=sm_80', ...]."""
    flags = []
    for item in re.split(r"[;,\s]+", archs.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        arch = item[:-4] if ptx else item
        arch = arch.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"VITKERNELS_CUDA_ARCHS: cannot parse arch {item!r} (expected e.g. 80, 90a, 100+PTX)")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    if not flags:
        raise ValueError("VITKERNELS_CUDA_ARCHS is empty")
    return flags


def _cuda_extension():
    """Returns (ext_modules, cmdclass); empty when the CUDA build is skipped."""
    if os.environ.get("VITKERNELS_SKIP_CUDA_BUILD", "0") == "1":
        _log("VITKERNELS_SKIP_CUDA_BUILD=1: installing without the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch missing or broken: pure-Python install
        _log(f"torch is not importable ({e}); installing without the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build; installing without the CUDA extension")
        return [], {}
    cuda_home = getattr(cpp_extension, "CUDA_HOME", None)
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not (os.path.exists(nvcc) or shutil.which(nvcc)):
        _log("nvcc not found (set CUDA_HOME); installing without the CUDA extension")
        return [], {}

    archs = os.environ.get("VITKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    sources = [
        os.path.relpath(p, ROOT)
        for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
        + sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp")))
    ]
    _log(f"building vitkernels._C for archs {archs!r} with CUDA {torch.version.cuda} ({len(sources)} sources)")
    ext = cpp_extension.CUDAExtension(
        name="vitkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # The torch glue gets torch's own default C++ standard (C++17 or C++20 by version).
            "cxx": ["-O3", "-DVITKERNELS_BUILD_PYTHON_MODULE"],
            # nvcc also gets torch's default standard (torch 2.14 passes -std=c++20 itself and nvcc
            # refuses a second -std); csrc/kernels are plain CUDA C++17 that compile under either.
            "nvcc": ["-O3", "-lineinfo"] + cuda_arch_flags(archs),
        },
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
