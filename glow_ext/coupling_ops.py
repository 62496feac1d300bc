"""The fused affine coupling ops.

For the coupling network's output h = (shift, logit), its first and second channel halves (the
layout of `glow_ext.nn.AffineCoupling`), and the active half x_b of shape (N, C, H, W):

    y_b = (x_b + shift)·sigmoid(logit + 2),    logdet = Σ_{c,h,w} log sigmoid(logit + 2)  (N,)

in one pass over the elements, and the inverse x_b = y_b / sigmoid(logit + 2) - shift. log sigmoid
is evaluated in its softplus form, finite at any finite logit. logdet is in the accumulation dtype
(float64 for float64 inputs, float32 otherwise). Gradients flow to x_b and h (to y_b and h through
the inverse); the backward passes are ops themselves. Outputs are contiguous; inputs whose samples
are contiguous blocks (channel slices of an NCHW tensor) are read in place, others are copied.

dtypes: x_b (y_b) and h share one, or x_b is float32 and h is bfloat16 or float16 (the network's
output under autocast, read without a float32 copy). The arithmetic is in the accumulation dtype
whatever the storage; y_b (x_b) takes the input's dtype and dL/dh h's, each rounded once.

The kernels are `torch.ops.glow_ext.affine_coupling*` (CPU float32, float64 and bfloat16; CUDA also
float16). Without them every function falls back, with a warning, to `glow_ext.reference`.
"""
import warnings

import torch

from . import ops, reference

__all__ = ["affine_coupling", "affine_coupling_inverse", "kernels_available"]

_AVAILABLE = ops.kernels_available() and hasattr(torch.ops.glow_ext, "affine_coupling")
if ops.kernels_available() and not _AVAILABLE:  # pragma: no cover - a stale build
    warnings.warn(
        "glow_ext: the compiled extension predates the affine coupling ops; they fall back to the "
        "pure-PyTorch reference. Rebuild with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def kernels_available() -> bool:
    return _AVAILABLE


def affine_coupling(x_b, h):
    """(y_b, logdet): y_b = (x_b + shift)·sigmoid(logit + 2), logdet (N,) = Σ log sigmoid(logit + 2),
    where shift, logit = h[:, :C], h[:, C:]."""
    if not _AVAILABLE:
        return reference.affine_coupling(x_b, h)
    return torch.ops.glow_ext.affine_coupling(x_b, h)


def affine_coupling_inverse(y_b, h):
    """x_b = y_b / sigmoid(logit + 2) - shift."""
    if not _AVAILABLE:
        return reference.affine_coupling_inverse(y_b, h)
    return torch.ops.glow_ext.affine_coupling_inverse(y_b, h)


_NARROW_H_DTYPES = (torch.float16, torch.bfloat16)


def _logdet_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_fake_args(op, input_name, x, h):
    """The compiled kernels' argument checks, for meta tensors and tracing."""
    torch._check(x.dim() == 4, lambda: f"{op}: `{input_name}` must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    torch._check(h.dim() == 4, lambda: f"{op}: `h` must be 4-D (N, 2C, H, W), got {tuple(h.shape)}")
    if h.device != x.device:
        raise RuntimeError(f"{op}: `h` is on {h.device} but `{input_name}` is on {x.device}; both "
                           "must be on one device")
    if h.dtype != x.dtype and not (x.dtype == torch.float32 and h.dtype in _NARROW_H_DTYPES):
        raise RuntimeError(f"{op}: `h` has dtype {h.dtype} but `{input_name}` has dtype {x.dtype}; "
                           f"`h` must have the dtype of `{input_name}`, or be float16/bfloat16 with "
                           f"a float32 `{input_name}`")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"{op}: `{input_name}` must be a floating-point tensor, got {x.dtype}")
    n, c, height, width = x.shape
    torch._check(h.shape[1] % 2 == 0, lambda: f"{op}: `h` must have an even number of channels "
                 f"(shifts, then scale logits), got {h.shape[1]}")
    torch._check(tuple(h.shape) == (n, 2 * c, height, width), lambda: f"{op}: `h` must have shape "
                 f"(N, 2C, H, W) = {(n, 2 * c, height, width)} for `{input_name}` of shape "
                 f"{tuple(x.shape)}, got {tuple(h.shape)}")


def _empty_contiguous(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


if _AVAILABLE:

    @torch.library.register_fake("glow_ext::affine_coupling")
    def _forward_fake(x_b, h):
        _check_fake_args("glow_ext::affine_coupling", "x_b", x_b, h)
        return _empty_contiguous(x_b), x_b.new_empty((x_b.shape[0],), dtype=_logdet_dtype(x_b.dtype))

    @torch.library.register_fake("glow_ext::affine_coupling_inverse")
    def _inverse_fake(y_b, h):
        _check_fake_args("glow_ext::affine_coupling_inverse", "y_b", y_b, h)
        return _empty_contiguous(y_b)

    @torch.library.register_fake("glow_ext::affine_coupling_backward")
    def _backward_fake(grad_y_b, grad_logdet, x_b, h):
        _check_fake_args("glow_ext::affine_coupling_backward", "x_b", x_b, h)
        return _empty_contiguous(x_b), _empty_contiguous(h)

    @torch.library.register_fake("glow_ext::affine_coupling_inverse_backward")
    def _inverse_backward_fake(grad_x_b, y_b, h):
        _check_fake_args("glow_ext::affine_coupling_inverse_backward", "y_b", y_b, h)
        return _empty_contiguous(y_b), _empty_contiguous(h)

    def _save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _forward_backward(ctx, grad_y_b, grad_logdet):
        x_b, h = ctx.saved_tensors
        if grad_y_b is None:
            grad_y_b = torch.zeros_like(x_b)
        if grad_logdet is None:
            grad_logdet = x_b.new_zeros((x_b.shape[0],), dtype=_logdet_dtype(x_b.dtype))
        return torch.ops.glow_ext.affine_coupling_backward(grad_y_b, grad_logdet, x_b, h)

    torch.library.register_autograd(
        "glow_ext::affine_coupling", _forward_backward, setup_context=_save_inputs)

    def _inverse_backward(ctx, grad_x_b):
        y_b, h = ctx.saved_tensors
        return torch.ops.glow_ext.affine_coupling_inverse_backward(grad_x_b, y_b, h)

    torch.library.register_autograd(
        "glow_ext::affine_coupling_inverse", _inverse_backward, setup_context=_save_inputs)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "glow_ext: double backward through affine_coupling is not supported (its backward op "
            "has no derivative). Use glow_ext.reference.affine_coupling for higher-order gradients.")

    for _name in ("affine_coupling_backward", "affine_coupling_inverse_backward"):
        torch.library.register_autograd(
            f"glow_ext::{_name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None)
