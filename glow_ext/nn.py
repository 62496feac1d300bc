"""Layers built on the fused kernels."""
import torch
from torch import nn

from . import ops, reference


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


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over data-parallel ranks, so that every replica initialises ActNorm identically."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def _sync_initialized_flag(module, incompatible_keys):
    module._initialized = bool(module.initialized)


class ActNormInvConv2d(nn.Module):
    """ActNorm followed by an LU-parametrised invertible 1x1 convolution, in one fused op.

    y = W·((x + bias)·exp(logs)) at every pixel, logdet = H·W·(Σ logs + Σ log_s) (a 0-dim tensor,
    the same for every sample). ActNorm initialises from the first training batch so that its
    output has zero mean and standard deviation `scale` per channel; the flag is a buffer, so a
    loaded checkpoint is never re-initialised. Under torch.distributed the statistics are averaged
    over ranks. W starts as a random rotation.
    """

    def __init__(self, num_channels: int, scale: float = 1.0, generator=None):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.scale = scale
        perm, lower, upper, log_s, sign_s = random_rotation_lu(num_channels, generator)
        check_permutation(perm, num_channels)
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.logs = nn.Parameter(torch.zeros(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(upper)
        self.log_s = nn.Parameter(log_s)
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", sign_s)
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer: reading the buffer each call would synchronise with the GPU.
        self._initialized = False
        self.register_load_state_dict_post_hook(_sync_initialized_flag)

    def _params(self):
        return (self.bias, self.logs, self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent ActNorm init: bias = −mean, logs = log(scale / (std + 1e-6)) per channel."""
        x = x.detach().to(self.bias.dtype)
        moments = torch.stack([x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))])
        mean, mean_sq = _all_reduce_mean(moments)
        std = (mean_sq - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: torch.Tensor):
        if self.training and not self._initialized:
            self.initialize(x)
        return ops.actnorm_invconv_lu(x, *self._params())

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return ops.actnorm_invconv_lu_inverse(y, *self._params())

    def weight(self) -> torch.Tensor:
        """The assembled C x C matrix W (for inspection; the ops never need it)."""
        return reference.lu_weight(self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}"
