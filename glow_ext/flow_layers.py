"""The rest of a Glow model around the fused ActNormInvConv2d, in plain PyTorch: channel
permutations, squeeze, the coupling layers, Split and FlowStep.

Contract shared by every invertible layer here: forward(x) -> (y, logdet) with logdet either
per-sample (N,) or a 0-dim tensor (the same for every sample, broadcastable to (N,)), and
reverse(y) -> x. Split, which changes the number of tensors, has its own contract (see there).
"""
import math

import torch
from torch import nn

from . import coupling_ops
from .actnorm import ActNorm2d
from .coupling_network import CouplingNN, ZeroConv2d
from .invconv import ActNormInvConv2d, InvConv2d

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv_lu", "invconv", "shuffle", "reverse")


def _zero_logdet(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


class Shuffle(nn.Module):
    """A fixed random channel permutation (drawn once, stored as a buffer); logdet 0."""

    def __init__(self, num_channels: int, generator=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        perm = torch.randperm(num_channels, generator=generator)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(num_channels)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", inverse)

    def forward(self, x: torch.Tensor):
        return x.index_select(1, self.perm), _zero_logdet(x)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(1, self.inverse_perm)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class Reverse(nn.Module):
    """Reverses the channel order (its own inverse); logdet 0."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor):
        return x.flip(1), _zero_logdet(x)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


def squeeze2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, C, H, W) -> (N, C·f², H/f, W/f): each f x f block of pixels becomes f² channels.

    Output channel c·f² + i·f + j holds input channel c at block offset (i, j)."""
    if x.dim() != 4:
        raise ValueError(f"squeeze2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"squeeze2d needs H and W divisible by {factor}, got H={h}, W={w} "
                         f"(input shape {tuple(x.shape)})")
    x = x.reshape(n, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The inverse of squeeze2d: (N, C·f², H, W) -> (N, C, H·f, W·f)."""
    if x.dim() != 4:
        raise ValueError(f"unsqueeze2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c % (factor * factor):
        raise ValueError(f"unsqueeze2d needs C divisible by {factor * factor}, got C={c}")
    x = x.reshape(n, c // (factor * factor), factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(n, c // (factor * factor), h * factor, w * factor)


class Squeeze2d(nn.Module):
    """squeeze2d as a layer: forward(x) -> (squeezed, 0-dim zero logdet), reverse = unsqueeze2d."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor):
        return squeeze2d(x, self.factor), _zero_logdet(x)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze2d(y, self.factor)


def _coupling_halves(num_channels: int):
    if num_channels < 2:
        raise ValueError(f"a coupling layer needs at least 2 channels, got {num_channels}")
    passive = num_channels // 2
    return passive, num_channels - passive


class _Coupling(nn.Module):
    """x = (x_a, x_b) (first C//2 channels, the rest); the network sees x_a and transforms x_b.

    Subclasses define `_transform(x_b, h) -> (y_b, logdet)` and `_untransform(y_b, h) -> x_b` for
    the network output h = NN(x_a). `rebuild` serves reversible backprop (glow_ext.reversible)."""

    def __init__(self, num_channels: int, hidden_channels: int, out_per_active: int):
        super().__init__()
        self.num_channels = num_channels
        self.passive, self.active = _coupling_halves(num_channels)
        self.nn = CouplingNN(self.passive, out_per_active * self.active, hidden_channels)

    def forward(self, x: torch.Tensor):
        x_a, x_b = x[:, :self.passive], x[:, self.passive:]
        y_b, logdet = self._transform(x_b, self.nn(x_a))
        return torch.cat([x_a, y_b], dim=1), logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, :self.passive], y[:, self.passive:]
        return torch.cat([y_a, self._untransform(y_b, self.nn(y_a))], dim=1)

    def rebuild(self, y: torch.Tensor):
        """Inverts the layer and rebuilds its forward graph with a single pass of the network.

        Returns (x_a, x_b, y_b, logdet): x_a, x_b are leaves that require grad and hold the input;
        y_b (recomputed) and logdet hang off them and the parameters. Call with grad enabled."""
        x_a = y[:, :self.passive].detach().requires_grad_()
        h = self.nn(x_a)
        x_b = self._untransform(y[:, self.passive:], h.detach()).detach().requires_grad_()
        y_b, logdet = self._transform(x_b, h)
        return x_a, x_b, y_b, logdet


def _as_coupling_input(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network output as the fused coupling op takes it: a bfloat16 h (float16 too on CUDA)
    beside a float32 flow is widened by the op as it reads it, saving a float32 copy; any other
    dtype is widened here."""
    narrow = (torch.bfloat16, torch.float16) if h.is_cuda else (torch.bfloat16,)
    if h.dtype == x.dtype or (x.dtype == torch.float32 and h.dtype in narrow):
        return h
    return h.to(x.dtype)


class AffineCoupling(_Coupling):
    """h = NN(x_a) = (h_t, h_s); scale = sigmoid(h_s + 2), y_b = (x_b + h_t)·scale, y = (x_a, y_b),
    logdet = Σ log scale (N,). The arithmetic on x_b and h is the fused op
    `glow_ext.coupling_ops.affine_coupling` (one pass, and one more backward)."""

    def __init__(self, num_channels: int, hidden_channels: int = 512):
        super().__init__(num_channels, hidden_channels, out_per_active=2)

    def _transform(self, x_b, h):
        return coupling_ops.affine_coupling(x_b, _as_coupling_input(h, x_b))

    def _untransform(self, y_b, h):
        return coupling_ops.affine_coupling_inverse(y_b, _as_coupling_input(h, y_b))


class AdditiveCoupling(_Coupling):
    """y_b = x_b + NN(x_a), y_a = x_a; logdet 0."""

    def __init__(self, num_channels: int, hidden_channels: int = 512):
        super().__init__(num_channels, hidden_channels, out_per_active=1)

    def _transform(self, x_b, h):
        return x_b + h.to(x_b.dtype), _zero_logdet(x_b)

    def _untransform(self, y_b, h):
        return y_b - h.to(y_b.dtype)


LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Σ over all but the batch dimension of log N(x; mean, exp(log_std)²), shape (N,)."""
    log_p = -0.5 * LOG_2PI - log_std - 0.5 * (x - mean).square() * (-2.0 * log_std).exp()
    return log_p.flatten(1).sum(1)


def gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean + temperature·exp(log_std)·ε; temperature 0 gives the mean exactly."""
    if temperature == 0:
        return mean.clone()
    return mean + temperature * log_std.exp() * torch.randn_like(mean)


class Split(nn.Module):
    """Half the channels leave the flow as z, scored by a learned conditional Gaussian prior.

    x = (kept, z) with kept the first C - C//2 channels; (mean, log_std) = ZeroConv2d(kept) split
    along channels. forward(x) -> (kept, z, log_p) with log_p (N,) = log N(z; mean, exp(log_std)²).
    reverse(kept, z=None, temperature=1.0) -> x: uses the given z (exact inverse) or samples it at
    the temperature (which scales the prior std; 0 gives the prior mean).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {num_channels}")
        self.num_channels = num_channels
        self.z_channels = num_channels // 2
        self.kept_channels = num_channels - self.z_channels
        self.prior = ZeroConv2d(self.kept_channels, 2 * self.z_channels)

    def prior_params(self, kept: torch.Tensor):
        h = self.prior(kept).to(kept.dtype)  # reduced precision under autocast; the prior's is not
        return h[:, :self.z_channels], h[:, self.z_channels:]

    def forward(self, x: torch.Tensor):
        kept, z = x[:, :self.kept_channels], x[:, self.kept_channels:]
        mean, log_std = self.prior_params(kept)
        return kept, z, gaussian_log_prob(z, mean, log_std)

    def reverse(self, kept: torch.Tensor, z=None, temperature: float = 1.0) -> torch.Tensor:
        if z is None:
            z = gaussian_sample(*self.prior_params(kept), temperature)
        return torch.cat([kept, z], dim=1)


class FlowStep(nn.Module):
    """One Glow step: ActNorm -> channel permutation -> coupling.

    permutation="invconv_lu": ActNorm and the LU 1x1 conv are the fused ActNormInvConv2d (`actnorm`
    is None, `permute` the fused layer); "invconv": ActNorm2d + InvConv2d (slogdet baseline);
    "shuffle" / "reverse": ActNorm2d + Shuffle / Reverse. coupling: "affine" or "additive".
    forward(x) -> (y, logdet (N,)); reverse(y) -> x (the fused layer through the inverse kernel).
    """

    def __init__(self, num_channels: int, hidden_channels: int = 512, coupling: str = "affine",
                 permutation: str = "invconv_lu", actnorm_scale: float = 1.0):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; expected one of {COUPLINGS}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"unknown permutation {permutation!r}; expected one of {PERMUTATIONS}")
        self.num_channels = num_channels
        self.coupling_type = coupling
        self.permutation_type = permutation
        if permutation == "invconv_lu":
            self.actnorm = None
            self.permute = ActNormInvConv2d(num_channels, scale=actnorm_scale)
        else:
            self.actnorm = ActNorm2d(num_channels, scale=actnorm_scale)
            if permutation == "invconv":
                self.permute = InvConv2d(num_channels)
            elif permutation == "shuffle":
                self.permute = Shuffle(num_channels)
            else:
                self.permute = Reverse(num_channels)
        coupling_cls = AffineCoupling if coupling == "affine" else AdditiveCoupling
        self.coupling = coupling_cls(num_channels, hidden_channels)

    def forward(self, x: torch.Tensor):
        u, logdet = self.normalize_and_permute(x)
        y, ld = self.coupling(u)
        return y, logdet + ld

    def normalize_and_permute(self, x: torch.Tensor):
        """The step before its coupling: (u, logdet (N,))."""
        logdet = x.new_zeros(x.shape[0])
        if self.actnorm is not None:
            x, ld = self.actnorm(x)
            logdet = logdet + ld
        u, ld = self.permute(x)
        return u, logdet + ld

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.unpermute_and_denormalize(self.coupling.reverse(y))

    def unpermute_and_denormalize(self, u: torch.Tensor) -> torch.Tensor:
        x = self.permute.reverse(u)
        if self.actnorm is not None:
            x = self.actnorm.reverse(x)
        return x
