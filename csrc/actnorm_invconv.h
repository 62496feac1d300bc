// Device-generic algorithm of the fused ActNorm + LU 1x1 convolution ops.
//
// Everything that is not a pass over the pixels (validation, the choice between the folded and the
// factored path, C x C weight algebra, the chain rule to the LU parameters) is written once here
// with ATen ops; each backend file supplies the per-pixel kernels and registers the ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <tuple>

namespace glow_ext {

// Every op's input is (N, C, *spatial): a sequence (N, C, T), an image (N, C, H, W), a volume, or
// plain feature vectors (N, C). The per-position loops see it as (N, C, M).

// M: the positions per sample, the product of the spatial sizes (1 for an (N, C) input).
inline int64_t positions_per_sample(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(2));
}

struct LUParams {
  const at::Tensor& bias;    // (C,)
  const at::Tensor& logs;    // (C,)
  const at::Tensor& perm;    // (C,) int64
  const at::Tensor& lower;   // (C, C), strict lower part used
  const at::Tensor& upper;   // (C, C), strict upper part used
  const at::Tensor& log_s;   // (C,)
  const at::Tensor& sign_s;  // (C,)
};

// Folded per-pixel affine map y = weight·x + offset, in the accumulation dtype.
struct ChannelMap {
  at::Tensor weight;  // (C, C)
  at::Tensor offset;  // (C,)
};

// Gradients of the parameters, in their dtype.
struct ParamGrads {
  at::Tensor bias, logs, lower, upper, log_s;
};

// The two terms of the chain rule that read Wf: Wfᵀ·dL/dc and the column sums of dL/dWf ⊙ Wf.
struct FoldedTerms {
  at::Tensor grad_bias, column_dot;
};

struct Backend {
  // y[n, :, p] = map.weight · x[n, :, p] + map.offset for a contiguous (N, C, *spatial) x; y has x's
  // shape and dtype.
  at::Tensor (*channel_mix)(const at::Tensor& x, const ChannelMap& map);
  // The forward map Wf, c where the backend's own loop beats the generic ATen assembly (its ~10
  // launches at small C; on the CPU, its dense product at every C). Returns false to fall back.
  bool (*fold_forward)(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out);
  // Optional: the chain rule from dL/dWf, dL/dc (and the logdet's gradient times M) to the LU
  // parameters, given Wf (`folded`) or, when it is undefined, its two terms. Returns false to fall
  // back to the generic ATen version.
  bool (*chain)(const LUParams& p, const at::Tensor& grad_folded, const at::Tensor& grad_offset,
                const at::Tensor& folded, const FoldedTerms& terms, const at::Tensor& grad_logdet_m,
                ParamGrads& out) = nullptr;
  // Optional: the backward's pass over the pixels. out = weight·src per pixel (no offset) and, in
  // the same sweep, grad_folded = Σ_pixels a·xᵀ (C, C) and grad_offset = Σ_pixels a (C,) in the
  // accumulation dtype, where a is src, or out when outer_of_out. Contiguous inputs. Returns
  // false to use channel_mix and a batched GEMM instead.
  bool (*mix_outer)(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& x,
                    bool outer_of_out, at::Tensor& out, at::Tensor& grad_folded,
                    at::Tensor& grad_offset) = nullptr;
  // Optional: the inverse map (Wf⁻¹ and −bias) where the backend's own loop is faster, as fold_forward.
  bool (*fold_inverse)(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) = nullptr;
  // Optional: checks on the device that perm is a permutation, for devices where check_inputs'
  // host check would synchronise (it runs only for CPU tensors).
  void (*validate_permutation)(const at::Tensor& perm) = nullptr;
};

// Validates every argument; `op` and `input_name` name the op and its image argument in messages.
// perm is checked on the host for CPU tensors and by backend.validate_permutation elsewhere.
void check_inputs(const Backend& backend, const char* op, const char* input_name,
                  const at::Tensor& x, const LUParams& p);

at::ScalarType accumulation_dtype(const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor> forward(const Backend& backend, const at::Tensor& x,
                                           const LUParams& p);

// The forward for training: also returns the folded map Wf (C, C) in the accumulation dtype, for
// the backward to reuse instead of re-assembling it; (0, C) on the factored path, which has none.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(const Backend& backend,
                                                             const at::Tensor& x, const LUParams& p);

at::Tensor inverse(const Backend& backend, const at::Tensor& y, const LUParams& p);

// The inverse for training: also returns Wf⁻¹ (C, C) (or the (0, C) placeholder), as above.
std::tuple<at::Tensor, at::Tensor> inverse_train(const Backend& backend, const at::Tensor& y,
                                                 const LUParams& p);

// Returns (grad_x, grad_bias, grad_logs, grad_lower, grad_upper, grad_log_s). `folded`, if given,
// is forward_train's map for these parameters.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Backend& backend, const at::Tensor& grad_y, const at::Tensor& grad_logdet,
    const at::Tensor& x, const LUParams& p, const std::optional<at::Tensor>& folded);

// Gradients through the inverse op x = inverse(y): from dL/dx and the inverse's output x, returns
// (grad_y, grad_bias, grad_logs, grad_lower, grad_upper, grad_log_s). `folded_inverse`, if given,
// is inverse_train's map for these parameters.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> inverse_backward(
    const Backend& backend, const at::Tensor& grad_x, const at::Tensor& x, const LUParams& p,
    const std::optional<at::Tensor>& folded_inverse);

// y[n, :, p] = weight·x[n, :, p] + offset for a map the caller precomputed (e.g. a cached inverse);
// weight (C, C) and offset (C,) in x's accumulation dtype.
at::Tensor channel_map(const Backend& backend, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& offset);

// The op signatures declared in ops.cpp, bound to one backend for TORCH_LIBRARY_IMPL.
template <const Backend& kBackend>
struct BoundOps {
  static std::tuple<at::Tensor, at::Tensor> forward_op(
      const at::Tensor& x, const at::Tensor& bias, const at::Tensor& logs, const at::Tensor& perm,
      const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_s,
      const at::Tensor& sign_s) {
    return forward(kBackend, x, {bias, logs, perm, lower, upper, log_s, sign_s});
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_op(
      const at::Tensor& x, const at::Tensor& bias, const at::Tensor& logs, const at::Tensor& perm,
      const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_s,
      const at::Tensor& sign_s) {
    return forward_train(kBackend, x, {bias, logs, perm, lower, upper, log_s, sign_s});
  }
  static std::tuple<at::Tensor, at::Tensor> inverse_train_op(
      const at::Tensor& y, const at::Tensor& bias, const at::Tensor& logs, const at::Tensor& perm,
      const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_s,
      const at::Tensor& sign_s) {
    return inverse_train(kBackend, y, {bias, logs, perm, lower, upper, log_s, sign_s});
  }
  static at::Tensor inverse_op(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& logs,
                               const at::Tensor& perm, const at::Tensor& lower,
                               const at::Tensor& upper, const at::Tensor& log_s,
                               const at::Tensor& sign_s) {
    return inverse(kBackend, y, {bias, logs, perm, lower, upper, log_s, sign_s});
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  backward_op(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x,
              const at::Tensor& bias, const at::Tensor& logs, const at::Tensor& perm,
              const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_s,
              const at::Tensor& sign_s, const std::optional<at::Tensor>& folded) {
    return backward(kBackend, grad_y, grad_logdet, x,
                    {bias, logs, perm, lower, upper, log_s, sign_s}, folded);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  inverse_backward_op(const at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& bias,
                      const at::Tensor& logs, const at::Tensor& perm, const at::Tensor& lower,
                      const at::Tensor& upper, const at::Tensor& log_s, const at::Tensor& sign_s,
                      const std::optional<at::Tensor>& folded_inverse) {
    return inverse_backward(kBackend, grad_x, x, {bias, logs, perm, lower, upper, log_s, sign_s},
                            folded_inverse);
  }
  static at::Tensor channel_map_op(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& offset) {
    return channel_map(kBackend, x, weight, offset);
  }
};

// Instruction set the CPU channel-mix loop was dispatched to on this machine.
const char* cpu_kernel_isa();

// Below this size a dense mm on a masked triangular block is cheaper than recursing (trmm); also
// the C above which the factored path is taken.
constexpr int64_t kTrmmBlock = 192;

// True when the per-call O(C^3) weight assembly would cost more than applying the triangular
// factors to the N·M positions directly (deep Glow levels: large C, few pixels).
bool use_factored_path(int64_t channels, int64_t pixels);

}  // namespace glow_ext
