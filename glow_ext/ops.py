"""The fused ActNorm + LU invertible 1x1 convolution ops.

The kernels live in the compiled extension as `torch.ops.glow_ext.*` (CPU, and CUDA when built with
it); this module registers their fake (meta) kernels and autograd formulas. Without the extension
every function falls back, with a warning, to `glow_ext.reference`; `glow_ext._loader` finds
the module (or says why there is none).

Conventions (see docs/design.md): x is (N, C, *spatial): (N, C), a sequence (N, C, T), an image
(N, C, H, W) or a volume; every op works per position. bias, logs, log_s, sign_s are (C,); perm is (C,) int64
with P[i, j] = 1 iff j == perm[i]; only the strict lower part of `lower` and the strict upper part
of `upper` are read. W = P·(I + strict_lower(lower))·(strict_upper(upper) + diag(sign_s·exp(log_s))).
Parameters share one dtype, equal to x's; float32 parameters also serve bfloat16 x (float16 x: CUDA only),
which is then computed in float32 and rounded once per output.

Argument checks raise RuntimeError naming the argument. Two checks would need a host
synchronisation on CUDA and run on the CPU only: that `perm` is a permutation and that `log_s` is
finite. On CUDA the layers in `glow_ext.nn` validate `perm` once when they build it.
"""
import contextlib
import math
import warnings

import torch

from . import reference
from ._loader import load_kernels

# The compiled module (it registers torch.ops.glow_ext when loaded), or None and why not.
_C, LOAD_ERROR, BUILD_METADATA = load_kernels()
if _C is not None:
    # Read once: the fake kernels consult it while tracing, where calling an op would be traced too.
    _FACTORED_PATH_CHANNELS = torch.ops.glow_ext._factored_path_channels()
else:
    warnings.warn(
        f"glow_ext: the compiled kernels could not be loaded: {LOAD_ERROR}. Every op falls back to "
        "the pure-PyTorch reference, which is much slower.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = ["actnorm_invconv_lu", "actnorm_invconv_lu_inverse", "channel_map", "kernels_available"]


def kernels_available() -> bool:
    return _C is not None


def actnorm_invconv_lu(x, bias, logs, perm, lower, upper, log_s, sign_s):
    """(y, logdet): y = W·((x + bias)·exp(logs)) per position, logdet = M·(Σ logs + Σ log_s), 0-dim,
    where M is the positions per sample (the product of the spatial sizes; 1 for (N, C))."""
    if _C is None:
        return reference.actnorm_invconv_lu(x, bias, logs, perm, lower, upper, log_s, sign_s)
    inputs = (x, bias, logs, perm, lower, upper, log_s, sign_s)
    mode = _call_mode(inputs)
    if mode == "training":
        return _FusedActNormInvConvLU.apply(*inputs)
    if mode == "inference":
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.glow_ext.actnorm_invconv_lu.default(*inputs)
    # The training form: the same op that also hands its folded map to its backward.
    y, logdet, _ = torch.ops.glow_ext._actnorm_invconv_lu_train(*inputs)
    return y, logdet


def actnorm_invconv_lu_inverse(y, bias, logs, perm, lower, upper, log_s, sign_s):
    """x = (W⁻¹·y)·exp(−logs) − bias, from the triangular factors (never a general inverse)."""
    if _C is None:
        return reference.actnorm_invconv_lu_inverse(y, bias, logs, perm, lower, upper, log_s, sign_s)
    inputs = (y, bias, logs, perm, lower, upper, log_s, sign_s)
    mode = _call_mode(inputs)
    if mode == "training":
        return _FusedActNormInvConvLUInverse.apply(*inputs)
    if mode == "inference":
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.glow_ext.actnorm_invconv_lu_inverse.default(*inputs)
    return torch.ops.glow_ext._actnorm_invconv_lu_inverse_train(*inputs)[0]


def uses_factored_path(channels, pixels):
    """Whether the kernels apply the triangular factors to the N·M positions instead of assembling W
    (deep levels: use_factored_path in csrc/actnorm_invconv.cpp). Never without the kernels."""
    return _C is not None and channels > _FACTORED_PATH_CHANNELS and pixels < channels


def channel_map(x, weight, offset):
    """y = weight·x + offset at every position, for a (C, C) map and (C,) offset precomputed by the
    caller (the layers' cached inverse). weight and offset are in x's accumulation dtype: float64 for
    float64 x, float32 otherwise."""
    if _C is None:
        return reference.channel_map(x, weight, offset)
    mode = _call_mode((x, weight, offset))
    if mode == "training":
        return _ChannelMap.apply(x, weight, offset)
    if mode == "inference":
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.glow_ext.channel_map.default(x, weight, offset)
    return torch.ops.glow_ext.channel_map(x, weight, offset)


_PARAM_NAMES = ("bias", "logs", "perm", "lower", "upper", "log_s", "sign_s")


def positions_per_sample(x):
    """M: the product of x's spatial sizes (1 for an (N, C) input)."""
    return math.prod(x.shape[2:])


def _check_fake_rank(op, input_name, x):
    torch._check(x.dim() >= 2, lambda: f"{op}: `{input_name}` must be at least 2-D (N, C, *spatial), "
                                       f"got {tuple(x.shape)}")


def _check_fake_args(op, input_name, x, params):
    """The shape and device checks of the compiled kernels, for meta tensors and tracing."""
    _check_fake_rank(op, input_name, x)
    for name, tensor in zip(_PARAM_NAMES, params):
        if tensor.device != x.device:
            raise RuntimeError(f"{op}: `{name}` is on {tensor.device} but `{input_name}` is on "
                               f"{x.device}; all arguments must be on one device")


if _C is not None:

    @torch.library.register_fake("glow_ext::actnorm_invconv_lu")
    def _forward_fake(x, *params):
        _check_fake_args("glow_ext::actnorm_invconv_lu", "x", x, params)
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                params[0].new_empty((), dtype=reference.logdet_dtype(params[0])))

    @torch.library.register_fake("glow_ext::actnorm_invconv_lu_inverse")
    def _inverse_fake(y, *params):
        _check_fake_args("glow_ext::actnorm_invconv_lu_inverse", "y", y, params)
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    def _saved_map_fake(x):
        """The training ops' map: (C, C) in the accumulation dtype, (0, C) on the factored path."""
        c, pixels = x.shape[1], x.shape[0] * positions_per_sample(x)
        rows = 0 if x.numel() == 0 or uses_factored_path(c, pixels) else c
        return x.new_empty((rows, c), dtype=reference.accumulation_dtype(x))

    @torch.library.register_fake("glow_ext::_actnorm_invconv_lu_train")
    def _forward_train_fake(x, *params):
        return _forward_fake(x, *params) + (_saved_map_fake(x),)

    @torch.library.register_fake("glow_ext::_actnorm_invconv_lu_inverse_train")
    def _inverse_train_fake(y, *params):
        return _inverse_fake(y, *params), _saved_map_fake(y)

    @torch.library.register_fake("glow_ext::actnorm_invconv_lu_backward")
    def _backward_fake(grad_y, grad_logdet, x, bias, logs, perm, lower, upper, log_s, sign_s,
                       folded=None):
        _check_fake_args("glow_ext::actnorm_invconv_lu_backward", "x", x,
                         (bias, logs, perm, lower, upper, log_s, sign_s))
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(bias),
            torch.empty_like(logs),
            torch.empty_like(lower),
            torch.empty_like(upper),
            torch.empty_like(log_s),
        )

    @torch.library.register_fake("glow_ext::actnorm_invconv_lu_inverse_backward")
    def _inverse_backward_fake(grad_x, x, bias, logs, perm, lower, upper, log_s, sign_s,
                               folded_inverse=None):
        _check_fake_args("glow_ext::actnorm_invconv_lu_inverse_backward", "x", x,
                         (bias, logs, perm, lower, upper, log_s, sign_s))
        return _backward_fake(grad_x, None, x, bias, logs, perm, lower, upper, log_s, sign_s)

    @torch.library.register_fake("glow_ext::channel_map")
    def _channel_map_fake(x, weight, offset):
        op = "glow_ext::channel_map"
        _check_fake_rank(op, "x", x)
        for name, tensor in (("weight", weight), ("offset", offset)):
            if tensor.device != x.device:
                raise RuntimeError(f"{op}: `{name}` is on {tensor.device} but `x` is on {x.device}; "
                                   "all arguments must be on one device")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _channel_map_setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    def _channel_map_backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_offset = None
        with _below_autograd_unless_double_backward():
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.glow_ext.channel_map(grad_y, weight.T.contiguous(),
                                                        weight.new_zeros(weight.shape[0]))
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                g = grad_y.to(weight.dtype)
                g = g.reshape(g.shape[0], g.shape[1], -1)
                if ctx.needs_input_grad[1]:
                    # Σ_n g_n·x_nᵀ as one batched GEMM of the (N, C, M) views: no transposed copies.
                    grad_weight = torch.bmm(
                        g, x.to(weight.dtype).reshape(g.shape).transpose(1, 2)).sum(0)
                if ctx.needs_input_grad[2]:
                    grad_offset = g.sum(dim=(0, 2))
        return grad_x, grad_weight, grad_offset

    torch.library.register_autograd(
        "glow_ext::channel_map", _channel_map_backward, setup_context=_channel_map_setup_context)

    # Autograd of the public ops recomputes the folded map in the backward; that of the training
    # forms saves the map their forward returned.
    def _forward_setup_context(ctx, inputs, output):
        folded = output[2] if len(output) == 3 else None
        if folded is not None:
            ctx.mark_non_differentiable(folded)
        ctx.save_for_backward(*inputs, folded)

    def _forward_grads(saved, grad_y, grad_logdet):
        """The eight input gradients from the saved (x, parameters, map or None)."""
        x, bias, logs, perm, lower, upper, log_s, sign_s, folded = saved
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = torch.zeros((), dtype=bias.dtype, device=bias.device)
        with _below_autograd_unless_double_backward():
            grad_x, grad_bias, grad_logs, grad_lower, grad_upper, grad_log_s = (
                torch.ops.glow_ext.actnorm_invconv_lu_backward.default(
                    grad_y, grad_logdet, x, bias, logs, perm, lower, upper, log_s, sign_s, folded))
        return grad_x, grad_bias, grad_logs, None, grad_lower, grad_upper, grad_log_s, None

    def _forward_backward(ctx, grad_y, grad_logdet, grad_folded=None):
        return _forward_grads(ctx.saved_tensors, grad_y, grad_logdet)

    def _inverse_setup_context(ctx, inputs, output):
        if isinstance(output, tuple):
            x, folded_inverse = output
            ctx.mark_non_differentiable(folded_inverse)
        else:
            x, folded_inverse = output, None
        ctx.save_for_backward(x, *inputs[1:], folded_inverse)

    def _inverse_grads(saved, grad_x):
        # x = f⁻¹(y; θ): implicit differentiation in the backward op (dL/dy = J⁻ᵀ·dL/dx with
        # J = W·diag(exp(logs)), dL/dθ = −(∂f/∂θ)ᵀ·dL/dy at (x, θ)).
        x, *params, folded_inverse = saved
        with _below_autograd_unless_double_backward():
            grad_y, grad_bias, grad_logs, grad_lower, grad_upper, grad_log_s = (
                torch.ops.glow_ext.actnorm_invconv_lu_inverse_backward.default(
                    grad_x, x, *params, folded_inverse))
        return grad_y, grad_bias, grad_logs, None, grad_lower, grad_upper, grad_log_s, None

    def _inverse_backward(ctx, grad_x, grad_folded_inverse=None):
        return _inverse_grads(ctx.saved_tensors, grad_x)

    for _name, _backward, _setup in (
            ("actnorm_invconv_lu", _forward_backward, _forward_setup_context),
            ("_actnorm_invconv_lu_train", _forward_backward, _forward_setup_context),
            ("actnorm_invconv_lu_inverse", _inverse_backward, _inverse_setup_context),
            ("_actnorm_invconv_lu_inverse_train", _inverse_backward, _inverse_setup_context)):
        torch.library.register_autograd(f"glow_ext::{_name}", _backward, setup_context=_setup)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "glow_ext: double backward through actnorm_invconv_lu is not supported (its backward "
            "op has no derivative). Use glow_ext.reference.actnorm_invconv_lu for higher-order "
            "gradients.")

    for _backward_op in ("actnorm_invconv_lu_backward", "actnorm_invconv_lu_inverse_backward"):
        torch.library.register_autograd(
            f"glow_ext::{_backward_op}", _no_double_backward,
            setup_context=lambda ctx, inputs, output: None)

    # glow_ext.ops' eager training path. The registrations above are what torch.ops callers,
    # opcheck and torch.compile use; in eager mode their Python wrapper (a redispatch through
    # Python per op call, schema defaults filled in per call) cost 55-112 µs more per forward +
    # backward than these Functions (2 threads, 1x4x2x2 ... 4x192x8x8): 15-20% of a
    # small Glow level's training step. Same ops, same saved tensors, same backward.
    class _FusedActNormInvConvLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                y, logdet, folded = torch.ops.glow_ext._actnorm_invconv_lu_train.default(*inputs)
            ctx.save_for_backward(*inputs, folded)
            return y, logdet

        @staticmethod
        def backward(ctx, grad_y, grad_logdet):
            return _forward_grads(ctx.saved_tensors, grad_y, grad_logdet)

    class _ChannelMap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, offset):
            with torch._C._AutoDispatchBelowAutograd():
                y = torch.ops.glow_ext.channel_map.default(x, weight, offset)
            ctx.save_for_backward(x, weight)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            return _channel_map_backward(ctx, grad_y)

    class _FusedActNormInvConvLUInverse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, *params):
            with torch._C._AutoDispatchBelowAutograd():
                x, folded_inverse = torch.ops.glow_ext._actnorm_invconv_lu_inverse_train.default(y, *params)
            ctx.save_for_backward(x, *params, folded_inverse)
            return x

        @staticmethod
        def backward(ctx, grad_x):
            return _inverse_grads(ctx.saved_tensors, grad_x)


def _call_mode(inputs):
    """How an eager call runs the kernels: "training" when it records autograd (the Functions'
    fast path), "inference" when there is nothing to record (the op below the autograd key, without
    its registration's Python wrapper: 4.5 instead of 9.7 µs per channel_map call at 1x8x64), and
    "traced" under torch.compile (the registered ops and their autograd)."""
    if torch.compiler.is_compiling():
        return "traced"
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return "training"
    return "inference"


def _below_autograd_unless_double_backward():
    """The backward ops run below autograd (no Python redispatch) unless the backward itself is
    recorded (create_graph=True): then through their registration, which raises when used."""
    if torch.is_grad_enabled():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()
