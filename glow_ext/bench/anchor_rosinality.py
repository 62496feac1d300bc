"""A faithful rosinality/glow-pytorch-style Glow, the model our end-to-end benchmarks compare with.

Same architecture, initialisation and arithmetic as that project's `model.py` (written here from
its documented structure, no code copied; the facts relied on are stated here and in each class's
docstring): each level squeezes, runs K flow steps
(ActNorm → 1x1 conv → affine coupling whose network is conv3x3 → ReLU → conv1x1 → ReLU →
ZeroConv2d, scale = sigmoid(log_s + 2)), then splits off half the channels scored by a learned
conditional prior (a ZeroConv2d of the kept half; the top prior is a ZeroConv2d of zeros).

`layers` picks the ActNorm, 1x1-conv and coupling classes, so the same model (and the same
state_dict) runs with the original-style layers below or with the `glow_ext.compat.rosinality`
drop-ins: `RosinalityGlow(3, 8, 3, 128, layers=compat_layers())` (ActNorm and InvConv2dLU),
`compat_layers(coupling=True)` (AffineCoupling too).
"""
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActNorm", "InvConv2dLU", "ZeroConv2d", "AffineCoupling", "Flow", "Block",
           "RosinalityGlow", "ORIGINAL_LAYERS", "compat_layers", "rosinality_loss", "z_shapes"]


class ActNorm(nn.Module):
    """y = scale·(x + loc), logdet = H·W·Σ log|scale|; data-dependent init on the first forward
    (flag: the uint8 buffer `initialized`): loc = −mean, scale = 1/(unbiased std + 1e-6) per channel
    over (N, H, W)."""

    def __init__(self, in_channel):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x):
        per_channel = x.permute(1, 0, 2, 3).contiguous().view(x.shape[1], -1)
        self.loc.copy_(-per_channel.mean(1).view_as(self.loc))
        self.scale.copy_((1 / (per_channel.std(1) + 1e-6)).view_as(self.scale))

    def forward(self, x):
        if self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
        return self.scale * (x + self.loc), logdet

    def reverse(self, y):
        return y / self.scale - self.loc


class InvConv2dLU(nn.Module):
    """W = w_p @ (w_l·l_mask + I) @ (w_u·u_mask + diag(s_sign·exp(w_s))) assembled every call."""

    def __init__(self, in_channel):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(in_channel, in_channel))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(in_channel, in_channel), 1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(in_channel))
        self.w_l = nn.Parameter(lower)
        self.w_s = nn.Parameter(torch.log(torch.abs(s)))
        self.w_u = nn.Parameter(torch.triu(upper, 1))

    def calc_weight(self):
        weight = self.w_p @ (self.w_l * self.l_mask + self.l_eye) @ (
            self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s)))
        return weight.unsqueeze(2).unsqueeze(3)

    def forward(self, x):
        return F.conv2d(x, self.calc_weight()), x.shape[2] * x.shape[3] * torch.sum(self.w_s)

    def reverse(self, y):
        weight = self.calc_weight()
        return F.conv2d(y, weight.squeeze().inverse().unsqueeze(2).unsqueeze(3))


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 conv on a ones-padded input, output scaled by exp(3·scale)."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv = nn.Conv2d(in_channel, out_channel, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1)) * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    def __init__(self, in_channel, filter_size):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channel // 2, filter_size, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(filter_size, filter_size, 1), nn.ReLU(inplace=True),
            ZeroConv2d(filter_size, in_channel))
        for conv in (self.net[0], self.net[2]):
            conv.weight.data.normal_(0, 0.05)
            conv.bias.data.zero_()

    def forward(self, x):
        in_a, in_b = x.chunk(2, 1)
        log_s, t = self.net(in_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        out_b = (in_b + t) * s
        logdet = torch.sum(torch.log(s).view(x.shape[0], -1), 1)
        return torch.cat([in_a, out_b], 1), logdet

    def reverse(self, y):
        out_a, out_b = y.chunk(2, 1)
        log_s, t = self.net(out_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([out_a, out_b / s - t], 1)


class Flow(nn.Module):
    def __init__(self, in_channel, filter_size, layers):
        super().__init__()
        self.actnorm = layers.ActNorm(in_channel)
        self.invconv = layers.InvConv2dLU(in_channel)
        self.coupling = layers.AffineCoupling(in_channel, filter_size)

    def forward(self, x):
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        return out, logdet + det1 + det2

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


def gaussian_log_p(x, mean, log_sd):
    return -0.5 * math.log(2 * math.pi) - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


def squeeze2d(x):
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.contiguous().view(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x):
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.contiguous().view(b, c // 4, h * 2, w * 2)


class Block(nn.Module):
    """Squeeze, K flow steps, then split with a learned prior (or the top prior when split=False)."""

    def __init__(self, in_channel, n_flow, filter_size, layers, split=True):
        super().__init__()
        squeezed = in_channel * 4
        self.flows = nn.ModuleList([Flow(squeezed, filter_size, layers) for _ in range(n_flow)])
        self.split = split
        self.prior = (ZeroConv2d(in_channel * 2, in_channel * 4) if split
                      else ZeroConv2d(in_channel * 4, in_channel * 8))

    def forward(self, x):
        out = squeeze2d(x)
        logdet = 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        if self.split:
            out, z_new = out.chunk(2, 1)
            mean, log_sd = self.prior(out).chunk(2, 1)
        else:
            z_new = out
            mean, log_sd = self.prior(torch.zeros_like(out)).chunk(2, 1)
        log_p = gaussian_log_p(z_new, mean, log_sd).view(x.shape[0], -1).sum(1)
        return out, logdet, log_p, z_new

    def reverse(self, out, eps, reconstruct=False):
        """eps is standard-normal noise scaled by the prior, or with reconstruct=True the z itself."""
        if reconstruct:
            x = torch.cat([out, eps], 1) if self.split else eps
        elif self.split:
            mean, log_sd = self.prior(out).chunk(2, 1)
            x = torch.cat([out, mean + torch.exp(log_sd) * eps], 1)
        else:
            mean, log_sd = self.prior(torch.zeros_like(eps)).chunk(2, 1)
            x = mean + torch.exp(log_sd) * eps
        for flow in self.flows[::-1]:
            x = flow.reverse(x)
        return unsqueeze2d(x)


class RosinalityGlow(nn.Module):
    """`forward(x)` → (log_p (N,), logdet (N,), z list); `reverse(eps list)` → x: sampling from
    noise (scaled by the priors), or with reconstruct=True decoding the forward's z list."""

    def __init__(self, in_channel, n_flow, n_block, filter_size, layers=None):
        super().__init__()
        layers = layers or ORIGINAL_LAYERS
        self.blocks = nn.ModuleList()
        channels = in_channel
        for _ in range(n_block - 1):
            self.blocks.append(Block(channels, n_flow, filter_size, layers, split=True))
            channels *= 2
        self.blocks.append(Block(channels, n_flow, filter_size, layers, split=False))

    def forward(self, x):
        log_p_sum, logdet, z_outs, out = 0, 0, [], x
        for block in self.blocks:
            out, det, log_p, z_new = block(out)
            z_outs.append(z_new)
            logdet = logdet + det
            log_p_sum = log_p_sum + log_p
        return log_p_sum, logdet, z_outs

    def reverse(self, z_list, reconstruct=False):
        x = z_list[-1]
        for i, block in enumerate(self.blocks[::-1]):
            x = block.reverse(x, z_list[-(i + 1)], reconstruct)
        return x


def z_shapes(in_channel, image_size, n_block):
    """The shapes of the z's `RosinalityGlow.reverse` takes, per sample."""
    shapes = []
    for _ in range(n_block - 1):
        image_size //= 2
        in_channel *= 2
        shapes.append((in_channel, image_size, image_size))
    image_size //= 2
    shapes.append((in_channel * 4, image_size, image_size))
    return shapes


def rosinality_loss(log_p, logdet, image_size, n_bins, in_channel=3):
    """Bits per dimension as that project's training script computes it."""
    n_pixel = image_size * image_size * in_channel
    loss = -math.log(n_bins) * n_pixel + logdet + log_p
    return (-loss / (math.log(2) * n_pixel)).mean()


ORIGINAL_LAYERS = SimpleNamespace(ActNorm=ActNorm, InvConv2dLU=InvConv2dLU,
                                  AffineCoupling=AffineCoupling)


def compat_layers(coupling=False):
    """The glow_ext.compat.rosinality drop-ins for ActNorm and InvConv2dLU, with coupling=True also
    for AffineCoupling (imported lazily: they load the kernels)."""
    from ..compat import rosinality

    return SimpleNamespace(ActNorm=rosinality.ActNorm, InvConv2dLU=rosinality.InvConv2dLU,
                           AffineCoupling=rosinality.AffineCoupling if coupling else AffineCoupling)
