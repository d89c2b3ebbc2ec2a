// vkemu's stand-in for csrc/kernels/ptx_sm80.cuh: the same functions, with the inline PTX
// replaced by the emulator's implementation of each instruction (vkemu.cpp). The translator puts
// this file in place of the original in the translated source tree; everything else in the
// kernels is compiled unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#define VK_SM80 1

namespace vitkernels {
namespace ptx {

inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));  // only used to form PTX operands
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) { ::vkemu::cp_async_16(dst, src, src_bytes); }
inline void cp_async_commit() { ::vkemu::cp_async_commit(); }
inline void cp_async_wait_all() { ::vkemu::cp_async_wait(0); }  // cp.async.wait_group 0
template <int kPending>
inline void cp_async_wait() {
  ::vkemu::cp_async_wait(kPending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::vkemu::ldmatrix_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ::vkemu::ldmatrix_x4(r, p, true); }

// D(16x8 f32) += A(16x16) · B(16x8), A row-major, B column-major, fp16 or bf16 inputs.
template <typename T>
struct Mma {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma.m16n8k16 takes fp16 or bf16");
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ::vkemu::mma_m16n8k16(d, a, b0, b1,
                          std::is_same<T, __half>::value ? ::vkemu::MmaType::kF16 : ::vkemu::MmaType::kBF16);
  }
  static T round(float x) {  // explicit: kernels build with __CUDA_NO_HALF_CONVERSIONS__, as torch's do
    if constexpr (std::is_same<T, __half>::value) {
      return __float2half_rn(x);
    } else {
      return __float2bfloat16_rn(x);
    }
  }
  // Two values rounded to nearest-even into one register, lo in the low 16 bits.
  static uint32_t pack(float lo, float hi) {
    const T pair[2] = {round(lo), round(hi)};
    uint32_t u;
    std::memcpy(&u, pair, 4);
    return u;
  }
};

}  // namespace ptx
}  // namespace vitkernels
