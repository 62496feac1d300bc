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
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import random_rotation_lu
from . import _Memo, _channel_mean_var, _lu_of_dense, _permutation_of

__all__ = ["ActNorm2d", "InvertibleConv1x1"]


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
