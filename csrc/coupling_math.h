// Per-element math of the fused affine coupling, shared by the CPU and CUDA kernels.
//
// With u = z + 2 (z the scale logit) and e = exp(-|u|) <= 1, every quantity is formed without
// overflow or cancellation at any logit:
//   sigmoid(u)      s   = (u >= 0 ? 1 : e) / (1 + e)
//   1 - sigmoid(u)  s_c = (u >= 0 ? e : 1) / (1 + e)
//   log sigmoid(u)      = min(u, 0) - log(1 + e)                  (the softplus form)
//   1 / sigmoid(u)      = u >= 0 ? 1 + e : (1 + e) / e
//   exp(-u)             = u >= 0 ? e : 1 / e
// The CPU kernels call these on scalars inside `omp simd` loops (GCC vectorises them, including the
// polynomial exp below), the CUDA kernels once per thread. Header-only, no ATen.
#pragma once

#include <cstdint>

#include "glow_ext_math.h"

namespace glow_ext {
namespace math {

template <typename T>
struct ExpTraits;

// Cody-Waite reduction x = n·ln2 + r, |r| <= ln2/2, then a Taylor polynomial for exp(r): degree 7
// (float, truncation < 2^-27) and 13 (double, < 2^-57).
template <>
struct ExpTraits<float> {
  using bits_t = int32_t;
  static constexpr int kMantissaBits = 23, kBias = 127, kDegree = 7;
  static constexpr float kMin = -104.0f;  // exp(-104) < the smallest subnormal float: 0
  static constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
};

template <>
struct ExpTraits<double> {
  using bits_t = int64_t;
  static constexpr int kMantissaBits = 52, kBias = 1023, kDegree = 13;
  static constexpr double kMin = -746.0;
  static constexpr double kRound = 6755399441055744.0;  // 1.5·2^52
  static constexpr double kLn2Hi = 0.693147180369123816490, kLn2Lo = 1.90821492927058770002e-10;
};

template <typename T>
GLOW_HD T from_bits(typename ExpTraits<T>::bits_t bits) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __int_as_float(bits);
  } else {
    return __longlong_as_double(bits);
  }
#else
  return __builtin_bit_cast(T, bits);
#endif
}

// 1 + r/K·(1 + r/(K+1)·(… (1 + r/D))): the Taylor series of exp(r) to degree D for K = 1, nested
// with compile-time coefficients.
template <int K, int D, typename T>
GLOW_HD T taylor_exp(T r) {
  if constexpr (K > D) {
    return T(1);
  } else {
    return T(1) + r * (T(1) / T(K)) * taylor_exp<K + 1, D>(r);
  }
}

// exp(x) for x <= 0 (the only range the coupling needs), within ~2 ulp, subnormal results included,
// branch-free so that it vectorises; NaN propagates. The C library's exp is not vectorised by GCC
// without -ffast-math, and a scalar call per element costs more than the whole coupling step (see
// README, "Fused affine coupling"); on CUDA it is a handful of FMAs, like expf itself.
template <typename T>
GLOW_HD T exp_nonpositive(T x) {
  using Tr = ExpTraits<T>;
  using bits_t = typename Tr::bits_t;
  constexpr T kLog2e = T(1.4426950408889634074);
  x = x < Tr::kMin ? T(Tr::kMin) : x;
  const T n = (x * kLog2e + Tr::kRound) - Tr::kRound;
  const T r = (x - n * T(Tr::kLn2Hi)) - n * T(Tr::kLn2Lo);
  const T p = taylor_exp<1, Tr::kDegree>(r);
  // 2^n in two factors, each a normal number for n >= -2·(bias - 1): subnormal results round once.
  // int32 for both types: GCC vectorises double -> int32 on AVX2, double -> int64 only on AVX-512.
  const int32_t n_int = static_cast<int32_t>(n);
  const int32_t half_exponent = n_int / 2;
  const T scale_a = from_bits<T>(static_cast<bits_t>(half_exponent + Tr::kBias) << Tr::kMantissaBits);
  const T scale_b = from_bits<T>(static_cast<bits_t>(n_int - half_exponent + Tr::kBias) << Tr::kMantissaBits);
  return p * scale_a * scale_b;
}

// sigmoid(z + 2) and what its derivatives and logarithm need, for one scale logit z.
template <typename T>
struct ScaleParts {
  T u;      // z + 2
  T e;      // exp(-|u|)
  T denom;  // 1 + e
  GLOW_HD bool positive() const { return u >= T(0); }
  GLOW_HD T scale() const { return (positive() ? T(1) : e) / denom; }
  GLOW_HD T complement() const { return (positive() ? e : T(1)) / denom; }  // 1 - scale
  // Selects feed the divisions rather than pick between them, so that the compiler can vectorise
  // without speculating a division that could trap.
  GLOW_HD T inverse_scale() const { return denom / (positive() ? T(1) : e); }
  GLOW_HD T exp_neg_u() const { return (positive() ? e : T(1)) / (positive() ? T(1) : e); }
  // log sigmoid(u) = negative_part() - log(denom).
  GLOW_HD T negative_part() const { return positive() ? T(0) : u; }
};

template <typename T>
GLOW_HD ScaleParts<T> scale_parts(T z) {
  const T u = z + T(2);
  const T e = exp_nonpositive(u < T(0) ? u : -u);
  return {u, e, T(1) + e};
}

// Forward: y = (x + t)·s. Its log-scale is parts.negative_part() - log(parts.denom).
template <typename T>
GLOW_HD T coupling_forward(T x, T t, const ScaleParts<T>& parts) {
  return (x + t) * parts.scale();
}

// Inverse: x = y / s - t.
template <typename T>
GLOW_HD T coupling_inverse(T y, T t, const ScaleParts<T>& parts) {
  return y * parts.inverse_scale() - t;
}

// Gradients of the forward at (x, t, z) for dL/dy = g and dL/dlogdet = g_logdet (the sample's):
// dL/dx = dL/dt = g·s, dL/dz = (g·y + g_logdet)·(1 - s).
template <typename T>
struct CouplingGrads {
  T input, shift, logit;
};

template <typename T>
GLOW_HD CouplingGrads<T> coupling_backward(T g, T g_logdet, T x, T t, const ScaleParts<T>& parts) {
  const T s = parts.scale();
  const T y = (x + t) * s;
  const T g_x = g * s;
  return {g_x, g_x, (g * y + g_logdet) * parts.complement()};
}

// Gradients of the inverse x = y/s - t at (y, t, z) for dL/dx = g:
// dL/dy = g/s, dL/dt = -g, dL/dz = -g·y·exp(-u)  (d(1/s)/du = -exp(-u)).
template <typename T>
GLOW_HD CouplingGrads<T> coupling_inverse_backward(T g, T y, const ScaleParts<T>& parts) {
  return {g * parts.inverse_scale(), -g, -g * y * parts.exp_neg_u()};
}

// Which of the four ops a kernel runs.
enum class CouplingMode { kForward, kInverse, kBackward, kInverseBackward };

// One sample's rows of a call: `size` = C·H·W elements each, contiguous. Inputs may sit at any
// sample stride (channel slices of a larger tensor need no copy); outputs are contiguous. h may be
// narrower than the input (a 16-bit network output applied to the float32 flow state).
template <typename input_t, typename h_t, typename acc_t>
struct SampleRows {
  const input_t* input;  // x_b (forward, backward) or y_b (inverse, inverse backward)
  const h_t* shift;      // h's first half
  const h_t* logit;      // h's second half
  const input_t* grad;   // backward modes: dL/d(output of the differentiated op)
  acc_t grad_logdet;     // kBackward: the sample's dL/dlogdet
  input_t* out;          // y_b, x_b, or dL/d(input)
  h_t* grad_shift;       // backward modes: dL/dh, first half
  h_t* grad_logit;       // backward modes: dL/dh, second half
};

// A call's tensors as raw pointers and sample strides (outputs are contiguous: per_sample elements per
// sample for `out`, 2·per_sample for `grad_h`). Pointers a mode does not use are null.
template <typename input_t, typename h_t, typename acc_t>
struct CouplingPointers {
  const input_t* input;
  const h_t* h;
  const input_t* grad;
  const acc_t* grad_logdet;
  input_t* out;
  h_t* grad_h;
  int64_t input_stride, h_stride, grad_stride;
  int64_t per_sample;  // C·H·W of x_b; not `half`, which is CUDA's 16-bit float type

  // Sample n's rows, starting at element `begin`.
  GLOW_HD SampleRows<input_t, h_t, acc_t> rows(int64_t n, int64_t begin) const {
    const h_t* h_n = h + n * h_stride + begin;
    h_t* grad_h_n = grad_h ? grad_h + n * 2 * per_sample + begin : nullptr;
    return {input + n * input_stride + begin,
            h_n,
            h_n + per_sample,
            grad ? grad + n * grad_stride + begin : nullptr,
            grad_logdet ? grad_logdet[n] : acc_t(0),
            out + n * per_sample + begin,
            grad_h_n,
            grad_h_n ? grad_h_n + per_sample : nullptr};
  }
};

// Element i of a sample for any mode: every load widened to acc_t, the arithmetic in acc_t, each
// store narrowed once. Returns the scale's parts so that the forward's caller can reduce
// log sigmoid = negative_part - log(denom) in its own way.
template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>
GLOW_HD ScaleParts<acc_t> coupling_element(const SampleRows<input_t, h_t, acc_t>& r, int64_t i) {
  const acc_t t = static_cast<acc_t>(r.shift[i]);
  const ScaleParts<acc_t> parts = scale_parts(static_cast<acc_t>(r.logit[i]));
  const acc_t v = static_cast<acc_t>(r.input[i]);
  if constexpr (kMode == CouplingMode::kForward) {
    r.out[i] = static_cast<input_t>(coupling_forward(v, t, parts));
  } else if constexpr (kMode == CouplingMode::kInverse) {
    r.out[i] = static_cast<input_t>(coupling_inverse(v, t, parts));
  } else {
    const acc_t g = static_cast<acc_t>(r.grad[i]);
    const CouplingGrads<acc_t> grads = kMode == CouplingMode::kBackward
                                           ? coupling_backward(g, r.grad_logdet, v, t, parts)
                                           : coupling_inverse_backward(g, v, parts);
    r.out[i] = static_cast<input_t>(grads.input);
    r.grad_shift[i] = static_cast<h_t>(grads.shift);
    r.grad_logit[i] = static_cast<h_t>(grads.logit);
  }
  return parts;
}

}  // namespace math
}  // namespace glow_ext
