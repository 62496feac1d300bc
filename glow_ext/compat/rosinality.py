"""Drop-ins for the flow layers of rosinality/glow-pytorch (`model.py`).

Same constructors, `forward(x)` / `reverse(y)` contracts and `state_dict` keys, dtypes and shapes,
so a checkpoint of that project loads with `load_state_dict(..., strict=True)` and gives the same
outputs and log-determinants:

- `ActNorm(in_channel, logdet=True)`: params `loc`, `scale` (1, C, 1, 1), buffer `initialized`
  (uint8 scalar). y = scale·(x + loc), logdet = H·W·Σ log|scale|. Plain PyTorch (elementwise).
- `InvConv2d(in_channel)`: param `weight` (C, C, 1, 1). Runs on the fused kernels through an LU
  factorisation of `weight` per call (see the class docstring).
- `InvConv2dLU(in_channel)`: buffers `w_p`, `u_mask`, `l_mask`, `s_sign`, `l_eye`, params `w_l`,
  `w_s`, `w_u` (`w_s` and `s_sign` are 1-D, (C,)). Runs on the fused kernels directly.
- `ZeroConv2d(in_channel, out_channel)`: params `conv.weight`, `conv.bias`, `scale`; the 3x3 conv of
  the ones-padded input times exp(3·scale), computed without materialising the padded input.
- `AffineCoupling(in_channel, filter_size=512, affine=True)`: params `net.0.*`, `net.2.*`, `net.4.*`
  (conv3x3 → ReLU → conv1x1 → ReLU → ZeroConv2d); the affine arithmetic on the fused
  `glow_ext.coupling_ops.affine_coupling` op.

Log-determinants are 0-dim tensors (the same for every sample), as in the original.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import coupling_ops, ops
from ..nn import random_rotation_lu
from . import _Memo, _channel_mean_var, _conv_layout, _lu_of_dense, _permutation_of

__all__ = ["ActNorm", "InvConv2d", "InvConv2dLU", "ZeroConv2d", "AffineCoupling"]


class ActNorm(nn.Module):
    """ActNorm with a (not log-) scale: y = scale·(x + loc), logdet = H·W·Σ log|scale|.

    Data-dependent init on the first forward while `initialized` is 0 (in train and eval mode
    alike, as the original): loc = −mean, scale = 1/(std + 1e-6), with the unbiased std over
    (N, H, W) per channel; then `initialized` = 1. A loaded checkpoint with `initialized` = 1 is
    never re-initialised. Unlike the original, the flag is not read from the device every call (a
    host synchronisation on CUDA): a Python-side mirror is refreshed only when the buffer changes
    (load_state_dict, fill_, .to()), and under torch.distributed the init statistics are averaged
    over ranks so that every replica starts identical.
    """

    def __init__(self, in_channel, logdet=True):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.logdet = logdet
        self._flag = _Memo()

    def _is_initialized(self) -> bool:
        return self._flag.get((self.initialized,), lambda: bool(self.initialized.item()))

    @torch.no_grad()
    def initialize(self, input):
        mean, var = _channel_mean_var(input, unbiased=True)
        std = var.sqrt()
        self.loc.copy_((-mean).view_as(self.loc))
        self.scale.copy_((1 / (std + 1e-6)).view_as(self.scale))

    def forward(self, input):
        if not self._is_initialized():
            self.initialize(input)
            self.initialized.fill_(1)
            self._flag.set((self.initialized,), True)
        height, width = input.shape[2], input.shape[3]
        out = self.scale * (input + self.loc)
        if self.logdet:
            return out, height * width * torch.sum(torch.log(torch.abs(self.scale)))
        return out

    def reverse(self, output):
        return output / self.scale - self.loc


class InvConv2d(nn.Module):
    """Invertible 1x1 convolution with a dense weight (C, C, 1, 1), initialised as a random rotation.

    forward(x) -> (y, logdet): y = W·x per pixel, logdet = H·W·log|det W| (0-dim); reverse(y) -> x.

    Backed by the fused glow_ext kernels: each call factors W = P·L·U with torch.linalg.lu (in
    float64, O(C³) like slogdet, but it replaces both slogdet and, in reverse, the general inverse),
    then runs `glow_ext.ops.actnorm_invconv_lu` (reverse: `..._inverse`, triangular solves) with
    an identity ActNorm (bias = logs = 0). logdet = H·W·Σ log|diag U|. torch.linalg.lu is
    differentiable, so gradients reach `weight` through the factors, in forward and reverse alike.
    The original computes slogdet in float64 and inverts W with torch.inverse in the weight's
    dtype; the results agree to float32 rounding (the inverse here is the more accurate one).
    """

    def __init__(self, in_channel):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(in_channel, in_channel))
        self.weight = nn.Parameter(rotation.unsqueeze(2).unsqueeze(3))

    def _factors(self):
        c = self.weight.shape[0]
        perm, lower, upper, log_s, sign_s = _lu_of_dense(self.weight.reshape(c, c))
        identity = log_s.new_zeros(c)
        return identity, identity, perm, lower, upper, log_s, sign_s

    def forward(self, input):
        return ops.actnorm_invconv_lu(input, *self._factors())

    def reverse(self, output):
        return ops.actnorm_invconv_lu_inverse(output, *self._factors())


def _standard_masks(c, dtype, device):
    upper = torch.triu(torch.ones(c, c, dtype=dtype, device=device), 1)
    return upper, upper.T.contiguous(), torch.eye(c, dtype=dtype, device=device)


class InvConv2dLU(nn.Module):
    """LU-parametrised invertible 1x1 convolution,
    W = w_p @ (w_l·l_mask + l_eye) @ (w_u·u_mask + diag(s_sign·exp(w_s))), logdet = H·W·Σ w_s.

    Initialised from the LU factors (torch.linalg.lu, no scipy) of a random rotation: w_p the
    permutation matrix, w_l the unit lower factor, w_u its strict upper part of U, w_s = log|diag U|,
    s_sign = sign(diag U) (both (C,)), u_mask = triu(ones, 1), l_mask = u_mask.T, l_eye = I.

    Backed by the fused glow_ext kernels with bias = logs = 0 and perm = w_p.argmax(dim=1): no W
    assembly, no slogdet, triangular solves in reverse. The op reads only the strict lower part of
    `w_l` and the strict upper part of `w_u`, which equals the masked formula exactly when the
    masks and l_eye are the standard ones and w_p is a permutation matrix. The original keeps the
    masks as buffers, so a checkpoint could carry others: the buffers are checked once (on the first
    call after they change, e.g. after load_state_dict — one host synchronisation), and if they are
    not standard every call falls back to the formula (assembled W, conv2d, torch.inverse).
    """

    def __init__(self, in_channel):
        super().__init__()
        perm, lower, upper, log_s, sign_s = random_rotation_lu(in_channel)
        u_mask, l_mask, eye = _standard_masks(in_channel, torch.float32, "cpu")
        # Registration order as in the original, so state_dict() lists the keys in the same order.
        self.register_buffer("w_p", eye[perm].clone())
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", l_mask)
        self.register_buffer("s_sign", sign_s)
        self.register_buffer("l_eye", eye)
        self.w_l = nn.Parameter(lower + eye)
        self.w_s = nn.Parameter(log_s)
        self.w_u = nn.Parameter(upper)
        self._fast = _Memo()

    def _fast_perm(self):
        """perm for the fused op, or None when the buffers call for the formula path."""
        buffers = (self.w_p, self.u_mask, self.l_mask, self.l_eye)
        return self._fast.get(buffers, self._check_buffers)

    def _check_buffers(self):
        c = self.w_p.shape[0]
        u_mask, l_mask, eye = _standard_masks(c, self.u_mask.dtype, self.u_mask.device)
        standard = (torch.equal(self.u_mask, u_mask) and torch.equal(self.l_mask, l_mask)
                    and self.l_eye.dtype == self.u_mask.dtype and torch.equal(self.l_eye, eye))
        return _permutation_of(self.w_p) if standard else None

    def calc_weight(self):
        """The assembled W as (C, C, 1, 1), by the formula (used by the fallback path)."""
        weight = self.w_p @ (self.w_l * self.l_mask + self.l_eye) @ (
            self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s)))
        return weight.unsqueeze(2).unsqueeze(3)

    def _op_args(self, perm):
        identity = self.w_s.new_zeros(self.w_s.shape[0])
        return identity, identity, perm, self.w_l, self.w_u, self.w_s, self.s_sign

    def forward(self, input):
        perm = self._fast_perm()
        if perm is None:
            height, width = input.shape[2], input.shape[3]
            return F.conv2d(input, self.calc_weight()), height * width * torch.sum(self.w_s)
        return ops.actnorm_invconv_lu(input, *self._op_args(perm))

    def reverse(self, output):
        perm = self._fast_perm()
        if perm is None:
            c = self.w_p.shape[0]
            inverse = torch.inverse(self.calc_weight().reshape(c, c))
            return F.conv2d(output, inverse.reshape(c, c, 1, 1))
        return ops.actnorm_invconv_lu_inverse(output, *self._op_args(perm))


def _ones_border(height, width, like):
    """(1, 1, H + 2, W + 2): ones on the one-pixel border, zeros inside."""
    border = torch.ones(1, 1, height + 2, width + 2, dtype=like.dtype, device=like.device)
    border[:, :, 1:-1, 1:-1] = 0
    return border


class ZeroConv2d(nn.Module):
    """out = conv3x3(x padded with ones) · exp(3·scale), zero-initialised; params `conv.weight`,
    `conv.bias`, `scale` (1, C_out, 1, 1) as in the original.

    The original pads x with ones (F.pad, a copy of the coupling network's widest activation) and
    then scales the conv's output (one more pass over it, forward and backward). Here exp(3·scale)
    is folded into the weight and bias, and the ones-padding is the zero-padded conv plus the
    border's share, conv(border of ones, Σ over input channels of the weight): a (1, C_out, H, W)
    term that costs a one-channel conv instead of the padded copy and the extra pass.
    `channel_order` permutes the output channels (folded into the weight as well).
    """

    def __init__(self, in_channel, out_channel, padding=1):  # padding: unused, as in the original
        super().__init__()
        self.conv = nn.Conv2d(in_channel, out_channel, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, input, channel_order=None):
        factor = torch.exp(self.scale * 3).view(-1)
        weight = self.conv.weight * factor.view(-1, 1, 1, 1)
        bias = self.conv.bias * factor
        if channel_order is not None:
            weight, bias = weight[channel_order], bias[channel_order]
        height, width = input.shape[2], input.shape[3]
        border = F.conv2d(_ones_border(height, width, input), weight.sum(1, keepdim=True))
        return F.conv2d(input, weight, bias, padding=1) + border


class AffineCoupling(nn.Module):
    """Affine (or, with affine=False, additive) coupling: in_a, in_b = input.chunk(2, 1);
    log_s, t = net(in_a).chunk(2, 1); out_b = (in_b + t)·sigmoid(log_s + 2); logdet (N,) =
    Σ log sigmoid(log_s + 2). `net` = conv3x3 → ReLU → conv1x1 → ReLU → ZeroConv2d with the
    original's keys and init (N(0, 0.05²) weights, zero biases).

    The arithmetic on in_b runs on the fused op (one pass forward, one backward, instead of ~8
    elementwise passes); the op takes (shift, logit) halves, so the net's last conv emits its halves
    swapped (a permutation of its weight rows, not of its output). The net runs channels_last on the
    CPU (faster there, see glow_ext.compat._conv_layout). affine=False runs as the original.
    """

    def __init__(self, in_channel, filter_size=512, affine=True):
        super().__init__()
        self.affine = affine
        self.net = nn.Sequential(
            nn.Conv2d(in_channel // 2, filter_size, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(filter_size, filter_size, 1), nn.ReLU(inplace=True),
            ZeroConv2d(filter_size, in_channel if affine else in_channel // 2))
        for conv in (self.net[0], self.net[2]):
            conv.weight.data.normal_(0, 0.05)
            conv.bias.data.zero_()
        half = in_channel // 2
        # Not a state_dict entry (the original has none); moves with the module.
        self.register_buffer("_swap", torch.cat([torch.arange(half, 2 * half), torch.arange(half)]),
                             persistent=False)

    def _shift_logit(self, in_a):
        hidden = _conv_layout(in_a)
        for layer in self.net[:4]:
            hidden = layer(hidden)
        return self.net[4](hidden, self._swap).contiguous()

    def forward(self, input):
        in_a, in_b = input.chunk(2, 1)
        if not self.affine:
            return torch.cat([in_a, in_b + self.net(in_a)], 1), None
        out_b, logdet = coupling_ops.affine_coupling(in_b, self._shift_logit(in_a))
        return torch.cat([in_a, out_b], 1), logdet

    def reverse(self, output):
        out_a, out_b = output.chunk(2, 1)
        if not self.affine:
            return torch.cat([out_a, out_b - self.net(out_a)], 1)
        out_b = coupling_ops.affine_coupling_inverse(out_b, self._shift_logit(out_a))
        return torch.cat([out_a, out_b], 1)
