"""A faithful y0ast/Glow-PyTorch-style Glow, the second model the drop-in benchmark compares with.

Same architecture, initialisation and arithmetic as that project's `model.py` / `modules.py`
(written here from their documented structure, no code copied; the facts relied on are stated
here and in each class's docstring):
each level squeezes, runs K flow steps, then (except the last) a `Split2d`. A `FlowStep` is
ActNorm2d → InvertibleConv1x1 (LU) → affine coupling, the coupling written inside the step (not a
module of its own): its network `block` is Conv2d (3x3 conv without bias + ActNorm2d) → ReLU →
Conv2d 1x1 (+ ActNorm2d) → ReLU → Conv2dZeros, its output split "cross" (even channels the shift,
odd the scale logits), scale = sigmoid(logit + 2). Split2d scores the dropped half with a
Conv2dZeros of the kept half (mean, log-std split "cross"); the top prior is a Conv2dZeros of a
zeros buffer `prior_h` (learn_top), split in halves. No class conditioning (y_condition=False).

`layers` picks the ActNorm2d and InvertibleConv1x1 classes (every ActNorm2d, the coupling network's
too, as replacing the import would) and optionally a FlowStep class, so the same state_dict runs
with the original-style layers below or with the `glow_ext.compat.glow_pytorch` drop-ins:
`Y0astGlow(..., layers=compat_layers())`, or `compat_layers(flow_step=True)` for whole steps.

Deviation: the original adds the uniform dequantization noise inside `forward`; here the caller
adds it (so that two models can score the very same input), and `forward` adds the matching
-D·log(n_bins) to the objective.
"""
import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActNorm2d", "InvertibleConv1x1", "Conv2d", "Conv2dZeros", "FlowStep", "Split2d",
           "SqueezeLayer", "Y0astGlow", "ORIGINAL_LAYERS", "compat_layers", "y0ast_loss"]


class ActNorm2d(nn.Module):
    """y = (x + bias)·exp(logs); logdet += H·W·Σ logs. Init (train mode, first call) from the data,
    per channel over (N, H, W): bias = −mean, logs = log(scale / (sqrt(E[(x − mean)²]) + 1e-6)); the
    flag is a plain attribute, as in the original."""

    def __init__(self, num_features, scale=1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = float(scale)
        self.inited = False

    @torch.no_grad()
    def initialize_parameters(self, x):
        if not self.training:
            raise ValueError("ActNorm2d: initialise in training mode")
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
        self.inited = True

    def forward(self, x, logdet=None, reverse=False):
        if not self.inited:
            self.initialize_parameters(x)
        dlogdet = torch.sum(self.logs) * x.shape[2] * x.shape[3]
        if reverse:
            x, dlogdet = x * torch.exp(-self.logs) - self.bias, -dlogdet
        else:
            x = (x + self.bias) * torch.exp(self.logs)
        return x, (None if logdet is None else logdet + dlogdet)


class InvertibleConv1x1(nn.Module):
    """1x1 conv with W = p @ (lower·tril₋₁ + I) @ (upper·triu₊₁ + diag(sign_s·exp(log_s))) assembled
    every call (LU_decomposed=True); logdet += H·W·Σ log_s. Reverse inverts the three factors with
    torch.inverse. LU_decomposed=False: a dense `weight` with slogdet / inverse."""

    def __init__(self, num_channels, LU_decomposed):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))
        self.LU_decomposed = LU_decomposed
        if not LU_decomposed:
            self.weight = nn.Parameter(rotation)
            return
        p, lower, upper = torch.linalg.lu(rotation)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(lower)
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        self.upper = nn.Parameter(torch.triu(upper, 1))

    def get_weight(self, x, reverse):
        pixels = x.shape[2] * x.shape[3]
        if not self.LU_decomposed:
            dlogdet = torch.slogdet(self.weight)[1] * pixels
            weight = torch.inverse(self.weight) if reverse else self.weight
        else:
            c = self.log_s.shape[0]
            ones = torch.ones(c, c, dtype=self.lower.dtype, device=self.lower.device)
            eye = torch.eye(c, dtype=self.lower.dtype, device=self.lower.device)
            lower = self.lower * torch.tril(ones, -1) + eye
            upper = self.upper * torch.triu(ones, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
            dlogdet = torch.sum(self.log_s) * pixels
            if reverse:
                weight = torch.inverse(upper) @ torch.inverse(lower) @ torch.inverse(self.p)
            else:
                weight = self.p @ lower @ upper
        return weight.view(*weight.shape, 1, 1), dlogdet

    def forward(self, x, logdet=None, reverse=False):
        weight, dlogdet = self.get_weight(x, reverse)
        z = F.conv2d(x, weight)
        if logdet is not None:
            logdet = logdet - dlogdet if reverse else logdet + dlogdet
        return z, logdet


class Conv2d(nn.Module):
    """The coupling network's conv: 'same' zero padding, no bias, N(0, 0.05²) weights, then ActNorm2d."""

    def __init__(self, in_channels, out_channels, kernel_size, actnorm):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=False)
        self.conv.weight.data.normal_(0.0, 0.05)
        self.actnorm = actnorm(out_channels)

    def forward(self, x):
        return self.actnorm(self.conv(x))[0]


class Conv2dZeros(nn.Module):
    """Zero-initialised 3x3 conv ('same' zero padding, with bias), output scaled by exp(3·logs)."""

    def __init__(self, in_channels, out_channels, logscale_factor=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


def coupling_block(in_channels, out_channels, hidden_channels, actnorm):
    return nn.Sequential(
        Conv2d(in_channels, hidden_channels, 3, actnorm), nn.ReLU(inplace=False),
        Conv2d(hidden_channels, hidden_channels, 1, actnorm), nn.ReLU(inplace=False),
        Conv2dZeros(hidden_channels, out_channels))


def split_half(x):
    c = x.shape[1] // 2
    return x[:, :c], x[:, c:]


def split_cross(x):
    return x[:, 0::2], x[:, 1::2]


class FlowStep(nn.Module):
    """ActNorm2d → InvertibleConv1x1 → affine coupling (its network `block`; the coupling itself is
    written here, as in the original)."""

    def __init__(self, in_channels, hidden_channels, actnorm_scale, flow_permutation, flow_coupling,
                 LU_decomposed, layers=None):
        super().__init__()
        if (flow_permutation, flow_coupling) != ("invconv", "affine"):
            raise ValueError("this anchor has the invconv permutation and affine coupling only")
        layers = layers or ORIGINAL_LAYERS
        self.actnorm = layers.ActNorm2d(in_channels, actnorm_scale)
        self.invconv = layers.InvertibleConv1x1(in_channels, LU_decomposed=LU_decomposed)
        self.block = coupling_block(in_channels // 2, in_channels, hidden_channels, layers.ActNorm2d)

    def forward(self, x, logdet=None, reverse=False):
        return self.reverse_flow(x, logdet) if reverse else self.normal_flow(x, logdet)

    def _scale_shift(self, z1):
        shift, logit = split_cross(self.block(z1))
        return torch.sigmoid(logit + 2.0), shift

    def normal_flow(self, x, logdet):
        z, logdet = self.actnorm(x, logdet=logdet, reverse=False)
        z, logdet = self.invconv(z, logdet, False)
        z1, z2 = split_half(z)
        scale, shift = self._scale_shift(z1)
        z2 = (z2 + shift) * scale
        logdet = torch.sum(torch.log(scale), dim=[1, 2, 3]) + logdet
        return torch.cat((z1, z2), dim=1), logdet

    def reverse_flow(self, z, logdet):
        z1, z2 = split_half(z)
        scale, shift = self._scale_shift(z1)
        z2 = z2 / scale - shift
        logdet = logdet - torch.sum(torch.log(scale), dim=[1, 2, 3])
        z, logdet = self.invconv(torch.cat((z1, z2), dim=1), logdet, True)
        return self.actnorm(z, logdet=logdet, reverse=True)


def gaussian_log_p(mean, logs, x):
    return -0.5 * (math.log(2 * math.pi) + 2.0 * logs + (x - mean) ** 2 / torch.exp(2.0 * logs))


def gaussian_likelihood(mean, logs, x):
    return torch.sum(gaussian_log_p(mean, logs, x), dim=[1, 2, 3])


class Split2d(nn.Module):
    """Keeps the first half of the channels; the second is scored by N(mean, exp(logs)²) with
    (mean, logs) = cross split of Conv2dZeros(kept half)."""

    def __init__(self, num_channels):
        super().__init__()
        self.conv = Conv2dZeros(num_channels // 2, num_channels)

    def split_prior(self, z1):
        return split_cross(self.conv(z1))

    def forward(self, x, logdet):
        z1, z2 = split_half(x)
        mean, logs = self.split_prior(z1)
        return z1, gaussian_likelihood(mean, logs, z2) + logdet, z2

    def reverse(self, z1, z2=None, temperature=1.0):
        """z2 given: reconstruction; else a sample at `temperature`."""
        if z2 is None:
            mean, logs = self.split_prior(z1)
            z2 = mean + torch.exp(logs) * temperature * torch.randn_like(mean)
        return torch.cat((z1, z2), dim=1)


class SqueezeLayer(nn.Module):
    """(C, H, W) → (4C, H/2, W/2), each 2x2 block of pixels into channels; logdet unchanged."""

    def forward(self, x, logdet=None, reverse=False):
        return (unsqueeze2d(x) if reverse else squeeze2d(x)), logdet


def squeeze2d(x):
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x):
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class FlowNet(nn.Module):
    """L levels of squeeze → K FlowSteps (→ Split2d, all but the last); `layers` as in the original
    (one ModuleList)."""

    def __init__(self, image_shape, hidden_channels, K, L, actnorm_scale, LU_decomposed, layers):
        super().__init__()
        height, width, channels = image_shape
        # A `layers.FlowStep` (a whole-step drop-in) replaces the step; else the step below, with
        # `layers`' ActNorm2d and InvertibleConv1x1.
        make_step = getattr(layers, "FlowStep", None) or functools.partial(FlowStep, layers=layers)
        self.layers = nn.ModuleList()
        for level in range(L):
            channels, height, width = channels * 4, height // 2, width // 2
            self.layers.append(SqueezeLayer())
            for _ in range(K):
                self.layers.append(make_step(channels, hidden_channels, actnorm_scale, "invconv",
                                             "affine", LU_decomposed))
            if level < L - 1:
                self.layers.append(Split2d(channels))
                channels //= 2
        self.output_shape = (channels, height, width)

    def encode(self, z, logdet):
        """(top z, logdet + Σ split log-likelihoods, the split-off z2's)."""
        dropped = []
        for layer in self.layers:
            if isinstance(layer, Split2d):
                z, logdet, z2 = layer(z, logdet)
                dropped.append(z2)
            else:
                z, logdet = layer(z, logdet, reverse=False)
        return z, logdet, dropped

    def decode(self, z, dropped=None, temperature=1.0):
        dropped = list(dropped) if dropped is not None else None
        for layer in reversed(self.layers):
            if isinstance(layer, Split2d):
                z = layer.reverse(z, dropped.pop() if dropped else None, temperature)
            else:
                z, _ = layer(z, logdet=0, reverse=True)
        return z


class Y0astGlow(nn.Module):
    """`forward(x)` → (z, bits/dim per sample, dropped z's) for a dequantized x in [-0.5, 0.5);
    `reverse(z, dropped)` reconstructs, `reverse(None, temperature=T)` samples."""

    def __init__(self, image_shape, hidden_channels, K, L, actnorm_scale=1.0, LU_decomposed=True,
                 learn_top=True, n_bins=256, layers=None):
        super().__init__()
        self.flow = FlowNet(image_shape, hidden_channels, K, L, actnorm_scale, LU_decomposed,
                            layers or ORIGINAL_LAYERS)
        channels, height, width = self.flow.output_shape
        self.learn_top = learn_top
        if learn_top:
            self.learn_top_fn = Conv2dZeros(channels * 2, channels * 2)
        self.register_buffer("prior_h", torch.zeros(1, channels * 2, height, width))
        self.n_bins = n_bins

    def prior(self, n):
        h = self.prior_h.repeat(n, 1, 1, 1)
        if self.learn_top:
            h = self.learn_top_fn(h)
        return split_half(h)

    def forward(self, x):
        pixels = x[0].numel()
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) - math.log(self.n_bins) * pixels
        z, objective, dropped = self.flow.encode(x, logdet)
        mean, logs = self.prior(x.shape[0])
        objective = objective + gaussian_likelihood(mean, logs, z)
        return z, -objective / (math.log(2.0) * pixels), dropped

    def reverse(self, z=None, dropped=None, temperature=1.0, n=1):
        if z is None:
            mean, logs = self.prior(n)
            z = mean + torch.exp(logs) * temperature * torch.randn_like(mean)
        return self.flow.decode(z, dropped, temperature)


def y0ast_loss(bpd):
    """The training loss of that project: mean bits/dim over the batch."""
    return bpd.mean()


ORIGINAL_LAYERS = SimpleNamespace(ActNorm2d=ActNorm2d, InvertibleConv1x1=InvertibleConv1x1)


def compat_layers(flow_step=False):
    """The glow_ext.compat.glow_pytorch drop-ins for ActNorm2d and InvertibleConv1x1, with
    flow_step=True the whole-step FlowStep drop-in instead (imported lazily: they load the kernels)."""
    from ..compat import glow_pytorch

    layers = SimpleNamespace(ActNorm2d=glow_pytorch.ActNorm2d,
                             InvertibleConv1x1=glow_pytorch.InvertibleConv1x1)
    if flow_step:
        layers.FlowStep = glow_pytorch.FlowStep
    return layers
