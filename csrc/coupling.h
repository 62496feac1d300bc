// Device-generic algorithm of the fused affine coupling ops.
//
// y_b = (x_b + shift)·sigmoid(logit + 2) and logdet = Σ log sigmoid(logit + 2) per sample, with
// h = (shift, logit) the coupling network's output split into channel halves (the layout of
// glow_ext.nn.AffineCoupling). Validation, layouts and output allocation are written once here;
// each backend file supplies one kernel that runs a call in any of the four modes and registers
// the ops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "coupling_math.h"

namespace glow_ext {

using math::CouplingMode;

// One op call, validated: inputs have C·H·W contiguous elements per sample (any sample stride),
// outputs are allocated contiguous, and there is at least one element.
struct CouplingCall {
  CouplingMode mode;
  at::Tensor input;        // x_b (forward, backward) or y_b (inverse, inverse backward)
  at::Tensor h;            // (N, 2C, H, W)
  at::Tensor grad;         // backward modes: dL/d(output), input's shape
  at::Tensor grad_logdet;  // kBackward: (N,) contiguous, accumulation dtype
  at::Tensor out;          // (N, C, H, W): y_b, x_b, or dL/d(input)
  at::Tensor grad_h;       // backward modes: (N, 2C, H, W)
  at::Tensor logdet;       // kForward: (N,) accumulation dtype
};

// Runs a call: fills out (and grad_h or logdet) without synchronising with the host.
using CouplingKernel = void (*)(const CouplingCall& call);

std::tuple<at::Tensor, at::Tensor> affine_coupling(CouplingKernel kernel, const at::Tensor& x_b,
                                                   const at::Tensor& h);

at::Tensor affine_coupling_inverse(CouplingKernel kernel, const at::Tensor& y_b, const at::Tensor& h);

// Returns (grad_x_b, grad_h).
std::tuple<at::Tensor, at::Tensor> affine_coupling_backward(CouplingKernel kernel,
                                                            const at::Tensor& grad_y_b,
                                                            const at::Tensor& grad_logdet,
                                                            const at::Tensor& x_b,
                                                            const at::Tensor& h);

// Returns (grad_y_b, grad_h).
std::tuple<at::Tensor, at::Tensor> affine_coupling_inverse_backward(CouplingKernel kernel,
                                                                    const at::Tensor& grad_x_b,
                                                                    const at::Tensor& y_b,
                                                                    const at::Tensor& h);

// The op signatures declared in ops.cpp, bound to one backend's kernel for TORCH_LIBRARY_IMPL.
template <CouplingKernel kKernel>
struct BoundCouplingOps {
  static std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x_b, const at::Tensor& h) {
    return affine_coupling(kKernel, x_b, h);
  }
  static at::Tensor inverse_op(const at::Tensor& y_b, const at::Tensor& h) {
    return affine_coupling_inverse(kKernel, y_b, h);
  }
  static std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_y_b,
                                                        const at::Tensor& grad_logdet,
                                                        const at::Tensor& x_b, const at::Tensor& h) {
    return affine_coupling_backward(kKernel, grad_y_b, grad_logdet, x_b, h);
  }
  static std::tuple<at::Tensor, at::Tensor> inverse_backward_op(const at::Tensor& grad_x_b,
                                                                const at::Tensor& y_b,
                                                                const at::Tensor& h) {
    return affine_coupling_inverse_backward(kKernel, grad_x_b, y_b, h);
  }
};

}  // namespace glow_ext
