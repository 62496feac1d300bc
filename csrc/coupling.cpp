#include "coupling.h"

#include <c10/util/Exception.h>

namespace glow_ext {
namespace {

constexpr const char* kForwardOp = "glow_ext::affine_coupling";
constexpr const char* kInverseOp = "glow_ext::affine_coupling_inverse";
constexpr const char* kBackwardOp = "glow_ext::affine_coupling_backward";
constexpr const char* kInverseBackwardOp = "glow_ext::affine_coupling_inverse_backward";

// The dtype the kernels accumulate in, and the logdet's: the input's (x_b or y_b), not h's.
at::ScalarType logdet_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_floating_point(), op, ": `", name, "` must be a floating-point tensor, got ",
              t.scalar_type());
}

// The input half and h: 4-D, floating dtypes the device supports, one device, h = (N, 2C, H, W).
// h has the input's dtype, or is 16-bit with float32 input (a bfloat16 network output under
// autocast, applied to the float32 flow state without a widened copy).
void check_input_and_h(const char* op, const char* input_name, const at::Tensor& input,
                       const at::Tensor& h) {
  TORCH_CHECK(input.dim() == 4, op, ": `", input_name, "` must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(h.dim() == 4, op, ": `h` must be 4-D (N, 2C, H, W), got shape ", h.sizes());
  check_floating(op, input_name, input);
  check_floating(op, "h", h);
  TORCH_CHECK(h.device() == input.device(), op, ": `h` is on ", h.device(), " but `", input_name,
              "` is on ", input.device(), "; both must be on one device");
  const auto dtype = input.scalar_type(), h_dtype = h.scalar_type();
  const bool narrow_h = h_dtype == at::kBFloat16 || h_dtype == at::kHalf;
  TORCH_CHECK(h_dtype == dtype || (dtype == at::kFloat && narrow_h), op, ": `h` has dtype ", h_dtype,
              " but `", input_name, "` has dtype ", dtype, "; `h` must have the dtype of `",
              input_name, "`, or be float16/bfloat16 with a float32 `", input_name, "`");
  for (const auto t : {dtype, h_dtype}) {
    TORCH_CHECK(t != at::kHalf || input.is_cuda(), op, ": dtype ", t,
                " is supported on CUDA only; on the CPU use float32, float64 or bfloat16");
  }
  TORCH_CHECK(h.size(1) % 2 == 0, op,
              ": `h` must have an even number of channels (shifts, then scale logits), got ",
              h.size(1));
  TORCH_CHECK(h.size(0) == input.size(0) && h.size(1) == 2 * input.size(1) &&
                  h.size(2) == input.size(2) && h.size(3) == input.size(3),
              op, ": `h` must have shape (N, 2C, H, W) = (", input.size(0), ", ",
              2 * input.size(1), ", ", input.size(2), ", ", input.size(3), ") for `", input_name,
              "` of shape ", input.sizes(), ", got ", h.sizes());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": `", name, "` must have the shape of `", like_name,
              "` ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), " but `",
              like_name, "` is on ", like.device(), "; all arguments must be on one device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": `", name, "` has dtype ",
              t.scalar_type(), " but `", like_name, "` has dtype ", like.scalar_type());
}

// t itself when each sample's C·H·W elements are contiguous (a channel slice of a contiguous
// tensor is), else a contiguous copy. Dimensions of size 1 have no meaningful stride.
at::Tensor per_sample_contiguous(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  const bool dense = (W == 1 || t.stride(3) == 1) && (H == 1 || t.stride(2) == W) &&
                     (t.size(1) == 1 || t.stride(1) == H * W);
  return dense ? t : t.contiguous();
}

at::Tensor empty_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> affine_coupling(CouplingKernel kernel, const at::Tensor& x_b,
                                                   const at::Tensor& h) {
  check_input_and_h(kForwardOp, "x_b", x_b, h);
  CouplingCall call{CouplingMode::kForward, per_sample_contiguous(x_b), per_sample_contiguous(h)};
  call.out = empty_output(x_b);
  call.logdet = at::zeros({x_b.size(0)}, x_b.options().dtype(logdet_dtype(x_b)));
  if (x_b.numel() > 0) kernel(call);
  return {call.out, call.logdet};
}

at::Tensor affine_coupling_inverse(CouplingKernel kernel, const at::Tensor& y_b, const at::Tensor& h) {
  check_input_and_h(kInverseOp, "y_b", y_b, h);
  CouplingCall call{CouplingMode::kInverse, per_sample_contiguous(y_b), per_sample_contiguous(h)};
  call.out = empty_output(y_b);
  if (y_b.numel() > 0) kernel(call);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_backward(CouplingKernel kernel,
                                                            const at::Tensor& grad_y_b,
                                                            const at::Tensor& grad_logdet,
                                                            const at::Tensor& x_b,
                                                            const at::Tensor& h) {
  check_input_and_h(kBackwardOp, "x_b", x_b, h);
  check_like(kBackwardOp, "grad_y_b", grad_y_b, "x_b", x_b);
  check_floating(kBackwardOp, "grad_logdet", grad_logdet);
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == x_b.size(0), kBackwardOp,
              ": `grad_logdet` must have shape (N,) = (", x_b.size(0), ",), got ", grad_logdet.sizes());
  TORCH_CHECK(grad_logdet.device() == x_b.device(), kBackwardOp, ": `grad_logdet` is on ",
              grad_logdet.device(), " but `x_b` is on ", x_b.device(),
              "; all arguments must be on one device");
  CouplingCall call{CouplingMode::kBackward, per_sample_contiguous(x_b), per_sample_contiguous(h),
                    per_sample_contiguous(grad_y_b),
                    grad_logdet.to(logdet_dtype(x_b)).contiguous()};
  call.out = empty_output(x_b);
  call.grad_h = empty_output(h);
  if (x_b.numel() > 0) kernel(call);
  return {call.out, call.grad_h};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_inverse_backward(CouplingKernel kernel,
                                                                    const at::Tensor& grad_x_b,
                                                                    const at::Tensor& y_b,
                                                                    const at::Tensor& h) {
  check_input_and_h(kInverseBackwardOp, "y_b", y_b, h);
  check_like(kInverseBackwardOp, "grad_x_b", grad_x_b, "y_b", y_b);
  CouplingCall call{CouplingMode::kInverseBackward, per_sample_contiguous(y_b),
                    per_sample_contiguous(h), per_sample_contiguous(grad_x_b)};
  call.out = empty_output(y_b);
  call.grad_h = empty_output(h);
  if (y_b.numel() > 0) kernel(call);
  return {call.out, call.grad_h};
}

}  // namespace glow_ext
