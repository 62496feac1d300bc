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

// The CUDA channel mix keeps a block's slice of Wf transposed in shared memory: rows [row0,
// row0 + rows) of Wf as w_t[j·ld + r] = Wf[row0 + r][j], ld = the slice's row count rounded up to
// ROWS and zero-padded, so that the ROWS weights one input channel feeds are adjacent (one vector
// load instead of ROWS broadcast loads). Entry k of that slice (k < C·ld), for the fill loop.
template <typename acc_t>
GLOW_HD acc_t transposed_slice_entry(const acc_t* weight, int64_t C, int64_t row0, int64_t rows,
                                     int64_t ld, int64_t k) {
  const int64_t j = k / ld, r = k - j * ld;
  return r < rows ? weight[(row0 + r) * C + j] : acc_t(0);
}

// ROWS weights of one input channel, loaded at once from the transposed slice.
template <typename acc_t, int ROWS>
struct alignas(ROWS * sizeof(acc_t)) WeightRow {
  acc_t v[ROWS];
};

// One pixel's outputs rows [0, rows) of a slice: out_r = offset[r] + Σ_j w_t[j·ld + r]·load(j),
// written by store(r, value). ROWS outputs per pass over the pixel's inputs, each input load shared
// by them; offset is padded to ld like the slice.
template <int ROWS, typename acc_t, typename LoadFn, typename StoreFn>
GLOW_HD void mix_pixel_transposed(const acc_t* w_t, int64_t ld, int64_t C, const acc_t* offset,
                                  int64_t rows, LoadFn load, StoreFn store) {
  for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
    acc_t acc[ROWS];
GLOW_UNROLL
    for (int r = 0; r < ROWS; ++r) acc[r] = offset[r0 + r];
    for (int64_t j = 0; j < C; ++j) {
      const acc_t x_j = load(j);
#if defined(__CUDA_ARCH__)
      const WeightRow<acc_t, ROWS> w = *reinterpret_cast<const WeightRow<acc_t, ROWS>*>(w_t + j * ld + r0);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] += w.v[r] * x_j;
#else
GLOW_UNROLL
      for (int r = 0; r < ROWS; ++r) acc[r] += w_t[j * ld + r0 + r] * x_j;
#endif
    }
GLOW_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      if (r0 + r < rows) store(r0 + r, acc[r]);
    }
  }
}

// The chain rule from dL/dWf, dL/dc to the LU parameters (chain_folded in actnorm_invconv.cpp), by
// entries, for the CUDA backend's one-block kernel at small C (one launch instead of ~20 ATen
// launches). Three phases, each a loop over independent indices; the caller separates them:
//   1. per column j: ActNorm's gradients, dL/db = Wfᵀ·dL/dc and dL/dlogs;
//   2. per entry: g_v = Pᵀ·(dL/dWf + dL/dc ⊗ b)·diag(a), row i moved to perm[i];
//   3. per entry: dL/dU' = Lᵀ·g_v on and above the diagonal, dL/dL = g_v·U'ᵀ below it.
template <typename acc_t>
struct ChainArgs {
  const acc_t *bias, *logs, *lower, *upper, *log_s, *sign_s;
  const int64_t* perm;
  const acc_t *grad_folded, *grad_offset;
  const acc_t* folded;                  // Wf, or null when the two terms below are given
  const acc_t *terms_bias, *terms_dot;  // Wfᵀ·dL/dc and Σ_i dL/dWf ⊙ Wf, when folded is null
  const acc_t* grad_logdet_hw;          // one value
  int64_t channels;
  acc_t *grad_bias, *grad_logs, *grad_lower, *grad_upper, *grad_log_s;  // out
};

template <typename acc_t>
GLOW_HD void chain_actnorm_column(const ChainArgs<acc_t>& a, int64_t j) {
  const int64_t C = a.channels;
  acc_t grad_bias = 0, column_dot = 0;
  if (a.folded != nullptr) {
    for (int64_t i = 0; i < C; ++i) {
      grad_bias += a.folded[i * C + j] * a.grad_offset[i];
      column_dot += a.grad_folded[i * C + j] * a.folded[i * C + j];
    }
  } else {
    grad_bias = a.terms_bias[j];
    column_dot = a.terms_dot[j];
  }
  a.grad_bias[j] = grad_bias;
  a.grad_logs[j] = column_dot + grad_bias * a.bias[j] + a.grad_logdet_hw[0];
}

// `scale` holds exp(logs), once per call.
template <typename acc_t>
GLOW_HD void chain_scatter_entry(const ChainArgs<acc_t>& a, const acc_t* scale, acc_t* g_v, int64_t e) {
  const int64_t C = a.channels, i = e / C, j = e - i * C;
  g_v[a.perm[i] * C + j] = (a.grad_folded[e] + a.grad_offset[i] * a.bias[j]) * scale[j];
}

// `diag` holds U''s diagonal sign_s·exp(log_s).
template <typename acc_t>
GLOW_HD void chain_lu_entry(const ChainArgs<acc_t>& a, const acc_t* diag, const acc_t* g_v, int64_t e) {
  const int64_t C = a.channels, r = e / C, k = e - r * C;
  if (k >= r) {  // dL/dU'[r][k] = g_v[r][k] + Σ_{q > r} L[q][r]·g_v[q][k]
    acc_t grad = g_v[e];
    for (int64_t q = r + 1; q < C; ++q) grad += a.lower[q * C + r] * g_v[q * C + k];
    a.grad_upper[e] = k > r ? grad : acc_t(0);
    a.grad_lower[e] = 0;
    if (k == r) a.grad_log_s[r] = grad * diag[r] + a.grad_logdet_hw[0];
  } else {  // dL/dL[r][k] = g_v[r][k]·s[k] + Σ_{j > k} g_v[r][j]·U[k][j]
    acc_t grad = g_v[e] * diag[k];
    for (int64_t j = k + 1; j < C; ++j) grad += g_v[r * C + j] * a.upper[k * C + j];
    a.grad_lower[e] = grad;
    a.grad_upper[e] = 0;
  }
}

}  // namespace math
}  // namespace glow_ext
