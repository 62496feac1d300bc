// Per-element math of the fused ActNorm + LU 1x1 convolution, shared by the CPU and CUDA kernels.
//
// The CPU kernels instantiate these templates with SIMD lane types (GCC vector extensions) and the
// CUDA kernels with plain scalars, so the CPU tests exercise the same arithmetic the GPU runs.
// Header-only, no ATen: it must compile under nvcc and in ISA-specific CPU code.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define GLOW_HD __host__ __device__ __forceinline__
#else
#define GLOW_HD inline __attribute__((always_inline))
#endif
#if defined(__CUDA_ARCH__)
#define GLOW_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define GLOW_UNROLL  // host pass of nvcc: neither pragma is understood there
#else
#define GLOW_UNROLL _Pragma("GCC unroll 8")
#endif

namespace glow_ext {
namespace math {

// Layout conventions (all row-major C x C):
//   L  = I + strict_lower(lower)               unit lower triangular
//   U' = strict_upper(upper) + diag(s),  s = sign_s * exp(log_s)
//   W  = P L U',  (P v)[i] = v[perm[i]]  =>  W[i][j] = sum_{k <= min(perm[i], j)} L[perm[i]][k] U'[k][j]

// W[i][j] in O(min(perm[i], j)) without materialising L or U'. `diag` holds U''s diagonal
// s = sign_s·exp(log_s), computed once per call rather than once per entry.
template <typename acc_t, typename param_t>
GLOW_HD acc_t lu_weight_entry(const param_t* lower, const param_t* upper, const acc_t* diag,
                              const int64_t* perm, int64_t C, int64_t i, int64_t j) {
  const int64_t r = perm[i];
  // k == r term, L[r][r] = 1.
  acc_t w = r < j ? static_cast<acc_t>(upper[r * C + j]) : (r == j ? diag[j] : acc_t(0));
  // k < min(r, j): strict parts of both factors.
  const int64_t k_end = r < j ? r : j;
  for (int64_t k = 0; k < k_end; ++k) {
    w += static_cast<acc_t>(lower[r * C + k]) * static_cast<acc_t>(upper[k * C + j]);
  }
  // k == j < r: U''s diagonal.
  if (j < r) w += static_cast<acc_t>(lower[r * C + j]) * diag[j];
  return w;
}

// ROWS consecutive output channels at one group of pixels: out[r] = offset[r] + sum_j w[r][j]·x_j,
// where load(j) returns input channel j for those pixels (a scalar on CUDA, a SIMD lane on CPU).
// Sharing each load across ROWS outputs is what keeps the CPU loop FMA-bound instead of load-bound.
template <int ROWS, typename lane_t, typename acc_t, typename LoadFn>
GLOW_HD void mix_rows(const acc_t* w, int64_t C, const acc_t* offset, LoadFn load, lane_t* out) {
  lane_t acc[ROWS];
GLOW_UNROLL
  for (int r = 0; r < ROWS; ++r) acc[r] = lane_t{} + offset[r];
  for (int64_t j = 0; j < C; ++j) {
    const lane_t x_j = load(j);
GLOW_UNROLL
    for (int r = 0; r < ROWS; ++r) acc[r] += w[r * C + j] * x_j;
  }
GLOW_UNROLL
  for (int r = 0; r < ROWS; ++r) out[r] = acc[r];
}

}  // namespace math
}  // namespace glow_ext
