"""ActNorm: a per-channel affine map whose first training batch sets it (data-dependent init)."""
import torch
from torch import nn

from . import reference
from .distributed import all_reduce_mean, all_reduce_sum


def _sync_initialized_flag(module, incompatible_keys):
    module._initialized = bool(module.initialized)


@torch.no_grad()
def _channel_mean_std(x: torch.Tensor):
    """Per-channel mean and population std of an (N, C, *spatial) x over N and the spatial
    positions, two-pass, averaged over ranks."""
    x = x.detach().to(reference.accumulation_dtype(x))
    dims = (0, *range(2, x.dim()))
    mean = all_reduce_mean(x.mean(dim=dims))
    var = all_reduce_mean((x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().mean(dim=dims))
    return mean, var.sqrt()


@torch.no_grad()
def _masked_channel_mean_std(x: torch.Tensor, valid: torch.Tensor):
    """Per-channel mean and population std of x over its valid positions (`valid`, a bool
    (N, 1, *spatial)), two-pass. Sums and counts are added over ranks before dividing, so a rank
    with fewer valid positions weighs less. Padding is never read (torch.where, not a product):
    it may hold anything, even Inf."""
    x = x.detach().to(reference.accumulation_dtype(x))
    dims = (0, *range(2, x.dim()))
    count = all_reduce_sum(valid.sum(dtype=x.dtype))
    mean = all_reduce_sum(torch.where(valid, x, 0).sum(dim=dims)) / count
    deviation = x - mean.view(1, -1, *([1] * (x.dim() - 2)))
    var = all_reduce_sum(torch.where(valid, deviation.square(), 0).sum(dim=dims)) / count
    return mean, var.sqrt()


def _what_spoils_the_statistics(x: torch.Tensor, valid) -> str:
    if x.numel() == 0:
        return "empty"
    if valid is not None and not bool(valid.any()):
        return "no valid position in the mask"
    return "NaN or Inf values"


class DataDependentActNorm:
    """ActNorm's state and data-dependent init, shared by ActNorm2d and ActNormInvConv.

    Parameters `bias`, `logs` (C,). On the first forward in train mode: bias = −mean,
    logs = log(scale / (std + 1e-6)) (population std over N and the spatial positions, averaged
    over torch.distributed ranks; with a mask, over the valid positions only, from sums and counts
    added over ranks). The flag is the `initialized` buffer, so a loaded checkpoint is never
    re-initialised.
    """

    def _register_actnorm(self, num_channels: int) -> None:
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.logs = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer: reading the buffer each call would synchronise with the GPU.
        self._initialized = False
        self.register_load_state_dict_post_hook(_sync_initialized_flag)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, valid: torch.Tensor = None) -> None:
        """`valid`: None, or a bool (N, 1, *spatial) selecting the positions the statistics use."""
        mean, std = _channel_mean_std(x) if valid is None else _masked_channel_mean_std(x, valid)
        # An empty or non-finite batch would make every later output NaN; the statistics are
        # already averaged over ranks, so every rank raises together. One sync, on the first batch.
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
            raise ValueError(f"ActNorm's data-dependent initialisation needs a non-empty batch of "
                             f"finite values; got shape {tuple(x.shape)} "
                             f"({_what_spoils_the_statistics(x, valid)})")
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
        self.initialized.fill_(True)
        self._initialized = True

    def _initialize_if_needed(self, x: torch.Tensor, valid: torch.Tensor = None) -> None:
        if self.training and not self._initialized:
            self.initialize(x, valid)


class ActNorm2d(DataDependentActNorm, nn.Module):
    """ActNorm alone: y = (x + bias)·exp(logs) per channel, logdet = H·W·Σ logs (0-dim).

    `bias`, `logs` are (C,). Data-dependent init on the first forward in train mode: bias = −mean,
    logs = log(scale / (std + 1e-6)) (population std over N, H, W; averaged over torch.distributed
    ranks). The flag is the `initialized` buffer, so a loaded checkpoint is never re-initialised;
    reverse never initialises.
    """

    def __init__(self, num_channels: int, scale: float = 1.0):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.scale = scale
        self._register_actnorm(num_channels)

    def forward(self, x: torch.Tensor):
        self._initialize_if_needed(x)
        y = (x + self.bias.view(1, -1, 1, 1)) * self.logs.exp().view(1, -1, 1, 1)
        return y, self.logs.sum() * (x.shape[2] * x.shape[3])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.logs).exp().view(1, -1, 1, 1) - self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}"
