"""A dense C x C weight applied per pixel on the fused `channel_map` kernel, with its inverse and
log|det| derived once per change of the weight (shared by the WaveGlow and Glow-TTS drop-ins).

Forward needs nothing derived: y = W·x is `channel_map(x, W, 0)`, whose autograd gives W its
gradient. The inverse W⁻¹ and log|det W| are computed in float64 when W changes (in-place write,
replacement, optimizer step: glow_ext.cache_invalidation), never per call, and stay exact for the
current W. Their gradients come from the same cache: d log|det W| / dW = W⁻ᵀ and
d(W⁻¹) = −W⁻ᵀ·(·)·W⁻ᵀ, so no call differentiates through slogdet or inv.
"""
import torch

from .. import ops, reference
from ..cache_invalidation import CachesDerivedTensors, cache_filled, cache_key


class _LogAbsDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, logabsdet, inverse):
        ctx.save_for_backward(inverse)
        return logabsdet.clone()

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad * inverse.T, None, None


class _Inverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, inverse):
        ctx.save_for_backward(inverse)
        return inverse.clone()

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return -inverse.T @ grad @ inverse.T, None


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class DenseWeightCache(CachesDerivedTensors):
    """Mixin for a module with a dense invertible weight: `_dense_logabsdet(W)`, `_dense_map(x, W)`
    and `_dense_inverse_map(x, W)` for x (N, C, *spatial); W⁻¹ and log|det W| cached per W version."""

    _cache_attributes = ("_dense_cache",)

    def _derived(self, weight, dtype):
        """(W⁻¹ in dtype, log|det W| in the logdet dtype, zero offset in dtype) of the current W."""
        key = (dtype, cache_key((weight,)))
        if self._dense_cache is None or self._dense_cache[0] != key:
            with torch.no_grad():
                weight64 = weight.detach().to(torch.float64)
                # inv_ex: no error check, so no host synchronisation on CUDA (a singular W gives
                # log|det W| = −inf, which shows in the log-determinant).
                inverse = torch.linalg.inv_ex(weight64).inverse
                logabsdet = torch.linalg.slogdet(weight64)[1]
            self._dense_cache = (key, inverse.to(dtype),
                                 logabsdet.to(reference.logdet_dtype(weight)),
                                 weight.new_zeros(weight.shape[0], dtype=dtype))
            cache_filled()
        return self._dense_cache[1:]

    def _dense_logabsdet(self, weight):
        """log|det W| (0-dim, float32 for float32 or reduced-precision W, float64 for float64)."""
        inverse, logabsdet, _ = self._derived(weight, reference.logdet_dtype(weight))
        if _needs_autograd(weight):
            return _LogAbsDet.apply(weight, logabsdet, inverse)
        return logabsdet

    def _dense_map(self, x, weight):
        """W·x per position of x (N, C, *spatial)."""
        dtype = reference.accumulation_dtype(x)
        _, _, zeros = self._derived(weight, dtype)
        return ops.channel_map(x, weight.to(dtype), zeros)

    def _dense_inverse_map(self, x, weight):
        """W⁻¹·x per position of x (N, C, *spatial), differentiable in x and W."""
        dtype = reference.accumulation_dtype(x)
        inverse, _, zeros = self._derived(weight, dtype)
        if _needs_autograd(weight):
            inverse = _Inverse.apply(weight.to(dtype), inverse)
        return ops.channel_map(x, inverse, zeros)
