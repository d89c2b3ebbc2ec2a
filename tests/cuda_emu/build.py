"""Builds csrc/ (the CUDA C++ kernels and their torch glue) for the vkemu CPU emulator.

The result is a shared library that registers the same `torch.ops.vitkernels_C.*` ops as the real
extension, for CPU tensors: `torch.ops.load_library(build())`. The kernel sources are compiled
unchanged except for three mechanical rewrites, made in a translated copy:

* `kernel<<<grid, block, smem, stream>>>(args)` -> `::vkemu::launch(kernel, grid, block, smem, stream, args)`
  (in the .cu files and the .cuh headers);
* `extern __shared__ ... name[];` -> a pointer to the block's emulated dynamic shared memory;
* `ptx_sm80.cuh` (inline PTX) is replaced by tests/cuda_emu/ptx_sm80_emu.cuh (the emulator's versions
  of the same instructions).

The glue (csrc/torch/*.cpp) is compiled against the CPU build of torch with two shim headers
(tests/cuda_emu/include) and two rewrites: its device checks accept CPU tensors (`.is_cuda()` ->
`.is_cpu()`) and the ops register for the CPU dispatch key instead of CUDA.

Needs g++ and the CUDA toolkit's headers (from nvcc's toolkit, $CUDA_HOME, or the copy Triton
ships); nothing from CUDA is linked. The library is cached under
$VITKERNELS_CACHE_DIR or ~/.cache/vitkernels, keyed by a hash of every input.

    python tests/cuda_emu/build.py   # builds and prints the library's path
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "csrc")

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\[\]\s*;")


class EmulatorUnavailable(RuntimeError):
    """g++ or the CUDA headers are missing."""


def cuda_include_dir() -> Optional[str]:
    """A directory holding cuda_runtime.h and cuda_fp16.h (host headers only are used)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(real)), "include"))
        try:  # a wrapper script (exec /usr/local/cuda-X/bin/nvcc): ask nvcc where it lives
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(os.path.join(m.group(1), "include"))
        except (OSError, subprocess.SubprocessError):
            pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_runtime.h")) and os.path.isfile(os.path.join(c, "cuda_fp16.h")):
            return c
    return None


def _split_top_level(s: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _launch_call(m) -> str:
    config = _split_top_level(m.group(2))
    config += ["0", "nullptr"][len(config) - 2 :]  # <<<grid, block[, smem[, stream]]>>>
    args = m.group(3).strip()
    return f"::vkemu::launch({m.group(1)}, {', '.join(config)}{', ' + args if args else ''});"


def translate_kernel_source(text: str, name: str) -> str:
    """The emulator's rewrites of one csrc/kernels file (see the module docstring)."""
    text = _LAUNCH.sub(_launch_call, text)
    text = _EXTERN_SMEM.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::vkemu::dynamic_smem());", text
    )
    for leftover in ("<<<", "extern __shared__"):
        if leftover in text:
            raise RuntimeError(f"vkemu translator: {name} still contains {leftover!r} after rewriting")
    return text


def translate_glue_source(text: str) -> str:
    text = text.replace(".is_cuda()", ".is_cpu()")
    return re.sub(r"TORCH_LIBRARY_IMPL\(\s*vitkernels_C\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(vitkernels_C, CPU,", text)


def _hash(files: List[str], extra: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, REPO).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _emulator_files() -> List[str]:
    files = sorted(
        glob.glob(os.path.join(HERE, "*.h"))
        + glob.glob(os.path.join(HERE, "*.cuh"))
        + glob.glob(os.path.join(HERE, "*.cpp"))
        + [os.path.abspath(__file__)]
    )
    return files + sorted(glob.glob(os.path.join(HERE, "include", "**", "*.h"), recursive=True))


def _run(cmd: List[str], cwd: str, verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"vkemu build failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr[-8000:]}")


def _toolchain():
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise EmulatorUnavailable(f"no C++ compiler ({cxx}) on PATH")
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise EmulatorUnavailable(
            "no CUDA headers found (nvcc's toolkit, $CUDA_HOME, /usr/local/cuda*, or triton's copy)"
        )
    if not os.path.isdir(os.path.join(CSRC, "kernels")):
        raise EmulatorUnavailable(f"csrc/ not found at {CSRC}")
    return cxx, cuda_inc


def _write_kernel_tree(work: str, sources: List[str]) -> List[str]:
    """Translated copies of csrc/kernels (headers, the emulated ptx_sm80.cuh) and of `sources`
    (.cu files) in work/kernels; returns the translation units written."""
    os.makedirs(os.path.join(work, "kernels"))
    units = []
    for path in sorted(glob.glob(os.path.join(CSRC, "kernels", "*"))) + sources:
        name = os.path.basename(path)
        if name == "ptx_sm80.cuh":
            shutil.copy(os.path.join(HERE, "ptx_sm80_emu.cuh"), os.path.join(work, "kernels", name))
            continue
        with open(path) as fh:
            text = fh.read()
        if name.endswith(".cu"):
            dst = os.path.join(work, "kernels", name[:-3] + ".cpp")
            text = translate_kernel_source(text, name)
            units.append(dst)
        else:  # headers: a .cuh may launch kernels too (common.cuh's launch_kernel)
            dst = os.path.join(work, "kernels", name)
            if name.endswith(".cuh"):
                text = translate_kernel_source(text, name)
        with open(dst, "w") as fh:
            fh.write(text)
    return units


def _build(tag: str, files: List[str], verbose: bool, make_units) -> str:
    """Compiles and links in a cache directory keyed by `files` and the toolchain; make_units(work)
    writes the sources and returns [(source, extra flags)] plus the link flags."""
    import torch

    cxx, cuda_inc = _toolchain()
    key = _hash(files, f"{torch.__version__}|{cuda_inc}|{cxx}")
    out_dir = os.path.join(_cache_root(), f"vkemu-{tag}-{key}")
    lib = os.path.join(out_dir, f"lib{tag}.so")
    if os.path.isfile(lib):
        return lib
    work = out_dir + f".tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    units, link_flags = make_units(work)
    units.append((os.path.join(HERE, "vkemu.cpp"), []))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = [cxx, "-std=c++20", "-O2", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", HERE, "-I", cuda_inc]

    def compile_one(unit):
        src, extra = unit
        obj = os.path.join(work, os.path.basename(os.path.dirname(src)) + "_" + os.path.basename(src) + ".o")
        _run(common + extra + ["-c", src, "-o", obj], work, verbose)
        return obj

    jobs = max(1, min(len(units), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, units))
    # -Bsymbolic: the library's calls to the CUDA runtime API bind to vkemu's own definitions, not to a
    # libcudart already loaded in the process (a CUDA build of torch on a machine with no GPU).
    _run(
        [cxx, "-shared", "-Wl,-Bsymbolic", "-o", os.path.join(work, os.path.basename(lib))] + objs + link_flags,
        work,
        verbose,
    )
    if os.path.isdir(out_dir):  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.replace(work, out_dir)
    return lib


def _cache_root() -> str:
    return os.environ.get("VITKERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vitkernels")


def build(verbose: bool = False) -> str:
    """Builds (or finds in the cache) the emulated csrc/ ops library; returns its path. Load it
    with torch.ops.load_library: it registers torch.ops.vitkernels_C.* for CPU tensors."""
    from torch.utils import cpp_extension

    def make_units(work):
        # The macros torch's extension builds give nvcc, so code that relies on an implicit
        # half/bfloat16 conversion fails here as it would there.
        kernel_flags = [
            "-include",
            os.path.join(HERE, "vkemu.h"),
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        units = [(u, kernel_flags) for u in _write_kernel_tree(work, [])]
        os.makedirs(os.path.join(work, "torch"))
        glue_flags = ["-I", os.path.join(HERE, "include")] + [
            a for p in cpp_extension.include_paths() for a in ("-I", p)
        ]
        for path in sorted(glob.glob(os.path.join(CSRC, "torch", "*"))):
            name = os.path.basename(path)
            with open(path) as fh:
                text = fh.read()
            dst = os.path.join(work, "torch", name)
            with open(dst, "w") as fh:
                fh.write(translate_glue_source(text) if name.endswith(".cpp") else text)
            if name.endswith(".cpp") and name != "module.cpp":  # module.cpp: the Python module entry
                units.append((dst, glue_flags))
        libdirs = cpp_extension.library_paths()
        link = [a for d in libdirs for a in ("-L", d, f"-Wl,-rpath,{d}")] + ["-lc10", "-ltorch", "-ltorch_cpu"]
        return units, link

    files = sorted(glob.glob(os.path.join(CSRC, "kernels", "*")) + glob.glob(os.path.join(CSRC, "torch", "*")))
    return _build("vitkernels_emu", files + _emulator_files(), verbose, make_units)


def build_selftest(verbose: bool = False) -> str:
    """Builds tests/cuda_emu/selftest.cu for the emulator (no torch); load it with ctypes."""
    selftest = os.path.join(HERE, "selftest.cu")

    def make_units(work):
        flags = ["-include", os.path.join(HERE, "vkemu.h")]
        units = [u for u in _write_kernel_tree(work, [selftest]) if os.path.basename(u) == "selftest.cpp"]
        return [(u, flags) for u in units], []

    return _build(
        "vkemu_selftest",
        sorted(glob.glob(os.path.join(CSRC, "kernels", "*"))) + [selftest] + _emulator_files(),
        verbose,
        make_units,
    )


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
    print(build_selftest(verbose="-v" in sys.argv))
