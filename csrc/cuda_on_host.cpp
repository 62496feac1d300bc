// The CUDA kernels' logic on the host: the grid cap they read, and their launches replayed on the
// CPU for the tests — the direct channel mix block by block and thread by thread with the kernel's
// own shared-memory fill and per-pixel loop, and the one-block chain rule phase by phase — so the
// CPU tests check their indexing on machines without a GPU.
#include "cuda_launch_plan.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <limits>
#include <vector>

#include "glow_ext_math.h"

namespace glow_ext {
namespace {

std::atomic<int64_t> grid_cap{kDefaultMaxGridBlocks};

at::Tensor channel_mix_grid_on_host(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const at::Tensor& offset_in, int64_t multiprocessors,
                                    int64_t max_blocks) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_floating_point(), "_channel_mix_grid_on_host: 4-D x");
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(weight_in.sizes() == at::IntArrayRef({C, C}) && offset_in.numel() == C &&
                  weight_in.scalar_type() == x_in.scalar_type() &&
                  offset_in.scalar_type() == x_in.scalar_type() && multiprocessors >= 1 &&
                  max_blocks >= 1,
              "_channel_mix_grid_on_host: weight (C, C), offset (C,) in x's dtype, positive grid sizes");
  const auto x = x_in.contiguous(), weight = weight_in.contiguous(), offset = offset_in.contiguous();
  auto y = at::full_like(x, std::numeric_limits<double>::quiet_NaN());  // unwritten stays NaN
  const int64_t pixels = N * HW;
  const auto plan = plan_channel_mix(pixels, C, multiprocessors, max_blocks);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glow_ext_channel_mix_grid_on_host", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* c = offset.const_data_ptr<scalar_t>();
    const int64_t ld = plan.rows_per_group;
    std::vector<scalar_t> slice(C * ld), slice_offset(ld);
    for (int64_t group = 0; group < plan.row_groups; ++group) {
      const int64_t row0 = group * ld, rows = std::min(ld, C - row0);
      for (int64_t k = 0; k < C * ld; ++k) {
        slice[k] = math::transposed_slice_entry(w, C, row0, rows, ld, k);
      }
      for (int64_t r = 0; r < ld; ++r) slice_offset[r] = r < rows ? c[row0 + r] : scalar_t(0);
      for (int64_t block = 0; block < plan.pixel_blocks; ++block) {
        for (int64_t thread = 0; thread < kMixThreads; ++thread) {
          for (int64_t t = block * kMixThreads + thread; t < pixels;
               t += plan.pixel_blocks * kMixThreads) {
            const int64_t n = t / HW, at_pixel = n * C * HW + (t - n * HW);
            const scalar_t* x_p = x.const_data_ptr<scalar_t>() + at_pixel;
            scalar_t* y_p = y.mutable_data_ptr<scalar_t>() + at_pixel + row0 * HW;
            math::mix_pixel_transposed<kMixRows>(
                slice.data(), ld, C, slice_offset.data(), rows,
                [&](int64_t j) { return x_p[j * HW]; },
                [&](int64_t r, scalar_t value) { y_p[r * HW] = value; });
          }
        }
      }
    }
  });
  return y;
}

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads5 chain_on_host(const at::Tensor& grad_folded, const at::Tensor& grad_offset,
                     const std::optional<at::Tensor>& folded, const std::optional<at::Tensor>& terms_bias,
                     const std::optional<at::Tensor>& terms_dot, const at::Tensor& grad_logdet_hw,
                     const at::Tensor& bias, const at::Tensor& logs, const at::Tensor& perm,
                     const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_s,
                     const at::Tensor& sign_s) {
  const int64_t C = bias.numel();
  const bool with_folded = folded.has_value() && folded->defined();
  TORCH_CHECK(bias.scalar_type() == at::kDouble && grad_folded.scalar_type() == at::kDouble &&
                  perm.scalar_type() == at::kLong && perm.numel() == C &&
                  (with_folded || (terms_bias.has_value() && terms_dot.has_value())),
              "_chain_on_host: float64 tensors, int64 perm, and folded or both terms");
  const auto c = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor b = c(bias), lg = c(logs), pm = c(perm), lo = c(lower), up = c(upper),
                   ls = c(log_s), ss = c(sign_s), gf = c(grad_folded), go = c(grad_offset),
                   gld = c(grad_logdet_hw.reshape({1}));
  const at::Tensor wf = with_folded ? c(*folded) : at::Tensor();
  const at::Tensor tb = with_folded ? at::Tensor() : c(*terms_bias);
  const at::Tensor td = with_folded ? at::Tensor() : c(*terms_dot);
  Grads5 out{at::empty({C}, b.options()), at::empty({C}, b.options()), at::empty({C, C}, b.options()),
             at::empty({C, C}, b.options()), at::empty({C}, b.options())};
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; };
  const math::ChainArgs<double> args{
      ptr(b), ptr(lg), ptr(lo), ptr(up), ptr(ls), ptr(ss), pm.const_data_ptr<int64_t>(), ptr(gf),
      ptr(go), ptr(wf), ptr(tb), ptr(td), ptr(gld), C,
      std::get<0>(out).mutable_data_ptr<double>(), std::get<1>(out).mutable_data_ptr<double>(),
      std::get<2>(out).mutable_data_ptr<double>(), std::get<3>(out).mutable_data_ptr<double>(),
      std::get<4>(out).mutable_data_ptr<double>()};
  std::vector<double> scale(C), diag(C), g_v(C * C);
  for (int64_t j = 0; j < C; ++j) {
    scale[j] = std::exp(args.logs[j]);
    diag[j] = args.sign_s[j] * std::exp(args.log_s[j]);
    math::chain_actnorm_column(args, j);
  }
  for (int64_t e = 0; e < C * C; ++e) math::chain_scatter_entry(args, scale.data(), g_v.data(), e);
  for (int64_t e = 0; e < C * C; ++e) math::chain_lu_entry(args, diag.data(), g_v.data(), e);
  return out;
}

}  // namespace

int64_t max_grid_blocks() { return grid_cap.load(std::memory_order_relaxed); }

int64_t set_max_grid_blocks(int64_t blocks) {
  TORCH_CHECK(blocks >= 1, "glow_ext::_set_max_grid_blocks: the cap must be at least 1, got ", blocks);
  return grid_cap.exchange(blocks);
}

TORCH_LIBRARY_IMPL(glow_ext, CPU, m) {
  m.impl("_channel_mix_grid_on_host", &channel_mix_grid_on_host);
  m.impl("_chain_on_host", &chain_on_host);
}

}  // namespace glow_ext
