"""Invertible 1x1 convolutions: the LU-parametrised one on the fused ops (alone, or fused with
ActNorm), and the dense baseline."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .actnorm import DataDependentActNorm
from .cache_invalidation import CachesDerivedTensors, cache_filled, cache_key


def random_rotation_lu(num_channels, generator=None, dtype=torch.float32):
    """LU factors of a random rotation (QR of a Gaussian), as the paper initialises W.

    Returns perm, lower, upper, log_s, sign_s with W = P·L·(U + diag(sign_s·exp(log_s))).
    """
    gaussian = torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(gaussian)
    p, lower, upper = torch.linalg.lu(rotation)
    diag = torch.diagonal(upper)
    return (
        p.argmax(dim=1),
        torch.tril(lower, -1).to(dtype),
        torch.triu(upper, 1).to(dtype),
        diag.abs().log().to(dtype),
        diag.sign().to(dtype),
    )


def check_permutation(perm: torch.Tensor, num_channels: int) -> None:
    if perm.dtype != torch.int64 or perm.shape != (num_channels,):
        raise ValueError(f"perm must be an int64 tensor of shape ({num_channels},), got "
                         f"{perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(perm.sort().values.cpu(), torch.arange(num_channels)):
        raise ValueError(f"perm must be a permutation of 0..{num_channels - 1}")


class InvConv2dLU(CachesDerivedTensors, nn.Module):
    """The LU-parametrised invertible 1x1 convolution alone, on the fused op with an identity ActNorm.

    W = P·L·(U + diag(sign_s·exp(log_s))); logdet = H·W·Σ log_s (0-dim). `bias` and `logs` are zero
    non-persistent buffers (not in the state_dict), so the layer's state is exactly perm, lower,
    upper, log_s, sign_s.

    reverse: when autograd needs the inverse (grad mode with y or a parameter requiring grad) it runs
    the differentiable inverse op (triangular solves on every call). Otherwise - sampling, or decode
    under no_grad - the folded inverse map diag(exp(−logs))·W⁻¹ is computed once and cached, and each
    call is one `glow_ext.ops.channel_map` pass over the pixels. An optimizer step, load_state_dict
    or a move to another device or dtype invalidates the cache (see glow_ext.cache_invalidation);
    `clear_cache()` drops it.
    """

    _cache_attributes = ("_inverse_cache",)

    def __init__(self, num_channels: int, generator=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        perm, lower, upper, log_s, sign_s = random_rotation_lu(num_channels, generator)
        check_permutation(perm, num_channels)
        self._register_actnorm(num_channels)
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(upper)
        self.log_s = nn.Parameter(log_s)
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", sign_s)
        self._inverse_cache = None  # (key, weight, offset) of the folded inverse map

    def _register_actnorm(self, num_channels: int) -> None:
        self.register_buffer("bias", torch.zeros(num_channels), persistent=False)
        self.register_buffer("logs", torch.zeros(num_channels), persistent=False)

    def _params(self):
        return (self.bias, self.logs, self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    def forward(self, x: torch.Tensor):
        return ops.actnorm_invconv_lu(x, *self._params())

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        params = self._params()
        needs_autograd = torch.is_grad_enabled() and (
            y.requires_grad or any(t.requires_grad for t in params))
        if needs_autograd or torch.compiler.is_compiling():
            return ops.actnorm_invconv_lu_inverse(y, *params)
        return ops.channel_map(y, *self.inverse_map(reference.accumulation_dtype(y)))

    @torch.no_grad()
    def inverse_map(self, dtype: torch.dtype = torch.float32):
        """(weight (C, C), offset (C,)) with x = weight·y + offset the layer's inverse per pixel,
        in `dtype`; cached until a parameter changes. Computed in float64 from two triangular
        solves: the LU factors of a rotation are far worse conditioned than W itself."""
        key = (dtype, cache_key(self._params()))
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            c = self.num_channels
            unit_lower, upper_factor = reference.lu_factors(
                self.lower, self.upper, self.log_s, self.sign_s, torch.float64)
            perm_transposed = torch.eye(c, dtype=torch.float64, device=self.lower.device)[:, self.perm]
            w_inv = torch.linalg.solve_triangular(unit_lower, perm_transposed, upper=False,
                                                  unitriangular=True)
            w_inv = torch.linalg.solve_triangular(upper_factor, w_inv, upper=True)
            weight = w_inv * (-self.logs.to(torch.float64)).exp().unsqueeze(1)
            self._inverse_cache = (key, weight.to(dtype), (-self.bias).to(dtype))
            cache_filled()
        return self._inverse_cache[1:]

    def weight(self) -> torch.Tensor:
        """The assembled C x C matrix W (for inspection; the ops never need it)."""
        return reference.lu_weight(self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class ActNormInvConv(DataDependentActNorm, InvConv2dLU):
    """ActNorm followed by an LU-parametrised invertible 1x1 convolution, in one fused op, for
    input of any rank (N, C, *spatial): feature vectors (N, C), sequences (N, C, T), images, volumes.

    y = W·((x + bias)·exp(logs)) at every position, logdet = M·(Σ logs + Σ log_s) (a 0-dim tensor,
    the same for every sample), M = the product of the spatial sizes (1 for (N, C)). ActNorm
    initialises from the first training batch so that its output has zero mean and standard
    deviation `scale` per channel over N and the positions; the flag is a buffer, so a loaded
    checkpoint is never re-initialised. Under torch.distributed the statistics are averaged over
    ranks. W starts as a random rotation.

    Length masks (padded batches of sequences, as in Glow-TTS): `forward(x, x_mask)` and
    `reverse(y, x_mask)` take x_mask of shape (N, 1, *spatial), float 0/1 or bool, 1 (True) at
    the valid positions. The output is multiplied by the mask, so padded positions are zero (the
    padding must be finite: 0·Inf is NaN), and the logdet is per sample, shape (N,):
    logdet_n = (Σ_positions x_mask_n)·(Σ logs + Σ log_s), differentiable in logs and log_s. The
    data-dependent init then uses the valid positions only (whatever the padding holds); under
    torch.distributed the masked sums and valid counts are added over ranks before dividing, so
    the statistics are those of the union of the ranks' valid positions. Without a mask nothing
    changes: logdet stays 0-dim.
    """

    def __init__(self, num_channels: int, scale: float = 1.0, generator=None):
        super().__init__(num_channels, generator)
        self.scale = scale

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor = None):
        if x_mask is None:
            self._initialize_if_needed(x)
            return super().forward(x)
        mask = _checked_mask(x_mask, x)
        self._initialize_if_needed(x, mask != 0)
        y, logdet = super().forward(x)
        return y * mask.to(y.dtype), _per_sample_logdet(logdet, mask, x)

    def reverse(self, y: torch.Tensor, x_mask: torch.Tensor = None) -> torch.Tensor:
        if x_mask is None:
            return super().reverse(y)
        mask = _checked_mask(x_mask, y)
        x = super().reverse(y)
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}"


def _checked_mask(x_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    expected = (x.shape[0], 1, *x.shape[2:])
    if x_mask.shape != expected or not (x_mask.dtype == torch.bool or x_mask.is_floating_point()):
        raise ValueError(f"x_mask must be a float (0/1) or bool tensor of shape (N, 1, *spatial) = "
                         f"{expected} for input of shape {tuple(x.shape)}; got {x_mask.dtype} "
                         f"{tuple(x_mask.shape)}")
    return x_mask


def _per_sample_logdet(logdet: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The op's logdet (M positions per sample) rescaled to each sample's valid count, (N,); the
    rescaling keeps the op's gradient to logs and log_s."""
    positions = max(math.prod(x.shape[2:]), 1)  # an empty spatial size has no valid position either
    valid_counts = mask.sum(dim=tuple(range(1, mask.dim())), dtype=logdet.dtype)
    return logdet / positions * valid_counts


class ActNormInvConv2d(ActNormInvConv):
    """ActNormInvConv for images only: (N, C, H, W) input, H·W positions per sample. Same
    parameters and state_dict. Takes an optional (N, 1, H, W) x_mask like ActNormInvConv (masked
    pixels, per-sample logdet)."""

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor = None):
        _check_image(x)
        return super().forward(x, x_mask)

    def reverse(self, y: torch.Tensor, x_mask: torch.Tensor = None) -> torch.Tensor:
        _check_image(y)
        return super().reverse(y, x_mask)


def _check_image(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"ActNormInvConv2d takes 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
                         "glow_ext.nn.ActNormInvConv takes any (N, C, *spatial)")


def _mix_channels(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight·x at every pixel, in x's dtype even under autocast: the map is part of the flow."""
    c = weight.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(x, weight.view(c, c, 1, 1))


class InvConv2d(nn.Module):
    """The naive invertible 1x1 convolution, kept as the baseline: a dense weight W (C, C).

    y = W·x per pixel (F.conv2d), logdet = H·W·log|det W| through slogdet (in float64) every call,
    reverse through a general inverse of W (in float64) every call. W starts as a random rotation.
    """

    def __init__(self, num_channels: int, generator=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        gaussian = torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64)
        rotation, _ = torch.linalg.qr(gaussian)
        self.weight = nn.Parameter(rotation.to(torch.float32))

    def forward(self, x: torch.Tensor):
        y = _mix_channels(x, self.weight)
        logabsdet = torch.linalg.slogdet(self.weight.to(torch.float64))[1].to(self.weight.dtype)
        return y, logabsdet * (x.shape[2] * x.shape[3])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        inverse = torch.linalg.inv(self.weight.to(torch.float64)).to(self.weight.dtype)
        return _mix_channels(y, inverse)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"
