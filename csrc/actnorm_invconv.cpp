#include "actnorm_invconv.h"
#include "ieee_float32.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/diagonal_scatter.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

namespace glow_ext {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;


std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": `", name, "` must have shape (C,) = (", C,
              ",) to match the channels of the input, got ", shape_str(t));
}

void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == C && t.size(1) == C, op, ": `", name,
              "` must have shape (C, C) = (", C, ", ", C, ") to match the channels of the input, got ",
              shape_str(t));
}

void check_rank_and_channels(const char* op, const char* input_name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, op, ": `", input_name, "` must be at least 2-D (N, C, *spatial), got shape ",
              shape_str(x));
  TORCH_CHECK(x.size(1) > 0, op, ": `", input_name, "` must have at least one channel, got shape ",
              shape_str(x));
}

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The image's dtype: float32 or float64, or bfloat16 (computed in float32); float16 on CUDA only.
void check_image_dtype(const char* op, const char* input_name, const at::Tensor& x) {
  const auto x_type = x.scalar_type();
  TORCH_CHECK(x_type == at::kFloat || x_type == at::kDouble || x_type == at::kBFloat16 ||
                  (x.is_cuda() && x_type == at::kHalf),
              op, ": `", input_name, "` must be float32, float64 or bfloat16",
              x.is_cuda() ? " (or float16)" : " on the CPU (float16 needs CUDA)", ", got ", x_type);
}

// Validates perm on the host for CPU tensors only: for device tensors it would cost a host
// synchronisation per call, so there the backend checks it on the device (validate_permutation).
void check_permutation(const char* op, const at::Tensor& perm) {
  if (!perm.is_cpu()) return;
  const auto p = perm.contiguous();
  const int64_t C = p.numel();
  const int64_t* idx = p.const_data_ptr<int64_t>();
  std::vector<char> seen(C, 0);
  for (int64_t i = 0; i < C; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < C && !seen[idx[i]], op,
                ": `perm` must be a permutation of 0..", C - 1, ", but perm[", i, "] = ", idx[i],
                idx[i] >= 0 && idx[i] < C ? " repeats an earlier entry" : " is out of range");
    seen[idx[i]] = 1;
  }
}

void check_finite_log_s(const char* op, const at::Tensor& log_s) {
  if (!log_s.is_cpu()) return;  // same reason as the permutation check
  const auto values = log_s.contiguous();
  const auto type = values.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "glow_ext_check_log_s", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel(); ++i) {
      TORCH_CHECK(std::isfinite(v[i]), op, ": `log_s` must be finite, but log_s[", i, "] = ", v[i],
                  "; W would be singular or overflow");
    }
  });
}

// p's tensors converted to the accumulation dtype (no copy when they already are).
struct AccParams {
  at::Tensor bias, logs, lower, upper, log_s, sign_s;
  AccParams(const LUParams& p, at::ScalarType acc)
      : bias(p.bias.to(acc)),
        logs(p.logs.to(acc)),
        lower(p.lower.to(acc)),
        upper(p.upper.to(acc)),
        log_s(p.log_s.to(acc)),
        sign_s(p.sign_s.to(acc)) {}

  at::Tensor unit_lower() const {
    auto factor = lower.tril(-1);
    factor.diagonal().fill_(1);
    return factor;
  }
  at::Tensor scale() const { return sign_s * log_s.exp(); }  // diagonal of U'
  at::Tensor upper_factor() const {
    auto factor = upper.triu(1);
    factor.diagonal().copy_(scale());
    return factor;
  }
};

// out = T · B for triangular T (its other triangle already zero), in ~half the flops of a dense mm
// by recursing on the 2x2 block structure.
void trmm_into(const at::Tensor& T, const at::Tensor& B, bool upper, at::Tensor out) {
  const int64_t n = T.size(0);
  if (n <= kTrmmBlock) {
    at::mm_out(out, T, B);
    return;
  }
  const int64_t h = n / 2;
  const auto T11 = T.slice(0, 0, h).slice(1, 0, h);
  const auto T22 = T.slice(0, h).slice(1, h);
  const auto B1 = B.slice(0, 0, h), B2 = B.slice(0, h);
  auto out1 = out.slice(0, 0, h), out2 = out.slice(0, h);
  trmm_into(T11, B1, upper, out1);
  trmm_into(T22, B2, upper, out2);
  if (upper) {
    out1.addmm_(T.slice(0, 0, h).slice(1, h), B2);
  } else {
    out2.addmm_(T.slice(0, h).slice(1, 0, h), B1);
  }
}

at::Tensor trmm(const at::Tensor& T, const at::Tensor& B, bool upper) {
  auto out = at::empty({T.size(0), B.size(1)}, B.options());
  trmm_into(T, B, upper, out);
  return out;
}

// inv[perm[i]] = i, on perm's device without a host round trip.
at::Tensor inverse_permutation(const at::Tensor& perm) {
  auto inv = at::empty_like(perm);
  inv.scatter_(0, perm, at::arange(perm.size(0), perm.options()));
  return inv;
}

// (N, C, *spatial) <-> (C, N·M): the factored path works on one matrix of positions.
at::Tensor to_channel_matrix(const at::Tensor& x, at::ScalarType acc) {
  return x.transpose(0, 1).reshape({x.size(1), -1}).to(acc);
}

at::Tensor from_channel_matrix(const at::Tensor& m, at::IntArrayRef shape, at::ScalarType dtype) {
  return m.view({shape[1], shape[0], -1}).transpose(0, 1).contiguous().to(dtype).view(shape);
}

at::Tensor assemble_weight(const AccParams& a, const at::Tensor& perm) {
  return trmm(a.unit_lower(), a.upper_factor(), /*upper=*/false).index_select(0, perm);
}

ChannelMap fold_forward_generic(const AccParams& a, const at::Tensor& perm) {
  const auto w = assemble_weight(a, perm) * a.logs.exp().unsqueeze(0);
  return {w, at::mv(w, a.bias)};
}

// x = diag(exp(-logs)) · W⁻¹ · y - bias, with W⁻¹ = U'⁻¹ L⁻¹ Pᵀ from two triangular solves. The
// solves read one triangle only, so `lower` goes in as is (unit diagonal implied) and `upper` with
// its diagonal replaced: no masked copies (inverse op at 1x64x4x4 ... 1x128x4x4).
ChannelMap fold_inverse_generic(const AccParams& a, const at::Tensor& perm) {
  const int64_t C = perm.size(0);
  // Pᵀ = rows inv_perm of I: a row gather (a column gather of I took ~6x as long on the CPU, C = 192).
  const auto perm_t = at::eye(C, a.lower.options()).index_select(0, inverse_permutation(perm));
  auto w_inv = at::linalg_solve_triangular(a.lower, perm_t, /*upper=*/false, /*left=*/true,
                                           /*unitriangular=*/true);
  w_inv = at::linalg_solve_triangular(at::diagonal_scatter(a.upper, a.scale()), w_inv,
                                      /*upper=*/true);
  return {w_inv * (-a.logs).exp().unsqueeze(1), -a.bias};
}

// The log-determinant accumulates in float32 (float64 for float64 parameters) and is returned in
// that dtype: M·Σ in float16 parameters would round every term and overflow past 65504.
at::Tensor logdet_of(const LUParams& p, int64_t positions) {
  const auto acc = p.logs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (p.logs.is_cpu()) {
    // Four tiny ATen launches would cost more than the whole forward pass at small C.
    const auto logs = p.logs.contiguous(), log_s = p.log_s.contiguous();
    const auto type = logs.scalar_type();
    return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "glow_ext_logdet", [&] {
      double total = 0;
      for (int64_t i = 0; i < logs.numel(); ++i) {
        total += static_cast<double>(logs.const_data_ptr<scalar_t>()[i]) +
                 static_cast<double>(log_s.const_data_ptr<scalar_t>()[i]);
      }
      return at::scalar_tensor(total * static_cast<double>(positions), logs.options().dtype(acc));
    });
  }
  return (p.logs.sum(acc) + p.log_s.sum(acc)) * static_cast<double>(positions);
}

// x_hat = (x + b)·a. From Σ dL/dx_hat and Σ dL/dx_hat ⊙ x_hat over the pixels and the full
// gradients of L and U', the parameter gradients (only the used triangles, in the parameter dtype).
ParamGrads param_grads(const AccParams& a, at::ScalarType param_type, const at::Tensor& x_hat_grad,
                       const at::Tensor& x_hat_dot, const at::Tensor& grad_lower_full,
                       const at::Tensor& grad_upper_full, const at::Tensor& gld) {
  return {(x_hat_grad * a.logs.exp()).to(param_type),
          (x_hat_dot + gld).to(param_type),
          grad_lower_full.tril(-1).to(param_type),
          grad_upper_full.triu(1).to(param_type),
          (grad_upper_full.diagonal() * a.scale() + gld).to(param_type)};
}

// Wfᵀ·dL/dc equals a ⊙ Σ dL/dx_hat.
FoldedTerms folded_terms(const at::Tensor& folded, const at::Tensor& grad_folded,
                         const at::Tensor& grad_offset) {
  return {at::mv(folded.t(), grad_offset), (grad_folded * folded).sum(0)};
}

// y = Wf·x + c with Wf = W·diag(a), c = W·(a⊙b): from dL/dWf and dL/dc to the LU parameters.
// Everything is read off the parameters and the Wf terms: two C x C products, no re-assembly of W.
ParamGrads chain_folded(const AccParams& a, const LUParams& p, const at::Tensor& grad_folded,
                        const at::Tensor& grad_offset, const FoldedTerms& t, const at::Tensor& gld) {
  const auto param_type = p.bias.scalar_type();
  const auto grad_logs = t.column_dot + t.grad_bias * a.bias + gld;
  // dL/dW = (dL/dWf + dL/dc ⊗ b)·diag(a), rows moved by Pᵀ: row i goes to perm[i].
  const auto grad_weight = at::addr(grad_folded, grad_offset, a.bias) * a.logs.exp().unsqueeze(0);
  // A gather by the inverse permutation: CPU index_copy_ is ~3x slower at C = 96..192.
  const auto g_v = grad_weight.index_select(0, inverse_permutation(p.perm));
  // With L = I + strict_lower and U' = strict_upper + diag(s): dL/dU' = g_v + strict_lowerᵀ·g_v and
  // dL/dL = g_v·diag(s) + g_v·strict_upperᵀ, without materialising the unit and scale diagonals
  // (~5 fewer launches: inverse op's backward at 1x64x4x4 ... 1x128x4x4).
  const auto scale = a.scale();
  const auto grad_upper_full = at::addmm(g_v, a.lower.tril(-1).t(), g_v);
  const auto grad_lower = at::addmm(g_v * scale.unsqueeze(0), g_v, a.upper.triu(1).t());
  return {t.grad_bias.to(param_type), grad_logs.to(param_type), grad_lower.tril_(-1).to(param_type),
          grad_upper_full.triu(1).to(param_type),
          (grad_upper_full.diagonal() * scale + gld).to(param_type)};
}

// The inverse op's backward reads the two Wf terms of the chain rule off the pixels (two sums over
// C·M entries) rather than re-assembling Wf (a C x C x C product and ~5 launches) while
// M·kPixelSumsPerEntry <= C².
constexpr int64_t kPixelSumsPerEntry = 16;

// The inverse's triangular solves run in float64 for float32 input: the LU factors of a rotation
// are far worse conditioned than W itself (cond ~500 at C = 257 against ~10), and the solves must
// keep the round trip within 1e-5. The forward's assembly W = P·L·U' is a product, not a solve: in
// float32 its error stays at plain float32 PyTorch's (README, Performance), at half the cost.
at::ScalarType algebra_dtype(const at::Tensor& x) {
  return is_reduced_float(x.scalar_type()) ? at::kFloat : at::kDouble;
}

// In `dtype`, the weight row-major (the solves leave it column-major): one copy for both.
ChannelMap cast(const ChannelMap& map, at::ScalarType dtype) {
  return {map.weight.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous),
          map.offset.to(dtype)};
}

ChannelMap forward_map(const Backend& backend, const LUParams& p, const at::Tensor& x) {
  const auto acc = accumulation_dtype(x);
  ChannelMap map;
  if (backend.fold_forward(p, acc, map)) return map;
  return fold_forward_generic(AccParams(p, acc), p.perm);
}

ChannelMap inverse_map(const Backend& backend, const LUParams& p, const at::Tensor& y) {
  const auto acc = accumulation_dtype(y);
  ChannelMap map;
  if (backend.fold_inverse && backend.fold_inverse(p, acc, map)) return map;
  return cast(fold_inverse_generic(AccParams(p, algebra_dtype(y)), p.perm), acc);
}

// One position per sample ((N, C) feature vectors, nflows' and normflows' layers): the samples are
// the rows of one (N, C) matrix, so each pass over them is a single GEMM. The backends' pixel loops
// work on one image at a time and would see N images of one pixel each.
bool is_matrix_of_samples(const at::Tensor& x, const at::Tensor& map_weight) {
  return x.numel() != 0 && positions_per_sample(x) == 1 && x.scalar_type() == map_weight.scalar_type();
}

// y = map.weight·x + map.offset at every position of an NC*-contiguous x.
at::Tensor apply_map(const Backend& backend, const at::Tensor& x, const ChannelMap& map) {
  if (is_matrix_of_samples(x, map.weight)) {
    return at::addmm(map.offset, x.view({x.size(0), x.size(1)}), map.weight.t()).view(x.sizes());
  }
  return backend.channel_mix(x, map);
}

// out = weight·src per pixel and the sums Σ a·xᵀ, Σ a over the pixels (a = src, or out when
// outer_of_out): the backend's one-sweep primitive, else a channel mix and a batched GEMM.
void mix_outer(const Backend& backend, const at::Tensor& src, const at::Tensor& weight,
               const at::Tensor& x, bool outer_of_out, at::Tensor& out, at::Tensor& grad_folded,
               at::Tensor& grad_offset) {
  if (is_matrix_of_samples(x, weight) && src.scalar_type() == weight.scalar_type()) {
    const int64_t N = x.size(0), C = x.size(1);
    const auto src2 = src.view({N, C}), x2 = x.view({N, C});
    const auto out2 = at::mm(src2, weight.t());
    const auto& a = outer_of_out ? out2 : src2;
    out = out2.view(x.sizes());
    grad_folded = at::mm(a.t(), x2);
    grad_offset = a.sum(0);
    return;
  }
  if (backend.mix_outer &&
      backend.mix_outer(src, weight, x, outer_of_out, out, grad_folded, grad_offset)) {
    return;
  }
  out = backend.channel_mix(src, {weight, at::zeros({weight.size(0)}, weight.options())});
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  const auto acc = weight.scalar_type();
  const auto g3 = (outer_of_out ? out : src).view({N, C, M}).to(acc);
  const auto x3 = x.view({N, C, M}).to(acc);
  if (N > 1 && 4 * M <= C) {
    // Σ_n g_n·x_nᵀ as one GEMM of the images laid out as (C, N·M): with few pixels per image, the
    // N products of a batched GEMM (N·C² entries, then summed) far outgrow the images (backward op
    // at 64x96x4x4: 0.29 against 0.38 ms for the two; at 64x48x4x4 and 64x96x8x8 the batched GEMM
    // is faster).
    grad_folded = at::mm(g3.transpose(0, 1).reshape({C, N * M}), x3.transpose(0, 1).reshape({C, N * M}).t());
  } else {
    grad_folded = N == 1 ? at::mm(g3[0], x3[0].t()) : at::bmm(g3, x3.transpose(1, 2)).sum(0);
  }
  // Spelled out: a bare {0, 2} also matches DimnameList's (pointer, length) constructor in older torch.
  grad_offset = g3.sum(at::IntArrayRef{0, 2});
}

// The map a training op returned for its backward (its `folded` output), checked; undefined when
// absent or when it is the (0, C) placeholder of the factored path.
at::Tensor saved_map(const char* op, const char* name, const std::optional<at::Tensor>& map,
                     const at::Tensor& x) {
  if (!map.has_value() || !map->defined()) return {};
  const int64_t C = x.size(1);
  const auto acc = accumulation_dtype(x);
  TORCH_CHECK(map->dim() == 2 && (map->size(0) == C || map->size(0) == 0) && map->size(1) == C, op,
              ": `", name, "` must be the (C, C) map or (0, C) placeholder that the training op ",
              "returned, C = ", C, ", got ", shape_str(*map));
  TORCH_CHECK(map->scalar_type() == acc && map->device() == x.device(), op, ": `", name,
              "` must be ", acc, " on the device of `x`, got ", map->scalar_type(), " on ",
              map->device());
  return map->size(0) == C ? *map : at::Tensor();
}

// Backward of the folded path. Forward op, grad = dL/dy: dL/dx = Wfᵀ·grad, and the parameter
// gradients from Σ grad·xᵀ and Σ grad. Inverse op (x = Wf⁻¹·(y − c)), grad = dL/dx: by implicit
// differentiation dL/dy = Wf⁻ᵀ·grad, and the parameter gradients are minus the forward op's at
// (x, dL/dy). One sweep of the pixels either way, then C x C algebra in the accumulation dtype
// (float32 for float32 input: the error stays at the plain-PyTorch level, see README). `saved` is
// the map the training op's forward returned (Wf, or Wf⁻¹ for the inverse), or undefined.
Grads folded_backward(const Backend& backend, const at::Tensor& grad, const at::Tensor& x,
                      const LUParams& p, const at::Tensor& gld, bool inverse_op,
                      const at::Tensor& saved) {
  const auto acc = accumulation_dtype(x);
  at::Tensor mix_weight, folded;  // folded: Wf, once known
  if (saved.defined()) {
    mix_weight = saved.t();
    if (!inverse_op) folded = saved;
  } else if (inverse_op) {
    mix_weight = inverse_map(backend, p, x).weight.t();
  } else {
    folded = forward_map(backend, p, x).weight;
    mix_weight = folded.t();
  }
  at::Tensor grad_in, grad_folded, grad_offset;
  mix_outer(backend, grad, mix_weight.contiguous(), x, inverse_op, grad_in, grad_folded, grad_offset);
  if (inverse_op) {  // gld is zero there, so the chain rule is linear: negate its two inputs
    grad_folded.neg_();
    grad_offset.neg_();
  }
  const int64_t C = x.size(1), M = x.numel() / C;
  FoldedTerms terms;
  if (inverse_op && M * kPixelSumsPerEntry <= C * C) {
    // Wfᵀ·dL/dy = dL/dx, so both Wf terms are pixel sums of dL/dx and x ⊙ dL/dx (negated, as
    // above): cheaper than re-assembling Wf when the pixels are few (1x64x4x4 ... 4x192x8x8).
    const auto grad_acc = grad.to(acc);
    const auto grad3 = grad_acc.view({x.size(0), C, -1});
    terms = {grad3.sum({0, 2}).neg_(), (x.to(acc).view({x.size(0), C, -1}) * grad3).sum({0, 2}).neg_()};
  } else if (!folded.defined()) {
    folded = forward_map(backend, p, x).weight;
  }
  ParamGrads g;
  if (backend.chain && backend.chain(p, grad_folded, grad_offset, folded, terms, gld, g)) {
    return {grad_in, g.bias, g.logs, g.lower, g.upper, g.log_s};
  }
  if (!terms.grad_bias.defined()) terms = folded_terms(folded, grad_folded, grad_offset);
  g = chain_folded(AccParams(p, acc), p, grad_folded, grad_offset, terms, gld);
  return {grad_in, g.bias, g.logs, g.lower, g.upper, g.log_s};
}

// Backward of the factored path (deep levels), from dL/dy as a (C, N·M) channel matrix in the
// accumulation dtype (undefined for an empty x): recompute u = U'·x_hat, then walk the factors
// backwards. Returns dL/dx in x's layout and the parameter gradients.
std::pair<at::Tensor, ParamGrads> factored_backward(const at::Tensor& x, const at::Tensor& grad_y_matrix,
                                                     const LUParams& p, const at::Tensor& gld) {
  const auto acc = accumulation_dtype(x);
  const AccParams a(p, acc);
  const auto scale = a.logs.exp();  // ActNorm's multiplier
  at::Tensor grad_x, grad_lower, grad_upper_full, x_hat_grad, x_hat_dot;
  if (x.numel() == 0) {
    grad_x = at::empty_like(x);
    grad_lower = at::zeros_like(a.lower);
    grad_upper_full = at::zeros_like(a.upper);
    x_hat_grad = at::zeros_like(a.bias);  // sum over pixels of dL/dx_hat
    x_hat_dot = at::zeros_like(a.bias);   // sum over pixels of dL/dx_hat ⊙ x_hat
  } else {
    const auto lower_f = a.unit_lower();
    const auto upper_f = a.upper_factor();
    const auto x_hat = (to_channel_matrix(x, acc) + a.bias.unsqueeze(1)) * scale.unsqueeze(1);
    const auto u = trmm(upper_f, x_hat, /*upper=*/true);
    const auto g_v = grad_y_matrix.index_select(0, inverse_permutation(p.perm));
    grad_lower = at::mm(g_v, u.t());
    const auto g_u = trmm(lower_f.t(), g_v, /*upper=*/true);
    grad_upper_full = at::mm(g_u, x_hat.t());
    const auto g_x_hat = trmm(upper_f.t(), g_u, /*upper=*/false);
    grad_x = from_channel_matrix(g_x_hat * scale.unsqueeze(1), x.sizes(), x.scalar_type());
    x_hat_grad = g_x_hat.sum(1);
    x_hat_dot = (g_x_hat * x_hat).sum(1);
  }
  return {grad_x, param_grads(a, p.bias.scalar_type(), x_hat_grad, x_hat_dot, grad_lower,
                              grad_upper_full, gld)};
}

}  // namespace

bool use_factored_path(int64_t channels, int64_t pixels) {
  // Assembly costs ~C^3/3 multiply-adds against C^2·M for the per-pixel product.
  return channels > kTrmmBlock && pixels < channels;
}

at::ScalarType accumulation_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Backend& backend, const char* op, const char* input_name,
                  const at::Tensor& x, const LUParams& p) {
  check_rank_and_channels(op, input_name, x);
  const int64_t C = x.size(1);
  const auto x_type = x.scalar_type();
  check_image_dtype(op, input_name, x);

  const std::pair<const char*, const at::Tensor*> named[] = {
      {"bias", &p.bias},   {"logs", &p.logs},   {"perm", &p.perm},     {"lower", &p.lower},
      {"upper", &p.upper}, {"log_s", &p.log_s}, {"sign_s", &p.sign_s}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == x.device(), op, ": `", name, "` is on ", t->device(), " but `",
                input_name, "` is on ", x.device(), "; all arguments must be on one device");
  }
  check_vector(op, "bias", p.bias, C);
  check_vector(op, "logs", p.logs, C);
  check_vector(op, "perm", p.perm, C);
  check_matrix(op, "lower", p.lower, C);
  check_matrix(op, "upper", p.upper, C);
  check_vector(op, "log_s", p.log_s, C);
  check_vector(op, "sign_s", p.sign_s, C);

  TORCH_CHECK(p.perm.scalar_type() == at::kLong, op, ": `perm` must be int64, got ",
              p.perm.scalar_type());
  const auto param_type = p.bias.scalar_type();
  for (const auto& [name, t] : named) {
    if (t == &p.perm) continue;
    TORCH_CHECK(t->scalar_type() == param_type, op, ": `", name, "` is ", t->scalar_type(),
                " but `bias` is ", param_type, "; the parameters must share one dtype");
  }
  TORCH_CHECK(param_type == x_type || (is_reduced_float(x_type) && param_type == at::kFloat), op,
              ": the parameters are ", param_type, " but `", input_name, "` is ", x_type,
              "; they must match (float32 parameters are also accepted for float16/bfloat16 input)");
  check_permutation(op, p.perm);
  if (!p.perm.is_cpu() && backend.validate_permutation) backend.validate_permutation(p.perm);
  check_finite_log_s(op, p.log_s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(const Backend& backend,
                                                             const at::Tensor& x_in,
                                                             const LUParams& p) {
  // Messages name the public op: this is the same computation, with its map kept for the backward.
  check_inputs(backend, "glow_ext::actnorm_invconv_lu", "x", x_in, p);
  const IeeeFloat32Scope ieee_float32;  // exact GEMMs whatever torch's TF32/bf16 flags say
  const auto x = x_in.contiguous();
  const int64_t C = x.size(1), M = positions_per_sample(x);
  auto logdet = logdet_of(p, M);
  const auto acc = accumulation_dtype(x);
  const auto no_map = at::empty({0, C}, x.options().dtype(acc));
  if (x.numel() == 0) return {at::empty_like(x), logdet, no_map};

  if (use_factored_path(C, x.size(0) * M)) {
    const AccParams a(p, acc);
    const auto x_hat =
        (to_channel_matrix(x, acc) + a.bias.unsqueeze(1)) * a.logs.exp().unsqueeze(1);
    const auto u = trmm(a.upper_factor(), x_hat, /*upper=*/true);
    const auto v = trmm(a.unit_lower(), u, /*upper=*/false);
    return {from_channel_matrix(v.index_select(0, p.perm), x.sizes(), x.scalar_type()), logdet,
            no_map};
  }
  auto map = forward_map(backend, p, x);
  map.weight = map.weight.contiguous();  // the op returns it: one layout whatever the fold
  return {apply_map(backend, x, map), logdet, map.weight};
}

std::tuple<at::Tensor, at::Tensor> forward(const Backend& backend, const at::Tensor& x,
                                           const LUParams& p) {
  auto [y, logdet, unused] = forward_train(backend, x, p);
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> inverse_train(const Backend& backend, const at::Tensor& y_in,
                                                 const LUParams& p) {
  check_inputs(backend, "glow_ext::actnorm_invconv_lu_inverse", "y", y_in, p);
  const IeeeFloat32Scope ieee_float32;  // as in forward_train
  const auto y = y_in.contiguous();
  const int64_t C = y.size(1), pixels = y.size(0) * positions_per_sample(y);
  const auto acc = accumulation_dtype(y);
  const auto no_map = at::empty({0, C}, y.options().dtype(acc));
  if (y.numel() == 0) return {at::empty_like(y), no_map};
  if (use_factored_path(C, pixels)) {
    const AccParams a(p, acc);
    auto v = to_channel_matrix(y, acc).index_select(0, inverse_permutation(p.perm));
    v = at::linalg_solve_triangular(a.unit_lower(), v, /*upper=*/false, /*left=*/true,
                                    /*unitriangular=*/true);
    v = at::linalg_solve_triangular(a.upper_factor(), v, /*upper=*/true);
    const auto x = v * (-a.logs).exp().unsqueeze(1) - a.bias.unsqueeze(1);
    return {from_channel_matrix(x, y.sizes(), y.scalar_type()), no_map};
  }
  auto map = inverse_map(backend, p, y);
  map.weight = map.weight.contiguous();  // the solves leave it column-major; the op returns it
  return {apply_map(backend, y, map), map.weight};
}

at::Tensor inverse(const Backend& backend, const at::Tensor& y, const LUParams& p) {
  return std::get<0>(inverse_train(backend, y, p));
}

at::Tensor channel_map(const Backend& backend, const at::Tensor& x_in, const at::Tensor& weight,
                       const at::Tensor& offset) {
  const char* op = "glow_ext::channel_map";
  const IeeeFloat32Scope ieee_float32;  // as in forward_train
  check_rank_and_channels(op, "x", x_in);
  const int64_t C = x_in.size(1);
  const auto x_type = x_in.scalar_type();
  check_image_dtype(op, "x", x_in);
  check_matrix(op, "weight", weight, C);
  check_vector(op, "offset", offset, C);
  const auto acc = accumulation_dtype(x_in);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight},
                                {"offset", &offset}}) {
    TORCH_CHECK(t->device() == x_in.device(), op, ": `", name, "` is on ", t->device(),
                " but `x` is on ", x_in.device(), "; all arguments must be on one device");
    TORCH_CHECK(t->scalar_type() == acc, op, ": `", name, "` must be ", acc, " (the accumulation ",
                "dtype of ", x_type, " input), got ", t->scalar_type());
  }
  const auto x = x_in.contiguous();
  if (x.numel() == 0) return at::empty_like(x);
  return apply_map(backend, x, {weight, offset});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Backend& backend, const at::Tensor& grad_y_in, const at::Tensor& grad_logdet,
    const at::Tensor& x_in, const LUParams& p, const std::optional<at::Tensor>& folded) {
  const char* op = "glow_ext::actnorm_invconv_lu_backward";
  check_inputs(backend, op, "x", x_in, p);
  const IeeeFloat32Scope ieee_float32;  // as in forward_train
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), op, ": `grad_y` must have the shape of `x` ",
              shape_str(x_in), ", got ", shape_str(grad_y_in));
  TORCH_CHECK(grad_y_in.scalar_type() == x_in.scalar_type() && grad_y_in.device() == x_in.device(),
              op, ": `grad_y` must match `x` in dtype and device");
  TORCH_CHECK(grad_logdet.numel() == 1 && grad_logdet.device() == x_in.device(), op,
              ": `grad_logdet` must be a one-element tensor on the device of `x`");

  const auto x = x_in.contiguous();
  const auto grad_y = grad_y_in.contiguous();
  const int64_t C = x.size(1), M = positions_per_sample(x);
  const auto acc = accumulation_dtype(x);
  const auto gld = grad_logdet.reshape({}).to(acc) * static_cast<double>(M);
  const auto saved = saved_map(op, "folded", folded, x);

  if (x.numel() != 0 && !use_factored_path(C, x.size(0) * M)) {
    return folded_backward(backend, grad_y, x, p, gld, /*inverse_op=*/false, saved);
  }
  const auto [grad_x, g] = factored_backward(
      x, x.numel() == 0 ? at::Tensor() : to_channel_matrix(grad_y, acc), p, gld);
  return {grad_x, g.bias, g.logs, g.lower, g.upper, g.log_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> inverse_backward(
    const Backend& backend, const at::Tensor& grad_x_in, const at::Tensor& x_in, const LUParams& p,
    const std::optional<at::Tensor>& folded_inverse) {
  const char* op = "glow_ext::actnorm_invconv_lu_inverse_backward";
  check_inputs(backend, op, "x", x_in, p);
  const IeeeFloat32Scope ieee_float32;  // as in forward_train
  TORCH_CHECK(grad_x_in.sizes() == x_in.sizes(), op, ": `grad_x` must have the shape of `x` ",
              shape_str(x_in), ", got ", shape_str(grad_x_in));
  TORCH_CHECK(grad_x_in.scalar_type() == x_in.scalar_type() && grad_x_in.device() == x_in.device(),
              op, ": `grad_x` must match `x` in dtype and device");
  const auto x = x_in.contiguous();
  const auto grad_x = grad_x_in.contiguous();
  const int64_t C = x.size(1), pixels = x.size(0) * positions_per_sample(x);
  const auto acc = accumulation_dtype(x);
  const auto saved = saved_map(op, "folded_inverse", folded_inverse, x);
  if (x.numel() != 0 && !use_factored_path(C, pixels)) {
    return folded_backward(backend, grad_x, x, p, at::zeros({}, x.options().dtype(acc)),
                           /*inverse_op=*/true, saved);
  }
  // Deep levels: dL/dy = Wf⁻ᵀ·dL/dx = P·L⁻ᵀ·U'⁻ᵀ·diag(exp(−logs))·dL/dx from two triangular solves
  // on the pixels, then minus the forward op's parameter gradients at (x, dL/dy).
  at::Tensor grad_y = at::empty_like(x), grad_y_matrix;
  if (x.numel() != 0) {
    const AccParams a(p, acc);
    auto g = to_channel_matrix(grad_x, acc) * (-a.logs).exp().unsqueeze(1);
    g = at::linalg_solve_triangular(a.upper_factor().t(), g, /*upper=*/false);
    g = at::linalg_solve_triangular(a.unit_lower().t(), g, /*upper=*/true, /*left=*/true,
                                    /*unitriangular=*/true);
    grad_y_matrix = g.index_select(0, p.perm);
    grad_y = from_channel_matrix(grad_y_matrix, x.sizes(), x.scalar_type());
  }
  const auto [unused, g] =
      factored_backward(x, grad_y_matrix, p, at::zeros({}, x.options().dtype(acc)));
  return {grad_y, -g.bias, -g.logs, -g.lower, -g.upper, -g.log_s};
}

}  // namespace glow_ext
