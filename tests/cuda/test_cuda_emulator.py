"""The vkemu CPU emulator (tests/cuda_emu), which runs the CUDA C++ kernels' tests without a GPU.

These tests pin down what it must do for those tests to mean anything: the tensor-core fragment
layouts of mma.m16n8k16 / ldmatrix as the PTX ISA defines them (A row-major and B column-major
fragments as in CUTLASS's SM80_16x8x16 traits), and that missing cp.async waits, missing barriers,
divergent warp collectives, out-of-range shared-memory addresses and oversized launches are caught.
The kernels are tests/cuda_emu/selftest.cu, translated exactly as csrc/ is.
"""

import ctypes

import pytest
import torch

from cuda_emu.build import EmulatorUnavailable, build_selftest, translate_kernel_source

SUCCESS, INVALID_VALUE, LAUNCH_FAILURE = 0, 1, 719


@pytest.fixture(scope="module")
def lib():
    try:
        path = build_selftest()
    except EmulatorUnavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")
    so = ctypes.CDLL(path)
    so.vkemu_selftest_error_string.restype = ctypes.c_char_p
    return so


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def error_text(lib, err):
    return lib.vkemu_selftest_error_string(err).decode()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_with_ldmatrix_fragments_is_a_matmul(lib, dtype):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.full((16, 8), float("nan"))
    err = lib.vkemu_selftest_mma(int(dtype == torch.bfloat16), ptr(a), ptr(b), ptr(c))
    assert err == SUCCESS, error_text(lib, err)
    want = a.double() @ b.double()
    torch.testing.assert_close(c.double(), want, atol=1e-5, rtol=1e-5)


def test_mma_layout_is_not_symmetric(lib):
    """A distinct value per element: a transposed or shifted fragment would give another matrix."""
    a = torch.arange(256, dtype=torch.float32).reshape(16, 16).div(64).half()
    b = torch.eye(16)[:, :8].half()
    c = torch.zeros(16, 8)
    assert lib.vkemu_selftest_mma(0, ptr(a), ptr(b), ptr(c)) == SUCCESS
    assert torch.equal(c, a[:, :8].float())


@pytest.mark.parametrize("mask", [1, 2, 5, 16, 31])
def test_shfl_xor(lib, mask):
    out = torch.zeros(32)
    assert lib.vkemu_selftest_shfl(ptr(out), mask) == SUCCESS
    assert out.tolist() == [float(i ^ mask) for i in range(32)]


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_cp_async_lands_only_when_waited_for(lib, monkeypatch, schedule):
    monkeypatch.setenv("VKEMU_SCHEDULE", schedule)
    n = 64
    src = torch.randn(n * 4)
    dst = torch.zeros(n * 4)
    assert lib.vkemu_selftest_cp_async(ptr(src), ptr(dst), n, 1) == SUCCESS
    assert torch.equal(dst.view(n, 4), src.view(n, 4).roll(-1, 0))
    # Waiting only after the reads: the neighbours' copies have not landed for most readers (which
    # ones depends on the order the threads run in), so they read poisoned (NaN) shared memory.
    assert lib.vkemu_selftest_cp_async(ptr(src), ptr(dst), n, 0) == SUCCESS
    assert torch.isnan(dst).any()
    err = lib.vkemu_selftest_cp_async(ptr(src), ptr(dst), n, 2)  # never waiting is a fault
    assert err == LAUNCH_FAILURE and "cp.async copies it never waited for" in error_text(lib, err)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_missing_barrier_reads_poison(lib, monkeypatch, schedule):
    monkeypatch.setenv("VKEMU_SCHEDULE", schedule)
    n = 96
    out = torch.zeros(n)
    assert lib.vkemu_selftest_barrier(ptr(out), n, 1) == SUCCESS
    assert out.tolist() == [float(n - 1 - i) for i in range(n)]
    assert lib.vkemu_selftest_barrier(ptr(out), n, 0) == SUCCESS
    assert torch.isnan(out).any()


def test_divergent_warp_collective_is_a_fault(lib):
    out = torch.zeros(32)
    err = lib.vkemu_selftest_divergent(ptr(out))
    assert err == LAUNCH_FAILURE
    assert "divergent warp" in error_text(lib, err)


def test_shared_memory_bounds(lib):
    out = torch.zeros(32)
    assert lib.vkemu_selftest_ldmatrix(ptr(out), 0, 1024, 0) == SUCCESS  # rows 0..7 of 64
    err = lib.vkemu_selftest_ldmatrix(ptr(out), 60, 1024, 0)  # rows 60..67: past the end
    assert err == LAUNCH_FAILURE
    assert "outside the block's 1024 bytes of dynamic shared memory" in error_text(lib, err)


def test_dynamic_shared_memory_limits(lib):
    out = torch.zeros(32)
    err = lib.vkemu_selftest_ldmatrix(ptr(out), 0, 64 * 1024, 0)  # > 48 KiB without the attribute
    assert err == INVALID_VALUE and "MaxDynamicSharedMemorySize" in error_text(lib, err)
    assert lib.vkemu_selftest_ldmatrix(ptr(out), 0, 64 * 1024, 1) == SUCCESS
    assert lib.vkemu_selftest_ldmatrix(ptr(out), 0, 228 * 1024, 1) == INVALID_VALUE  # > 227 KiB (H100)


def test_translator_rewrites_launches_and_extern_shared():
    src = """
__global__ void k(const Args a) { extern __shared__ __align__(16) unsigned char sm[]; }
void f(cudaStream_t s, Args a) {
  k<<<grid, 128, bytes, s>>>(a);
  kern<T, K, VEC>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  k<<<1, 32>>>(a);
}"""
    out = translate_kernel_source(src, "x.cu")
    assert "unsigned char* sm = reinterpret_cast<unsigned char*>(::vkemu::dynamic_smem());" in out
    assert "::vkemu::launch(k, grid, 128, bytes, s, a);" in out
    assert "::vkemu::launch(kern<T, K, VEC>, static_cast<unsigned>(blocks), kThreads, 0, stream, a);" in out
    assert "::vkemu::launch(k, 1, 32, 0, nullptr, a);" in out
