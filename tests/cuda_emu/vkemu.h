// vkemu — a CPU emulator for the CUDA C++ kernels in csrc/kernels, for machines without a GPU.
//
// Force-included (g++ -include vkemu.h) into every translated source file, before anything else.
// It takes the CUDA toolkit's host headers (types, enums, half/bfloat16 arithmetic) and replaces
// what only a GPU has:
//   * every CUDA thread is a fiber; a block's threads run in one OS thread, in lock-step only at
//     synchronisation points (__syncthreads, warp collectives), one after another in between
//     (VKEMU_SCHEDULE=reverse runs them in the opposite order); blocks are spread over
//     VKEMU_THREADS worker threads (default: all cores);
//   * warp collectives (__shfl_xor_sync, __syncwarp, ldmatrix, mma.sync) wait for all 32 lanes and
//     compute the warp's result from every lane's inputs, with the PTX ISA's fragment layouts;
//   * cp.async copies are queued per thread and land only when a cp.async.wait_group retires
//     their group, so a missing wait reads stale (poisoned) shared memory;
//   * dynamic shared memory is poisoned (0xFF bytes: NaN in every float type) at block start;
//   * faults (deadlock, divergent collective, shared-memory address out of range, misaligned
//     cp.async / ldmatrix, __trap, cp.async left pending at exit) stop the launch, and
//     cudaGetLastError() / cudaGetErrorString() report them.
// The host API the kernels' launchers call (cudaFuncSetAttribute, cudaGetLastError,
// cudaDeviceGetAttribute, ...) is implemented in vkemu.cpp with H100-like limits.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

// CUDA declaration specifiers become plain C++ (the toolkit's host_defines.h maps them to
// attributes g++ does not know).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static __shared__ arrays: each emulator worker thread runs one block at a time, so a
// function-local thread_local is exactly "one copy per block" (the translator rewrites
// `extern __shared__` declarations).
#define __shared__ static thread_local

namespace vkemu {

// A fault inside a kernel: records `what` and abandons the launch (never returns).
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

struct ThreadPos {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadPos& pos();  // of the running fiber

unsigned char* dynamic_smem();  // this block's `extern __shared__` buffer

void syncthreads();
void syncwarp(unsigned mask);
uint32_t shfl_xor(unsigned mask, uint32_t value, int lane_mask, int width);

// PTX instructions (semantics of the PTX ISA for sm_80+), used by the emulated ptx_sm80.cuh.
void cp_async_16(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans);
enum class MmaType { kF16, kBF16 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type);

// Runs `body` once per thread of every block of the grid; fails the launch (see cudaGetLastError)
// on an invalid configuration or a kernel fault.
struct KernelBody {
  virtual void run() = 0;
  virtual ~KernelBody() = default;
};
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, KernelBody& body);

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch(kernel, grid, block, smem, stream,
// args...): the arguments are converted to the kernel's parameter types once, as CUDA copies them
// into the parameter buffer, and every thread sees that copy.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t /*stream*/,
            Args&&... args) {
  struct Body final : KernelBody {
    void (*fn)(Params...);
    std::tuple<std::decay_t<Params>...> params;
    Body(void (*f)(Params...), Args&&... a) : fn(f), params(std::forward<Args>(a)...) {}
    void run() override { std::apply(fn, params); }
  } body(kernel, std::forward<Args>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, body);
}

}  // namespace vkemu

// cuda_runtime.h declares this typed overload only for nvcc.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#define threadIdx (::vkemu::pos().thread_idx)
#define blockIdx (::vkemu::pos().block_idx)
#define blockDim (::vkemu::pos().block_dim)
#define gridDim (::vkemu::pos().grid_dim)

inline void __syncthreads() { ::vkemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::vkemu::syncwarp(mask); }
[[noreturn]] inline void __trap() { ::vkemu::fail("__trap() called"); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = ::vkemu::shfl_xor(mask, bits, lane_mask, width);
  std::memcpy(&v, &bits, 4);
  return v;
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  return static_cast<int>(::vkemu::shfl_xor(mask, static_cast<uint32_t>(v), lane_mask, width));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
  return ::vkemu::shfl_xor(mask, v, lane_mask, width);
}

// Device-side integer min/max (CUDA provides them unqualified).
using std::max;
using std::min;

// Single-precision arithmetic rounded to nearest per operation (nvcc never contracts these into an
// FMA). Out of line so that g++ cannot contract them either once inlined into a caller.
[[gnu::noinline]] inline float __fmul_rn(float a, float b) { return a * b; }
[[gnu::noinline]] inline float __fadd_rn(float a, float b) { return a + b; }
[[gnu::noinline]] inline float __fsub_rn(float a, float b) { return a - b; }
