"""Drop-ins for the flow layers of y0ast/Glow-PyTorch and chaiyujin/glow-pytorch (`modules.py`).

Same constructors, `forward(input, logdet=None, reverse=False) -> (output, logdet)` contract and
`state_dict` keys, dtypes and shapes, so a checkpoint of those projects loads with
`load_state_dict(..., strict=True)` and gives the same outputs and log-determinants:

- `ActNorm2d(num_features, scale=1.0)`: params `bias`, `logs` (1, C, 1, 1); nothing else in the
  state_dict. y = (x + bias)·exp(logs). Plain PyTorch (elementwise).
- `InvertibleConv1x1(num_channels, LU_decomposed)`: plain: param `weight` (C, C); LU: params
  `lower`, `log_s`, `upper`, buffers `p`, `sign_s` (`log_s`, `sign_s` are (C,)). The masks and the
  identity are computed, not stored, so they add no state_dict keys. Runs on the fused kernels.

`logdet` is added to the given one in forward and subtracted in reverse; when it is None, None is
returned. The increments are 0-dim tensors (the same for every sample), which broadcast onto a
per-sample (N,) logdet as in the originals.

- `Conv2d`, `Conv2dZeros`, `FlowStep` (y0ast's `model.py` / `modules.py` names and keys): a whole
  flow step whose ActNorm + 1x1 conv is one fused op, whose coupling runs on the fused coupling op,
  with the coupling network's ActNorms and output scale folded into its conv weights.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import coupling_ops, ops
from ..nn import random_rotation_lu
from . import _Memo, _channel_mean_var, _conv_layout, _lu_of_dense, _permutation_of

__all__ = ["ActNorm2d", "InvertibleConv1x1", "Conv2d", "Conv2dZeros", "FlowStep"]


def _mark_loaded(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
    # A checkpoint carrying this layer's parameters is trained (or at least initialised) state: it
    # must never be overwritten by a data-dependent init (the originals' `inited` is a plain
    # attribute, so their loaded models re-initialised on the first training batch).
    if prefix + "bias" in state_dict and prefix + "logs" in state_dict:
        module.inited = True


class ActNorm2d(nn.Module):
    """ActNorm: y = (x + bias)·exp(logs) per channel, logdet += H·W·Σ logs (reverse: x = y·exp(−logs)
    − bias, logdet −= H·W·Σ logs).

    Data-dependent init on the first forward (reverse=False) in train mode: bias = −mean,
    logs = log(scale / (sqrt(E[(x − mean)²]) + 1e-6)) (population std over N, H, W). The init flag
    `inited` is a plain attribute, as in the originals, so the state_dict holds only `bias` and
    `logs`; loading a state_dict that holds them marks the layer initialised (a load_state_dict
    pre-hook, which knows this module's key prefix), so a loaded checkpoint is never re-initialised.
    Deviations: in eval mode an uninitialised layer runs as is (chaiyujin; y0ast raises), a reverse
    call never initialises (both originals would initialise from the latents), and under
    torch.distributed the statistics are averaged over ranks.
    """

    def __init__(self, num_features, scale=1.0):
        super().__init__()
        size = (1, num_features, 1, 1)
        self.bias = nn.Parameter(torch.zeros(*size))
        self.logs = nn.Parameter(torch.zeros(*size))
        self.num_features = num_features
        self.scale = float(scale)
        self.inited = False
        self.register_load_state_dict_pre_hook(_mark_loaded)

    def _check_input_dim(self, input):
        if input.dim() != 4 or input.shape[1] != self.num_features:
            raise ValueError(f"[ActNorm2d]: expected (N, {self.num_features}, H, W) input, got "
                             f"{tuple(input.shape)}")

    @torch.no_grad()
    def initialize_parameters(self, input):
        mean, var = _channel_mean_var(input, unbiased=False)
        self.bias.copy_((-mean).view_as(self.bias))
        self.logs.copy_(torch.log(self.scale / (var.sqrt() + 1e-6)).view_as(self.logs))
        self.inited = True

    def forward(self, input, logdet=None, reverse=False):
        self._check_input_dim(input)
        if not self.inited and self.training and not reverse:
            self.initialize_parameters(input)
        if reverse:
            output = input * torch.exp(-self.logs) - self.bias
        else:
            output = (input + self.bias) * torch.exp(self.logs)
        if logdet is not None:
            dlogdet = torch.sum(self.logs) * (input.shape[2] * input.shape[3])
            logdet = logdet - dlogdet if reverse else logdet + dlogdet
        return output, logdet

    def extra_repr(self):
        return f"{self.num_features}, scale={self.scale}"


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution, dense (`LU_decomposed=False`) or LU-parametrised.

    Plain: param `weight` (C, C), a random rotation; logdet increment H·W·log|det W|. Each call
    factors W = P·L·U with torch.linalg.lu (float64, O(C³) like the original's slogdet, but it also
    replaces torch.inverse in reverse) and runs the fused op with an identity ActNorm; gradients
    reach `weight` through the (differentiable) factorisation.

    LU: W = p @ (lower·tril_mask + I) @ (upper·triu_mask + diag(sign_s·exp(log_s))), logdet
    increment H·W·Σ log_s. Runs the fused op directly with perm = p.argmax(dim=1) (the op reads
    only the strict triangles, which is what the masks select): no W assembly, no inverses.
    `p` is checked to be a permutation matrix once per change (one host synchronisation after
    construction / load_state_dict); if it is not, the formula path (assembled W, conv2d,
    torch.inverse) is used instead.
    """

    def __init__(self, num_channels, LU_decomposed):
        super().__init__()
        self.w_shape = [num_channels, num_channels]
        self.LU_decomposed = LU_decomposed
        if not LU_decomposed:
            rotation, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))
            self.weight = nn.Parameter(rotation)
        else:
            perm, lower, upper, log_s, sign_s = random_rotation_lu(num_channels)
            eye = torch.eye(num_channels)
            # Registration order as in the originals (buffers p, sign_s; then lower, log_s, upper).
            self.register_buffer("p", eye[perm].clone())
            self.register_buffer("sign_s", sign_s)
            self.lower = nn.Parameter(lower + eye)
            self.log_s = nn.Parameter(log_s)
            self.upper = nn.Parameter(upper)
        self._perm = _Memo()

    def get_weight(self, input, reverse):
        """(W or W⁻¹ as (C, C, 1, 1), logdet increment) by the formula — the fallback path."""
        c = self.w_shape[0]
        height, width = input.shape[2], input.shape[3]
        if not self.LU_decomposed:
            dlogdet = torch.linalg.slogdet(self.weight)[1] * (height * width)
            weight = torch.inverse(self.weight) if reverse else self.weight
        else:
            ones = torch.ones(c, c, dtype=self.lower.dtype, device=self.lower.device)
            eye = torch.eye(c, dtype=self.lower.dtype, device=self.lower.device)
            lower = self.lower * torch.tril(ones, -1) + eye
            upper = self.upper * torch.triu(ones, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
            dlogdet = torch.sum(self.log_s) * (height * width)
            if reverse:
                weight = torch.inverse(upper) @ torch.inverse(lower) @ torch.inverse(self.p)
            else:
                weight = self.p @ lower @ upper
        return weight.reshape(c, c, 1, 1), dlogdet

    def _op_args(self):
        """The fused op's arguments, or None when `p` is not a permutation matrix."""
        if not self.LU_decomposed:
            perm, lower, upper, log_s, sign_s = _lu_of_dense(self.weight)
        else:
            perm = self._perm.get((self.p,), lambda: _permutation_of(self.p))
            if perm is None:
                return None
            lower, upper, log_s, sign_s = self.lower, self.upper, self.log_s, self.sign_s
        identity = log_s.new_zeros(log_s.shape[0])
        return identity, identity, perm, lower, upper, log_s, sign_s

    def forward(self, input, logdet=None, reverse=False):
        args = self._op_args()
        if args is None:
            weight, dlogdet = self.get_weight(input, reverse)
            output = F.conv2d(input, weight)
        elif not reverse:
            output, dlogdet = ops.actnorm_invconv_lu(input, *args)
        else:
            output = ops.actnorm_invconv_lu_inverse(input, *args)
            dlogdet = torch.sum(args[5]) * (input.shape[2] * input.shape[3])  # H·W·Σ log_s
        if logdet is not None:
            logdet = logdet - dlogdet if reverse else logdet + dlogdet
        return output, logdet


def _kernel_and_padding(kernel_size, padding):
    """(kernel_size as a pair, padding) with the original's 'same' / 'valid' padding names resolved."""
    kernel_size = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
    if padding == "same":
        return kernel_size, tuple(k // 2 for k in kernel_size)
    if padding == "valid":
        return kernel_size, 0
    return kernel_size, padding


class Conv2d(nn.Module):
    """The coupling network's conv: 'same' zero padding, no bias, N(0, weight_std²) weights, then
    ActNorm2d (do_actnorm=True; else the conv has a bias). Params `conv.weight` and `actnorm.bias`,
    `actnorm.logs` (or `conv.bias`), as in the original.

    (conv(x) + bias)·exp(logs) = conv(x, W·exp(logs)) + bias·exp(logs): the ActNorm is folded into
    the conv's weight and bias, which saves a pass over the network's widest activation forward and
    backward. The data-dependent init still sees the conv's output (one unfolded call)."""

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding="same",
                 do_actnorm=True, weight_std=0.05):
        super().__init__()
        kernel_size, padding = _kernel_and_padding(kernel_size, padding)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              bias=not do_actnorm)
        self.conv.weight.data.normal_(mean=0.0, std=weight_std)
        if not do_actnorm:
            self.conv.bias.data.zero_()
        else:
            self.actnorm = ActNorm2d(out_channels)
        self.do_actnorm = do_actnorm

    def forward(self, input):
        if not self.do_actnorm:
            return self.conv(input)
        if not self.actnorm.inited and self.actnorm.training:
            return self.actnorm(self.conv(input))[0]
        factor = torch.exp(self.actnorm.logs).view(-1)
        return self.conv._conv_forward(input, self.conv.weight * factor.view(-1, 1, 1, 1),
                                       self.actnorm.bias.view(-1) * factor)


class Conv2dZeros(nn.Module):
    """Zero-initialised conv ('same' zero padding, with bias), output times exp(logscale_factor·logs);
    params `conv.weight`, `conv.bias`, `logs` (C_out, 1, 1). The scale is folded into the weight and
    bias; `channel_order` permutes the output channels (folded in as well)."""

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding="same",
                 logscale_factor=3):
        super().__init__()
        kernel_size, padding = _kernel_and_padding(kernel_size, padding)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.logscale_factor = logscale_factor
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, input, channel_order=None):
        factor = torch.exp(self.logs * self.logscale_factor).view(-1)
        weight, bias = self.conv.weight * factor.view(-1, 1, 1, 1), self.conv.bias * factor
        if channel_order is not None:
            weight, bias = weight[channel_order], bias[channel_order]
        return self.conv._conv_forward(input, weight, bias)


class FlowStep(nn.Module):
    """One Glow step of those projects' `model.py`: ActNorm2d → InvertibleConv1x1 → coupling whose
    network `block` is Conv2d → ReLU → Conv2d 1x1 → ReLU → Conv2dZeros. Same constructor (only
    flow_permutation="invconv"), `forward(input, logdet=None, reverse=False) -> (output, logdet)`
    contract and state_dict keys (`actnorm.*`, `invconv.*`, `block.{0,2,4}.*`).

    ActNorm and the 1x1 conv run as one fused op (`ops.actnorm_invconv_lu` with the ActNorm's bias
    and logs); the block's ActNorms and the last conv's scale are folded into the conv weights; the
    affine coupling (z2 = (z2 + shift)·sigmoid(logit + 2), (shift, logit) the "cross" split of the
    block's output: even and odd channels) runs on the fused coupling op, the cross split done by
    permuting the last conv's weight rows instead of its output; the block runs channels_last on the
    CPU (see glow_ext.compat._conv_layout). When `invconv.p` is not a permutation matrix the step
    falls back to the separate layers. A None logdet counts as 0.
    """

    def __init__(self, in_channels, hidden_channels, actnorm_scale, flow_permutation, flow_coupling,
                 LU_decomposed):
        super().__init__()
        if flow_permutation != "invconv":
            raise ValueError(f"FlowStep drop-in: flow_permutation must be 'invconv', got "
                             f"{flow_permutation!r} (use the original for 'shuffle' / 'reverse')")
        if flow_coupling not in ("additive", "affine"):
            raise ValueError(f"FlowStep: flow_coupling must be 'additive' or 'affine', got "
                             f"{flow_coupling!r}")
        self.flow_coupling = flow_coupling
        self.actnorm = ActNorm2d(in_channels, actnorm_scale)
        self.invconv = InvertibleConv1x1(in_channels, LU_decomposed=LU_decomposed)
        out_channels = in_channels if flow_coupling == "affine" else in_channels // 2
        self.block = nn.Sequential(
            Conv2d(in_channels // 2, hidden_channels), nn.ReLU(inplace=True),
            Conv2d(hidden_channels, hidden_channels, kernel_size=(1, 1)), nn.ReLU(inplace=True),
            Conv2dZeros(hidden_channels, out_channels))
        # The cross split's (even, odd) channels as (first, second) halves; not a state_dict entry.
        self.register_buffer("_uncross", torch.cat([torch.arange(0, out_channels, 2),
                                                    torch.arange(1, out_channels, 2)]),
                             persistent=False)

    def _block(self, z1):
        hidden = _conv_layout(z1)
        for layer in self.block[:4]:
            hidden = layer(hidden)
        order = self._uncross if self.flow_coupling == "affine" else None
        return self.block[4](hidden, order).contiguous()

    def _fused_args(self):
        args = self.invconv._op_args()
        if args is None:
            return None
        c = self.actnorm.num_features
        return (self.actnorm.bias.view(c), self.actnorm.logs.view(c)) + tuple(args[2:])

    def forward(self, input, logdet=None, reverse=False):
        logdet = 0 if logdet is None else logdet
        if reverse:
            return self.reverse_flow(input, logdet)
        return self.normal_flow(input, logdet)

    def normal_flow(self, input, logdet):
        if not self.actnorm.inited and self.actnorm.training:
            self.actnorm.initialize_parameters(input)
        args = self._fused_args()
        if args is None:
            z, logdet = self.invconv(*self.actnorm(input, logdet), reverse=False)
        else:
            z, dlogdet = ops.actnorm_invconv_lu(input, *args)
            logdet = logdet + dlogdet
        half = z.shape[1] // 2
        z1, z2 = z[:, :half], z[:, half:]
        if self.flow_coupling == "additive":
            z2 = z2 + self._block(z1)
        else:
            z2, dlogdet = coupling_ops.affine_coupling(z2, self._block(z1))
            logdet = logdet + dlogdet
        return torch.cat((z1, z2), dim=1), logdet

    def reverse_flow(self, input, logdet):
        half = input.shape[1] // 2
        z1, z2 = input[:, :half], input[:, half:]
        h = self._block(z1)
        if self.flow_coupling == "additive":
            z2 = z2 - h
        else:
            z2 = coupling_ops.affine_coupling_inverse(z2, h)
            logdet = logdet - F.logsigmoid(h[:, h.shape[1] // 2:] + 2.0).sum(dim=(1, 2, 3))
        z = torch.cat((z1, z2), dim=1)
        args = self._fused_args()
        if args is None:
            return self.actnorm(*self.invconv(z, logdet, reverse=True), reverse=True)
        dlogdet = (torch.sum(args[1]) + torch.sum(args[5])) * (z.shape[2] * z.shape[3])
        return ops.actnorm_invconv_lu_inverse(z, *args), logdet - dlogdet
