// Small CUDA kernels that pin down what the vkemu emulator does: the tensor-core fragment layouts
// and cp.async / ldmatrix semantics the csrc kernels rely on, and the faults it must report.
// tests/cuda/test_cuda_emulator.py builds this file through the same translator as csrc/ and calls the
// extern "C" entry points with ctypes. Plain CUDA: it also compiles with nvcc.
#include <cuda_runtime.h>

#include "ptx_sm80.cuh"

using namespace vitkernels::ptx;

// C (16x8, fp32, row-major) = A (16x16, row-major) · B (16x8, row-major K x N), loaded the way the
// attention kernels load Q (ldmatrix) and V (ldmatrix.trans), one warp.
template <typename T>
__global__ void mma_tile_kernel(const T* a, const T* b, float* c) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + 16 * 16;
  const int lane = threadIdx.x;
  cp_async_16(sA + lane * 8, a + lane * 8, 16);  // 32 chunks of 8 elements
  if (lane < 16) cp_async_16(sB + lane * 8, b + lane * 8, 16);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t af[4], bf[4];
  ldmatrix_x4(af, sA + (lane & 15) * 16 + (lane >> 4) * 8);
  ldmatrix_x4_trans(bf, sB + (lane & 15) * 8);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  Mma<T>::run(d, af, bf[0], bf[1]);
  const int g = lane >> 2, t = lane & 3;
  c[g * 8 + 2 * t] = d[0];
  c[g * 8 + 2 * t + 1] = d[1];
  c[(g + 8) * 8 + 2 * t] = d[2];
  c[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Each thread copies 4 floats into shared memory with cp.async and reads its neighbour's 4 after a
// barrier. wait: 1 = waits for its copy before the barrier (correct), 0 = only after reading,
// 2 = never.
__global__ void cp_async_kernel(const float* src, float* dst, int wait) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int i = threadIdx.x;
  cp_async_16(s + 4 * i, src + 4 * i, 16);
  cp_async_commit();
  if (wait == 1) cp_async_wait_all();
  __syncthreads();
  const int j = (i + 1) % static_cast<int>(blockDim.x);
  for (int e = 0; e < 4; ++e) dst[4 * i + e] = s[4 * j + e];
  if (wait == 0) cp_async_wait_all();
}

// Thread i writes s[i] and reads s[n - 1 - i], with or without a barrier between.
__global__ void barrier_kernel(float* out, int sync) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int i = threadIdx.x;
  s[i] = static_cast<float>(i);
  if (sync) __syncthreads();
  out[i] = s[blockDim.x - 1 - i];
}

// out[i] = value of lane i ^ mask.
__global__ void shfl_kernel(float* out, int mask) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), mask);
}

// Half the warp shuffles while the other half waits at __syncwarp: a divergent collective.
__global__ void divergent_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = v;
}

// ldmatrix from a row `row` of 8 halves past the start of the dynamic shared memory.
__global__ void ldmatrix_kernel(float* out, int row) {
  extern __shared__ __align__(16) unsigned char smem[];
  __half* s = reinterpret_cast<__half*>(smem);
  uint32_t r[4];
  ldmatrix_x4(r, s + (row + (threadIdx.x & 7)) * 8);
  out[threadIdx.x] = static_cast<float>(r[0] & 1u);
}

extern "C" {

int vkemu_selftest_mma(int bf16, const void* a, const void* b, float* c) {
  const int smem = (16 * 16 + 16 * 8) * 2;
  if (bf16) {
    mma_tile_kernel<__nv_bfloat16>
        <<<1, 32, smem>>>(static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), c);
  } else {
    mma_tile_kernel<__half><<<1, 32, smem>>>(static_cast<const __half*>(a), static_cast<const __half*>(b), c);
  }
  return static_cast<int>(cudaGetLastError());
}

int vkemu_selftest_cp_async(const float* src, float* dst, int threads, int wait) {
  cp_async_kernel<<<1, threads, threads * 16>>>(src, dst, wait);
  return static_cast<int>(cudaGetLastError());
}

int vkemu_selftest_barrier(float* out, int threads, int sync) {
  barrier_kernel<<<1, threads, threads * 4>>>(out, sync);
  return static_cast<int>(cudaGetLastError());
}

int vkemu_selftest_shfl(float* out, int mask) {
  shfl_kernel<<<1, 32>>>(out, mask);
  return static_cast<int>(cudaGetLastError());
}

int vkemu_selftest_divergent(float* out) {
  divergent_kernel<<<1, 32>>>(out);
  return static_cast<int>(cudaGetLastError());
}

int vkemu_selftest_ldmatrix(float* out, int row, int smem_bytes, int set_attribute) {
  if (set_attribute) {
    const cudaError_t err =
        cudaFuncSetAttribute(ldmatrix_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  ldmatrix_kernel<<<1, 32, smem_bytes>>>(out, row);
  return static_cast<int>(cudaGetLastError());
}

const char* vkemu_selftest_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
