"""csrc/kernels must compile with nvcc on a machine with no GPU and no CUDA build of torch.

Each kernel file is compiled once (`-c`) for sm_80 and sm_90a together, with the defines torch's
extension builder passes to nvcc, warnings treated as failures. Skips when nvcc is not found.
"""

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
# The CPU emulator's self-test kernels (tests/cuda/test_cuda_emulator.py) must be real CUDA too.
SELFTEST = os.path.join(ROOT, "tests", "cuda_emu", "selftest.cu")
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
# What torch.utils.cpp_extension adds for every .cu file (half/bf16 operators disabled).
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def _nvcc():
    for cand in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def _compile(nvcc, src, out_dir):
    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
    cmd = [
        nvcc,
        "-c",
        src,
        "-o",
        obj,
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-Xcompiler",
        "-fPIC",
        "-I",
        os.path.join(ROOT, "csrc"),
        "-I",
        os.path.join(ROOT, "csrc", "kernels"),
        "-Werror",
        "all-warnings",
        "--threads",
        "2",
    ]
    cmd += TORCH_NVCC_DEFINES + ARCH_FLAGS
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, cmd, proc, obj


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out_dir = str(tmp_path_factory.mktemp("nvcc"))
    # two at a time at least: each nvcc's host phases are serial (2 cores: 75 s instead of 86 s)
    with ThreadPoolExecutor(max_workers=min(len(KERNELS) + 1, max(2, (os.cpu_count() or 2) // 2))) as pool:
        results = list(pool.map(lambda s: _compile(nvcc, s, out_dir), KERNELS + [SELFTEST]))
    return {os.path.basename(src): (cmd, proc, obj) for src, cmd, proc, obj in results}


def test_kernel_sources_exist():
    assert KERNELS, "no csrc/kernels/*.cu files found"


@pytest.mark.parametrize("name", [os.path.basename(k) for k in KERNELS + [SELFTEST]])
def test_nvcc_compiles_for_sm80_and_sm90a(compiled, name):
    cmd, proc, obj = compiled[name]
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert os.path.getsize(obj) > 0
    assert "warning" not in proc.stderr.lower(), proc.stderr


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "csrc", "kernels"))))
def test_kernels_do_not_include_torch(name):
    with open(os.path.join(ROOT, "csrc", "kernels", name)) as f:
        text = f.read()
    for bad in ("<torch/", "<ATen/", "<c10/"):
        assert bad not in text, f"{name} includes {bad}: csrc/kernels must stay plain CUDA"


# ----------------------------------------------------------------------------- torch glue

GLUE = sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp")))
# The CPU wheel of torch ships the ATen/c10 CUDA headers but not the CUDA math-library headers they
# include (cuBLAS, cuSPARSE, cuSOLVER) nor the generated c10/cuda/impl/cuda_cmake_macros.h. The glue
# uses none of them, so a stand-in declaring the few handle/status types those headers name is enough
# for a full parse and type check of the glue against this torch (the real build runs on the GPU).
_STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


def _cuda_include():
    nvcc = _nvcc()
    if nvcc is None:
        return None
    inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    for cand in (inc, os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")):
        if os.path.exists(os.path.join(cand, "cuda_runtime_api.h")):
            return cand
    return None


@pytest.fixture(scope="module")
def glue_cmd(tmp_path_factory):
    import torch

    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = _cuda_include()
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if cxx is None or cuda_inc is None or not os.path.exists(os.path.join(torch_inc, "ATen", "cuda", "CUDAContext.h")):
        pytest.skip("needs g++, the CUDA toolkit headers and torch's ATen/cuda headers")
    stubs = tmp_path_factory.mktemp("stubinc")
    for name, text in _STUBS.items():
        path = stubs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)
    # The real headers win where they exist (a full CUDA toolkit, a CUDA build of torch).
    return [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-isystem",
        torch_inc,
        "-isystem",
        os.path.join(torch_inc, "torch", "csrc", "api", "include"),
        "-isystem",
        cuda_inc,
        "-idirafter",
        str(stubs),
        "-I",
        os.path.join(ROOT, "csrc"),
    ]


@pytest.fixture(scope="module")
def glue_checked(glue_cmd):
    """Every glue file's type check, two at a time (each parses torch's headers: ~7 s of one core)."""

    def check(path):
        cmd = glue_cmd + [path]
        return os.path.basename(path), cmd, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (cmd, proc) for name, cmd, proc in pool.map(check, GLUE)}


@pytest.mark.parametrize("name", [os.path.basename(g) for g in GLUE])
def test_torch_glue_type_checks(glue_checked, name):
    """csrc/torch/*.cpp parse and type-check (-Wall -Wextra -Werror) against this torch's headers."""
    cmd, proc = glue_checked[name]
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
