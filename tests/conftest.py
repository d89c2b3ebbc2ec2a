"""Test set-up. Without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is first imported, so it is decided here (a CPU build of
torch, or a CUDA build on a machine with no GPU, as in CI)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitkernels import _env  # noqa: E402  (after TRITON_INTERPRET: vitkernels imports triton)


def _require_parity_deps():
    """VITKERNELS_REQUIRE_PARITY_DEPS=1 (CI): timm and transformers must import, so the parity
    tests against them run instead of skipping."""
    if not _env.enabled("VITKERNELS_REQUIRE_PARITY_DEPS"):
        return
    for name in ("timm", "transformers"):
        try:
            __import__(name)
        except Exception as e:  # ImportError, or torchvision's operator errors
            raise pytest.UsageError(
                f"VITKERNELS_REQUIRE_PARITY_DEPS=1 but {name} does not import: {type(e).__name__}: {e}"
            ) from e


def pytest_configure(config):
    _require_parity_deps()
    """On a GPU the Triton launchers autotune: every new shape would benchmark every config, and
    the tests would spend their time compiling. There each tuner runs the first config its pruner
    keeps instead (tests/triton/test_triton_configs.py checks every config);
    VITKERNELS_TEST_AUTOTUNE=1 keeps the real tuner."""
    if torch.cuda.is_available() and not _env.enabled("VITKERNELS_TEST_AUTOTUNE"):
        try:
            from helpers import ConfigForcer

            ConfigForcer(0).install(setattr)
        except ImportError:  # no triton: nothing autotunes
            pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class CudaKernels:
    """`torch.ops.vitkernels_C` plus where its kernels run: the compiled extension on a CUDA GPU
    (device "cuda"), or the same csrc/ built for the vkemu CPU emulator (tests/cuda_emu) on a
    machine without one (device "cpu", `emulated` True). Attribute access falls through to the ops."""

    def __init__(self, device: str, emulated: bool, library=None):
        self.device = device
        self.emulated = emulated
        self.library = library  # the emulated build's path

    def __getattr__(self, name):
        return getattr(torch.ops.vitkernels_C, name)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def _emulated_kernels():
    try:
        from cuda_emu.build import EmulatorUnavailable, build

        lib = build()
    except EmulatorUnavailable as e:
        return None, f"CUDA emulator unavailable: {e}"
    torch.ops.load_library(lib)
    return CudaKernels("cpu", emulated=True, library=lib), None


@pytest.fixture(scope="session")
def ops():
    """The CUDA C++ kernels' ops (CudaKernels). On a GPU: the compiled (or JIT-built) extension;
    skips without it (fails with VITKERNELS_REQUIRE_CUDA_EXT=1, as on a GPU run that must test it).
    Without a GPU: csrc/ built for the CPU emulator; skips when g++ or the CUDA headers are missing
    (fails with VITKERNELS_REQUIRE_CUDA_EMU=1, as in CI)."""
    if torch.cuda.is_available():
        from vitkernels import _ext

        if _ext.load_cuda_ext() is None:
            msg = f"CUDA extension unavailable: {_ext.cuda_ext_unavailable_reason()}"
            if _env.enabled("VITKERNELS_REQUIRE_CUDA_EXT"):
                pytest.fail(msg)
            pytest.skip(msg)
        return CudaKernels("cuda", emulated=False)
    kernels, reason = _emulated_kernels()
    if kernels is None:
        if _env.enabled("VITKERNELS_REQUIRE_CUDA_EMU"):
            pytest.fail(reason)
        pytest.skip(reason)
    return kernels


@pytest.fixture
def cuda_backend(ops, monkeypatch):
    """The op layer's "cuda" backend for this test; returns its device. On a GPU: the compiled
    extension on CUDA tensors. Without one: the emulated build, made the extension through
    VITKERNELS_CUDA_EMULATOR (vitkernels/_ext.py) for this test only, on CPU tensors."""
    if ops.emulated:
        from vitkernels import _ext

        monkeypatch.setenv("VITKERNELS_CUDA_EMULATOR", ops.library)
        for name, value in (("_done", False), ("_ext", None), ("_reason", None)):
            monkeypatch.setattr(_ext, name, value)
    return ops.device


@pytest.fixture
def reverse_thread_order(ops, monkeypatch):
    """Emulator only (skips on a GPU, where the order is the hardware's): a block's threads run in
    the opposite order between barriers, so a shared-memory read that lacks a barrier or a
    cp.async wait sees other (poisoned) data than in the default order
    (tests/cuda/test_cuda_emulator.py shows that both orders catch such reads)."""
    if not ops.emulated:
        pytest.skip("thread order is the hardware's own on a GPU")
    monkeypatch.setenv("VKEMU_SCHEDULE", "reverse")
