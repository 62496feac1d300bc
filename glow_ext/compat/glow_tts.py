"""Drop-ins for the flow layers of Glow-TTS: jaywalnut310/glow-tts (`modules.py`) and coqui-ai/TTS
(`TTS/tts/layers/glow_tts/glow.py`).

- `ActNorm(channels, ddi=False)`: params `logs`, `bias` (1, C, 1). Plain PyTorch (elementwise).
- `InvConvNear(channels, n_split=4, no_jacobian=False)`: param `weight` (n_split, n_split)
  (jaywalnut310).
- `CoquiInvConvNear(channels, num_splits=4, no_jacobian=False)`: coqui's names, whose state_dict
  also holds `weight_inv` once `store_inverse()` has been called.

Contract: `forward(x, x_mask=None, reverse=False, **kwargs) -> (z, logdet)` with x (B, C, T),
x_mask (B, 1, T); z is multiplied by x_mask; logdet is per sample, (B,), scaled by the valid
length Σ_t x_mask (None in reverse). Extra keyword arguments (`g=`) are accepted and ignored, as
in the originals.
"""
import torch
from torch import nn

from .. import reference
from ..distributed import all_reduce_sum
from ._dense import DenseWeightCache

__all__ = ["ActNorm", "InvConvNear", "CoquiInvConvNear"]


def _valid_lengths(x, x_mask):
    """Σ_t x_mask per sample, or T for every sample without a mask."""
    if x_mask is None:
        return x.new_full((x.shape[0],), x.shape[2])
    return torch.sum(x_mask, [1, 2])


def _mark_initialized(module, state_dict, prefix, *args):
    # A checkpoint's ActNorm parameters are trained (or data-initialised) state: never overwrite
    # them by a data-dependent init (the original's flag is a plain attribute, so a model built
    # with ddi=True re-initialised over a loaded checkpoint on its first forward).
    if prefix + "bias" in state_dict and prefix + "logs" in state_dict:
        module.initialized = True


class ActNorm(nn.Module):
    """z = (bias + exp(logs)·x)·x_mask, logdet = Σ logs · x_len (B,); reverse
    x = (z − bias)·exp(−logs)·x_mask, logdet None.

    With ddi=True (or after `set_ddi(True)`) the first forward call initialises from the masked
    per-channel statistics of x: logs = −½·log(max(var, 1e-6)), bias = −mean·exp(logs), so that z
    has zero mean and unit variance over the valid positions. The flag `initialized` is a plain
    attribute, as in the original (the state_dict holds only `logs` and `bias`).

    Deviations: the variance is computed in two passes (mean, then mean squared deviation) instead
    of E[x²] − E[x]², which cancels when |mean| ≫ std; under torch.distributed the masked sums are
    added over ranks, so every replica initialises identically; a reverse call never initialises;
    loading a state_dict with `logs` and `bias` marks the layer initialised.
    """

    def __init__(self, channels, ddi=False, **kwargs):
        super().__init__()
        self.channels = channels
        self.initialized = not ddi
        self.logs = nn.Parameter(torch.zeros(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))
        self.register_load_state_dict_pre_hook(_mark_initialized)

    def forward(self, x, x_mask=None, reverse=False, **kwargs):
        if not self.initialized and not reverse:
            self.initialize(x, x_mask)
            self.initialized = True
        if reverse:
            z = (x - self.bias) * torch.exp(-self.logs)
            return (z if x_mask is None else z.mul_(x_mask)), None
        # The bias and the mask added and applied in place (no backward saves the product): two
        # input-sized buffers fewer, forward + backward 8.0 against 10.4 ms at (32, 160, 500).
        # (addcmul's backward multiplies x by its scalar factor, a whole pass more: 10.2 ms.)
        z = (torch.exp(self.logs) * x).add_(self.bias)
        logdet = torch.sum(self.logs) * _valid_lengths(x, x_mask)
        return (z if x_mask is None else z.mul_(x_mask)), logdet

    def store_inverse(self):
        """Nothing to store (the original's no-op, kept for its callers)."""

    def set_ddi(self, ddi):
        self.initialized = not ddi

    @torch.no_grad()
    def initialize(self, x, x_mask):
        mask = torch.ones_like(x[:, :1]) if x_mask is None else x_mask.to(x.dtype)
        count = all_reduce_sum(mask.sum())
        mean = all_reduce_sum(torch.sum(x * mask, [0, 2])) / count
        deviation = (x - mean.view(1, -1, 1)) * mask
        variance = all_reduce_sum(torch.sum(deviation * deviation, [0, 2])) / count
        logs = -0.5 * torch.log(torch.clamp_min(variance, 1e-6))
        self.logs.copy_(logs.view_as(self.logs))
        self.bias.copy_((-mean * torch.exp(logs)).view_as(self.bias))

    def extra_repr(self):
        return f"{self.channels}, initialized={self.initialized}"


class _SwapGroupsMasked(torch.autograd.Function):
    """x (B, 2, G1, G2, T) ↦ x.transpose(2, 3)·mask, written contiguous (B, 2, G2, G1, T) in one
    pass (the copy and the mask product together); mask (B, 1, 1, 1, T) or None. Linear in x, and
    its adjoint is the same swap with the same mask."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        swapped = x.transpose(2, 3)
        out = torch.empty(swapped.shape, dtype=x.dtype, device=x.device)
        if mask is None:
            return out.copy_(swapped)
        return torch.mul(swapped, mask, out=out)

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return _SwapGroupsMasked.apply(grad, mask), None


class InvConvNear(DenseWeightCache, nn.Module):
    """Invertible 1x1 convolution shared by groups of n_split channels (Glow-TTS).

    Channel a·C/2 + g·n_split/2 + h (a ∈ {0, 1}, g < C/n_split, h < n_split/2) is entry
    a·n_split/2 + h of group g; one n_split x n_split W mixes every group at every time step:
    z = regroup⁻¹(W·regroup(x))·x_mask, logdet = log|det W|·(C/n_split)·x_len (B,) (0 with
    no_jacobian). reverse: W⁻¹ instead of W, logdet None. `weight` starts as a random rotation
    with det > 0.

    On the fused kernels: the regrouped x, (B, n_split, C/n_split, T), is an n_split-channel map
    whose "pixels" are the (group, time step) pairs, and `glow_ext.ops.channel_map` applies W (or
    W⁻¹) to it. The regroup itself needs a copy: in x's layout the two halves a are C/2·T apart and
    the entries h of a group T apart, with the groups in between, so no strided view gives the
    kernel one channel stride. The copy in carries the x_mask product (the same pass; the mask is
    per time step, so it commutes with W), the copy out is a plain copy: three passes over x where
    the original makes four (copy, conv, copy, mask).

    W⁻¹ and log|det W| are derived only when W changes (glow_ext.compat._dense), so reverse always
    uses the current W; `store_inverse()` only computes it ahead of time. The original reverse uses
    the `weight_inv` stored by `store_inverse()` until it is called again. Log-determinant:
    log|det W| where the original's `torch.logdet` would be NaN (det W < 0, unreachable from the
    det > 0 init by training); for a non-0/1 x_mask, z differs from the original's by rounding
    (the mask multiplies before W, not after).
    """

    def __init__(self, channels, n_split=4, no_jacobian=False, **kwargs):
        super().__init__()
        assert n_split % 2 == 0
        self.channels = channels
        self.n_split = n_split
        self.no_jacobian = no_jacobian
        rotation = torch.linalg.qr(torch.randn(n_split, n_split))[0]
        if torch.det(rotation) < 0:
            rotation[:, 0] = -rotation[:, 0]
        self.weight = nn.Parameter(rotation)
        self._dense_cache = None

    def forward(self, x, x_mask=None, reverse=False, **kwargs):
        b, c, t = x.shape
        n = self.n_split
        assert c % n == 0
        mask = None
        if x_mask is not None:
            if x_mask.requires_grad:  # the fused regroup gives the mask no gradient
                x = x * x_mask
            else:
                mask = x_mask.view(b, 1, 1, 1, t)
        grouped = _SwapGroupsMasked.apply(x.reshape(b, 2, c // n, n // 2, t), mask)
        grouped = grouped.view(b, n, c // n, t)
        if reverse:
            mixed = self._dense_inverse_map(grouped, self.weight)
            logdet = None
        else:
            mixed = self._dense_map(grouped, self.weight)
            if self.no_jacobian:
                logdet = 0
            else:
                logdet = self._dense_logabsdet(self.weight) * (c / n) * _valid_lengths(x, x_mask)
        z = _SwapGroupsMasked.apply(mixed.view(b, 2, n // 2, c // n, t), None)
        return z.view(b, c, t), logdet

    def store_inverse(self):
        """Computes W⁻¹ now; reverse keeps it current by itself."""
        self._derived(self.weight, reference.accumulation_dtype(self.weight))

    def extra_repr(self):
        return f"{self.channels}, {self.n_split}, no_jacobian={self.no_jacobian}"


class CoquiInvConvNear(InvConvNear):
    """coqui-ai/TTS's `InvConvNear(channels, num_splits=4, no_jacobian=False)`: the same layer,
    with `num_splits` for n_split and coqui's `weight_inv`.

    coqui's `store_inverse()` registers W⁻¹ as a non-trainable Parameter `weight_inv`, so the
    state_dicts of models saved after it (e.g. for inference) hold that key. Here `weight_inv` is
    derived, never stored: `store_inverse()` (or loading a state_dict that holds `weight_inv`)
    makes `state_dict()` emit the current W⁻¹ under that key, so checkpoints load both ways with
    `strict=True`. A loaded `weight_inv` is not used: reverse inverts the current `weight` (coqui's
    uses whatever `weight_inv` holds, stale or not). Before `store_inverse()`, `weight_inv` is None,
    as in coqui.
    """

    def __init__(self, channels, num_splits=4, no_jacobian=False, **kwargs):
        super().__init__(channels, num_splits, no_jacobian)
        self._saves_inverse = False

    @property
    def num_splits(self):
        return self.n_split

    @property
    def weight_inv(self):
        if not self._saves_inverse:
            return None
        inverse = self._derived(self.weight, reference.accumulation_dtype(self.weight))[0]
        return inverse.to(self.weight.dtype)

    def store_inverse(self):
        super().store_inverse()
        self._saves_inverse = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._saves_inverse:
            destination[prefix + "weight_inv"] = self.weight_inv.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # load_state_dict works on a copy of the caller's dict: popping leaves the caller's intact.
        self._saves_inverse = state_dict.pop(prefix + "weight_inv", None) is not None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
