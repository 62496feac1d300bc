// bfloat16 storage in the CPU kernels, which compute in float32 and round each output once.
//
// Widening is a 16-bit shift. Rounding is to nearest even, NaN kept a (quiet) NaN of the same
// sign: with AVX512-BF16 (checked at run time, like the kernels' instruction sets) one vcvtneps2bf16
// per 16 values, elsewhere the same rounding in integer arithmetic. The instruction ignores MXCSR
// and flushes subnormal inputs to signed zero, so magnitudes below 2^-126 become ±0 on such CPUs
// and are rounded elsewhere. Both directions are written on the bits with __builtin_bit_cast:
// c10::BFloat16's conversions go through memcpy into a local, which keeps GCC from vectorising the
// `omp simd` loops around them.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace glow_ext {
namespace cpu {

// A bfloat16 as the loops read it (same layout as c10::BFloat16, whose tensors they point into).
struct BFloat16Bits {
  uint16_t bits;
  inline __attribute__((always_inline)) operator float() const {
    return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
  }
};
static_assert(sizeof(BFloat16Bits) == sizeof(c10::BFloat16));

// The storage type the loops use for a tensor element type: BFloat16Bits for c10::BFloat16.
template <typename T>
struct LoopTypeOf {
  using type = T;
};
template <>
struct LoopTypeOf<c10::BFloat16> {
  using type = BFloat16Bits;
};
template <typename T>
using LoopType = typename LoopTypeOf<T>::type;

inline __attribute__((always_inline)) BFloat16Bits round_to_bfloat16(float value) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, value);
  const uint32_t nearest_even = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return {static_cast<uint16_t>(value != value ? quiet_nan : nearest_even)};
}

inline bool detect_avx512_bf16() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline const bool kHasAvx512Bf16 = detect_avx512_bf16();

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void round_to_bfloat16_avx512(
    const float* src, BFloat16Bits* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &rounded, sizeof(rounded));
  }
  if (i < count) {
    const auto tail = static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, src + i));
    _mm256_mask_storeu_epi16(dst + i, tail, reinterpret_cast<const __m256i&>(rounded));
  }
}
#endif

inline void round_to_bfloat16_portable(const float* src, BFloat16Bits* dst, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = round_to_bfloat16(src[i]);
}

// dst[i] = src[i] rounded to bfloat16, i < count.
inline void round_to_bfloat16(const float* src, BFloat16Bits* dst, int64_t count) {
#if defined(__x86_64__)
  if (kHasAvx512Bf16) return round_to_bfloat16_avx512(src, dst, count);
#endif
  round_to_bfloat16_portable(src, dst, count);
}

}  // namespace cpu
}  // namespace glow_ext
