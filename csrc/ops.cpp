// Op schemas (declared once, implemented per backend), and the helper ops that say how the library
// was built. Python reaches all of them through torch.ops.glow_ext only (csrc/python_module.cpp
// merely makes the library importable), so the built module does not depend on the Python version.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "actnorm_invconv.h"
#include "cpu/bfloat16_cpu.h"
#include "cuda_launch_plan.h"
#include "glow_ext_math.h"

#ifndef GLOW_EXT_CUDA_ARCHS
#define GLOW_EXT_CUDA_ARCHS ""
#endif
#ifndef GLOW_EXT_TORCH_VERSION
#define GLOW_EXT_TORCH_VERSION "unknown"
#endif

namespace {

std::string json_string(const std::string& text) {
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') quoted += '\\';
    quoted += c;
  }
  return quoted + "\"";
}

// A JSON object: cpu_kernels, cpu_isa, cuda_kernels, cuda_archs, torch_version (the torch compiled against).
std::string build_info() {
#ifdef GLOW_EXT_WITH_CUDA
  const bool cuda_kernels = true;
#else
  const bool cuda_kernels = false;
#endif
  return std::string("{\"cpu_kernels\": true, \"cpu_isa\": ") + json_string(glow_ext::cpu_kernel_isa()) +
         ", \"cuda_kernels\": " + (cuda_kernels ? "true" : "false") +
         ", \"cuda_archs\": " + json_string(GLOW_EXT_CUDA_ARCHS) +
         ", \"torch_version\": " + json_string(GLOW_EXT_TORCH_VERSION) + "}";
}

// use_factored_path(C, pixels) is C > this and pixels < C; the fake kernels in glow_ext.ops mirror it.
int64_t factored_path_channels() { return glow_ext::kTrmmBlock; }

// W = P·L·U' entry by entry with CUDA's small-C fold formula (glow_ext_math.h), on the host: the CPU
// folds with its own loops, so this is how the CPU tests reach the formula.
at::Tensor lu_weight_entries(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                             const at::Tensor& log_s, const at::Tensor& sign_s) {
  const int64_t C = lower.size(0);
  for (const at::Tensor* t : {&lower, &upper, &log_s, &sign_s}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble, "_lu_weight_entries: float64 tensors");
  }
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.numel() == C && lower.sizes() == upper.sizes() &&
                  lower.dim() == 2 && lower.size(1) == C && log_s.numel() == C && sign_s.numel() == C,
              "_lu_weight_entries: perm (C,) int64, lower and upper (C, C), log_s and sign_s (C,)");
  const auto p = perm.contiguous(), lo = lower.contiguous(), up = upper.contiguous();
  const auto ls = log_s.contiguous(), ss = sign_s.contiguous();
  std::vector<double> diag(C);
  for (int64_t j = 0; j < C; ++j) diag[j] = ss.const_data_ptr<double>()[j] * std::exp(ls.const_data_ptr<double>()[j]);
  auto w = at::empty({C, C}, lower.options());
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      w.mutable_data_ptr<double>()[i * C + j] = glow_ext::math::lu_weight_entry<double>(
          lo.const_data_ptr<double>(), up.const_data_ptr<double>(), diag.data(),
          p.const_data_ptr<int64_t>(), C, i, j);
    }
  }
  return w;
}

// src (float32, CPU) rounded to bfloat16 by the CPU kernels' rounding: the run-time choice, or the
// portable one that CPUs without AVX512-BF16 use.
at::Tensor round_to_bfloat16(const at::Tensor& src, bool portable) {
  TORCH_CHECK(src.scalar_type() == at::kFloat, "_round_to_bfloat16: a float32 tensor");
  const auto values = src.contiguous();
  auto out = at::empty(values.sizes(), values.options().dtype(at::kBFloat16));
  auto* dst = static_cast<glow_ext::cpu::BFloat16Bits*>(out.mutable_data_ptr());
  if (portable) {
    glow_ext::cpu::round_to_bfloat16_portable(values.const_data_ptr<float>(), dst, values.numel());
  } else {
    glow_ext::cpu::round_to_bfloat16(values.const_data_ptr<float>(), dst, values.numel());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(glow_ext, m) {
  m.def(
      "actnorm_invconv_lu(Tensor x, Tensor bias, Tensor logs, Tensor perm, Tensor lower, "
      "Tensor upper, Tensor log_s, Tensor sign_s) -> (Tensor y, Tensor logdet)");
  // The training forms of the two ops (glow_ext.ops calls them): also return the folded map their
  // backward reuses, Wf (resp. Wf⁻¹) as (C, C) in the accumulation dtype, or (0, C) where the op
  // takes the factored path and has none.
  m.def(
      "_actnorm_invconv_lu_train(Tensor x, Tensor bias, Tensor logs, Tensor perm, Tensor lower, "
      "Tensor upper, Tensor log_s, Tensor sign_s) -> (Tensor y, Tensor logdet, Tensor folded)");
  m.def(
      "_actnorm_invconv_lu_inverse_train(Tensor y, Tensor bias, Tensor logs, Tensor perm, "
      "Tensor lower, Tensor upper, Tensor log_s, Tensor sign_s) -> (Tensor x, Tensor folded_inverse)");
  m.def(
      "actnorm_invconv_lu_inverse(Tensor y, Tensor bias, Tensor logs, Tensor perm, Tensor lower, "
      "Tensor upper, Tensor log_s, Tensor sign_s) -> Tensor");
  m.def(
      "actnorm_invconv_lu_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor bias, "
      "Tensor logs, Tensor perm, Tensor lower, Tensor upper, Tensor log_s, Tensor sign_s, "
      "Tensor? folded=None) -> "
      "(Tensor grad_x, Tensor grad_bias, Tensor grad_logs, Tensor grad_lower, Tensor grad_upper, "
      "Tensor grad_log_s)");
  m.def(
      "actnorm_invconv_lu_inverse_backward(Tensor grad_x, Tensor x, Tensor bias, Tensor logs, "
      "Tensor perm, Tensor lower, Tensor upper, Tensor log_s, Tensor sign_s, "
      "Tensor? folded_inverse=None) -> (Tensor grad_y, "
      "Tensor grad_bias, Tensor grad_logs, Tensor grad_lower, Tensor grad_upper, Tensor grad_log_s)");
  m.def("channel_map(Tensor x, Tensor weight, Tensor offset) -> Tensor");
  // Affine coupling: h = (shift, scale logit) along channels, y_b = (x_b + shift)·sigmoid(logit + 2),
  // logdet (N,) = Σ log sigmoid(logit + 2) per sample (csrc/coupling.h).
  m.def("affine_coupling(Tensor x_b, Tensor h) -> (Tensor y_b, Tensor logdet)");
  m.def("affine_coupling_inverse(Tensor y_b, Tensor h) -> Tensor");
  m.def(
      "affine_coupling_backward(Tensor grad_y_b, Tensor grad_logdet, Tensor x_b, Tensor h) -> "
      "(Tensor grad_x_b, Tensor grad_h)");
  m.def(
      "affine_coupling_inverse_backward(Tensor grad_x_b, Tensor y_b, Tensor h) -> "
      "(Tensor grad_y_b, Tensor grad_h)");
  // Test hooks of the CUDA launches (csrc/cuda_launch_plan.h): the grid-size cap of the grid-stride
  // kernels (returns the previous cap), and the direct channel mix's grid run on the host
  // (csrc/cuda_on_host.cpp).
  m.def("_set_max_grid_blocks(int blocks) -> int", &glow_ext::set_max_grid_blocks);
  m.def(
      "_channel_mix_grid_on_host(Tensor x, Tensor weight, Tensor offset, int multiprocessors, "
      "int max_blocks) -> Tensor");
  // The CUDA chain rule's per-entry phases run on the host (float64): returns the gradients of
  // bias, logs, lower, upper, log_s from dL/dWf, dL/dc and Wf (or its two terms).
  m.def(
      "_chain_on_host(Tensor grad_folded, Tensor grad_offset, Tensor? folded, Tensor? terms_bias, "
      "Tensor? terms_dot, Tensor grad_logdet_hw, Tensor bias, Tensor logs, Tensor perm, "
      "Tensor lower, Tensor upper, Tensor log_s, Tensor sign_s) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Helpers of glow_ext.build_info, the fake kernels and the tests. The first two take no tensor,
  // so their kernels are registered for every dispatch key (catch-all).
  m.def("_build_info() -> str", &build_info);
  m.def("_factored_path_channels() -> int", &factored_path_channels);
  m.def("_lu_weight_entries(Tensor perm, Tensor lower, Tensor upper, Tensor log_s, Tensor sign_s) -> Tensor");
  m.def("_round_to_bfloat16(Tensor src, bool portable) -> Tensor");
}

TORCH_LIBRARY_IMPL(glow_ext, CPU, m) {
  m.impl("_lu_weight_entries", &lu_weight_entries);
  m.impl("_round_to_bfloat16", &round_to_bfloat16);
}

namespace {

// Under autocast the ops keep their inputs' dtypes and compute maps and log-determinants in float32
// or wider themselves. The ATen calls inside them must not be autocast as well: with one position
// per sample the 1x1 op's GEMM would come back in bfloat16 and round the flow's state.
void call_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kTensorOps[] = {
    "actnorm_invconv_lu", "_actnorm_invconv_lu_train", "_actnorm_invconv_lu_inverse_train",
    "actnorm_invconv_lu_inverse", "actnorm_invconv_lu_backward", "actnorm_invconv_lu_inverse_backward",
    "channel_map", "affine_coupling", "affine_coupling_inverse", "affine_coupling_backward",
    "affine_coupling_inverse_backward"};

void register_without_autocast(torch::Library& m) {
  for (const char* name : kTensorOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(glow_ext, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(glow_ext, AutocastCUDA, m) { register_without_autocast(m); }
