"""Reference versions of the speech models' invertible layers, the originals our speech drop-ins
(glow_ext.compat.waveglow, .glow_tts, .radtts) are compared with in tests and benchmarks.

None of those projects is packaged, so these are written here from the originals' documented
behaviour (no code copied): plain PyTorch conv1d / conv2d with the weight, torch.logdet,
torch.inverse, the originals' channel regrouping and masks, and their inverse caching. Each
class's docstring states the facts relied on. Their state_dicts load strictly into the drop-ins.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefWaveGlowConv", "RefActNorm", "RefInvConvNear", "RefCoquiInvConvNear", "RefLUS",
           "random_rotation"]


def random_rotation(c, det_sign=1.0):
    """A random orthogonal (c, c) float64 matrix with determinant det_sign (the originals' init)."""
    q = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    if torch.sign(torch.det(q)) != det_sign:
        q[:, 0] = -q[:, 0]
    return q


class RefWaveGlowConv(nn.Module):
    """NVIDIA/waveglow `Invertible1x1Conv`: conv = Conv1d(c, c, 1, bias=False); forward(z) →
    (conv(z), B·T·logdet(W)); reverse: conv1d with W⁻¹, computed on the first reverse call and
    stored as the attribute `W_inverse` for good. DeepLearningExamples: `infer(z)` = reverse,
    `_invert()` stores W⁻¹ if absent. (The originals invert in float32; here in W's dtype, so
    that float64 comparisons are exact.)"""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(random_rotation(c).to(torch.float32).unsqueeze(2))

    def forward(self, z, reverse=False):
        if reverse:
            return self.infer(z)
        weight = self.conv.weight.squeeze(2)
        return self.conv(z), z.shape[0] * z.shape[2] * torch.logdet(weight)

    def _invert(self):
        if not hasattr(self, "W_inverse"):
            self.W_inverse = torch.inverse(self.conv.weight.squeeze(2)).unsqueeze(2)

    def infer(self, z):
        self._invert()
        return F.conv1d(z, self.W_inverse)


def _glow_tts_lengths(x_mask, x):
    if x_mask is None:
        return torch.full((x.shape[0],), float(x.shape[2]), dtype=x.dtype, device=x.device)
    return x_mask.sum(dim=(1, 2))


class RefActNorm(nn.Module):
    """jaywalnut310/glow-tts `ActNorm`: params logs, bias (1, C, 1); forward z = (bias +
    exp(logs)·x)·x_mask, logdet = Σ logs · x_len (B,); reverse (x − bias)·exp(−logs)·x_mask, None.
    With ddi, the first call sets logs = −½ log(max(E[x²] − E[x]², 1e-6)) and bias = −E[x]·exp(logs)
    from the masked statistics over (batch, time)."""

    def __init__(self, channels, ddi=False):
        super().__init__()
        self.initialized = not ddi
        self.logs = nn.Parameter(torch.zeros(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x, x_mask=None, reverse=False, **kwargs):
        mask = torch.ones_like(x[:, :1]) if x_mask is None else x_mask
        if not self.initialized:
            with torch.no_grad():
                count = mask.sum(dim=(0, 2))
                mean = (x * mask).sum(dim=(0, 2)) / count
                variance = (x * x * mask).sum(dim=(0, 2)) / count - mean ** 2
                half_log_var = 0.5 * torch.log(variance.clamp_min(1e-6))
                self.logs.copy_(-half_log_var.view(1, -1, 1))
                self.bias.copy_((-mean * torch.exp(-half_log_var)).view(1, -1, 1))
            self.initialized = True
        if reverse:
            return (x - self.bias) * torch.exp(-self.logs) * mask, None
        return (self.bias + torch.exp(self.logs) * x) * mask, self.logs.sum() * mask.sum(dim=(1, 2))


class RefInvConvNear(nn.Module):
    """jaywalnut310/glow-tts `InvConvNear`: weight (n, n); x (B, C, T) regrouped to
    (B, n, C/n, T) by view (B, 2, C/n, n/2, T) → permute (0, 1, 3, 2, 4); conv2d with W (or, in
    reverse, `weight_inv` if stored by `store_inverse()`, else inverse(W)); regrouped back and
    multiplied by x_mask; logdet = logdet(W)·(C/n)·x_len, 0 with no_jacobian, None in reverse."""

    def __init__(self, channels, n_split=4, no_jacobian=False):
        super().__init__()
        self.n_split = n_split
        self.no_jacobian = no_jacobian
        self.weight = nn.Parameter(random_rotation(n_split).to(torch.float32))

    def _stored_inverse(self):
        return getattr(self, "weight_inv", None)

    def forward(self, x, x_mask=None, reverse=False, **kwargs):
        b, c, t = x.shape
        n = self.n_split
        grouped = x.view(b, 2, c // n, n // 2, t).permute(0, 1, 3, 2, 4).reshape(b, n, c // n, t)
        if reverse:
            stored = self._stored_inverse()
            weight = stored if stored is not None else torch.inverse(self.weight)
            logdet = None
        else:
            weight = self.weight
            logdet = 0 if self.no_jacobian else (
                torch.logdet(self.weight) * (c / n) * _glow_tts_lengths(x_mask, x))
        z = F.conv2d(grouped, weight.view(n, n, 1, 1))
        z = z.view(b, 2, n // 2, c // n, t).permute(0, 1, 3, 2, 4).reshape(b, c, t)
        return (z if x_mask is None else z * x_mask), logdet

    def store_inverse(self):
        self.weight_inv = torch.inverse(self.weight)


class RefCoquiInvConvNear(RefInvConvNear):
    """coqui-ai/TTS `InvConvNear(channels, num_splits)`: as above, but `weight_inv` starts as None
    and `store_inverse()` registers it as a Parameter with requires_grad=False (a state_dict key)."""

    def __init__(self, channels, num_splits=4, no_jacobian=False):
        super().__init__(channels, num_splits, no_jacobian)
        self.weight_inv = None

    def store_inverse(self):
        self.weight_inv = nn.Parameter(torch.inverse(self.weight.detach()), requires_grad=False)


class RefLUS(nn.Module):
    """NVIDIA/radtts `Invertible1x1ConvLUS`: buffers p, lower_diag (ones); params lower, upper_diag,
    upper; W = p·(tril(lower, −1) + diag(lower_diag))·(triu(upper, 1) + diag(upper_diag));
    forward (conv1d(z, W), Σ log|upper_diag|); inverse conv1d with W⁻¹, recomputed each call, or
    with cache_inverse kept from the first call."""

    def __init__(self, c, cache_inverse=False):
        super().__init__()
        p, lower, upper = torch.linalg.lu(random_rotation(c).to(torch.float32))
        self.register_buffer("p", p)
        self.register_buffer("lower_diag", torch.ones(c))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper_diag = nn.Parameter(torch.diagonal(upper).clone())
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.cache_inverse = cache_inverse

    def weight(self):
        lower = torch.tril(self.lower, -1) + torch.diag(self.lower_diag)
        upper = torch.triu(self.upper, 1) + torch.diag(self.upper_diag)
        return self.p @ lower @ upper

    def forward(self, z, inverse=False):
        weight = self.weight()
        if not inverse:
            return F.conv1d(z, weight.unsqueeze(2)), torch.log(torch.abs(self.upper_diag)).sum()
        if not hasattr(self, "W_inverse"):
            self.W_inverse = torch.inverse(weight).unsqueeze(2)
        z = F.conv1d(z, self.W_inverse)
        if not self.cache_inverse:
            del self.W_inverse
        return z
