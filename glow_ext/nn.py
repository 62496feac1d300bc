"""Glow layers: the fused ActNormInvConv2d, and the plain-PyTorch layers a Glow model needs around it."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import coupling_ops, ops, reference

# oneDNN's fused inference convolutions (the ops Inductor's CPU freezing uses): CouplingNN's no-grad path.
_ONEDNN_INFERENCE = (torch.backends.mkldnn.is_available()
                     and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                     and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


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


@torch.no_grad()
def _channel_mean_std(x: torch.Tensor):
    """Per-channel mean and population std over (N, H, W), two-pass, averaged over ranks."""
    x = x.detach().to(reference.accumulation_dtype(x))
    mean = _all_reduce_mean(x.mean(dim=(0, 2, 3)))
    var = _all_reduce_mean((x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)))
    return mean, var.sqrt()


class _DataDependentActNorm:
    """ActNorm's state and data-dependent init, shared by ActNorm2d and ActNormInvConv2d.

    Parameters `bias`, `logs` (C,). On the first forward in train mode: bias = −mean,
    logs = log(scale / (std + 1e-6)) (population std over N, H, W, averaged over torch.distributed
    ranks). The flag is the `initialized` buffer, so a loaded checkpoint is never re-initialised.
    """

    def _register_actnorm(self, num_channels: int) -> None:
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.logs = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer: reading the buffer each call would synchronise with the GPU.
        self._initialized = False
        self.register_load_state_dict_post_hook(_sync_initialized_flag)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean, std = _channel_mean_std(x)
        # An empty or non-finite batch would make every later output NaN; the statistics are
        # already averaged over ranks, so every rank raises together. One sync, on the first batch.
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
            raise ValueError(f"ActNorm's data-dependent initialisation needs a non-empty batch of "
                             f"finite values; got shape {tuple(x.shape)}"
                             f"{' (empty)' if x.numel() == 0 else ' with NaN or Inf values'}")
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
        self.initialized.fill_(True)
        self._initialized = True

    def _initialize_if_needed(self, x: torch.Tensor) -> None:
        if self.training and not self._initialized:
            self.initialize(x)


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (Adam(fused=True), the trainer's default) update parameters in place without
# bumping their version counters, so every step of any torch optimizer also invalidates the caches.
register_optimizer_step_post_hook(_count_optimizer_step)


def _versions(tensors):
    """Changes whenever one of the tensors is modified in place (an in-place op, load_state_dict),
    an optimizer steps, or a tensor is replaced (`.to()`, `.double()`)."""
    return (_optimizer_steps,) + tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class InvConv2dLU(nn.Module):
    """The LU-parametrised invertible 1x1 convolution alone, on the fused op with an identity ActNorm.

    W = P·L·(U + diag(sign_s·exp(log_s))); logdet = H·W·Σ log_s (0-dim). `bias` and `logs` are zero
    non-persistent buffers (not in the state_dict), so the layer's state is exactly perm, lower,
    upper, log_s, sign_s.

    reverse: when autograd needs the inverse (grad mode with y or a parameter requiring grad) it runs
    the differentiable inverse op (triangular solves on every call). Otherwise - sampling, or decode
    under no_grad - the folded inverse map diag(exp(−logs))·W⁻¹ is computed once and cached, and each
    call is one `glow_ext.ops.channel_map` pass over the pixels. The cache is keyed on the version
    counters and storages of the parameters and buffers, so an optimizer step, load_state_dict or a
    move to another device or dtype invalidates it.
    """

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
        key = (dtype, _versions(self._params()))
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
        return self._inverse_cache[1:]

    def weight(self) -> torch.Tensor:
        """The assembled C x C matrix W (for inspection; the ops never need it)."""
        return reference.lu_weight(self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class ActNormInvConv2d(_DataDependentActNorm, InvConv2dLU):
    """ActNorm followed by an LU-parametrised invertible 1x1 convolution, in one fused op.

    y = W·((x + bias)·exp(logs)) at every pixel, logdet = H·W·(Σ logs + Σ log_s) (a 0-dim tensor,
    the same for every sample). ActNorm initialises from the first training batch so that its
    output has zero mean and standard deviation `scale` per channel; the flag is a buffer, so a
    loaded checkpoint is never re-initialised. Under torch.distributed the statistics are averaged
    over ranks. W starts as a random rotation.
    """

    def __init__(self, num_channels: int, scale: float = 1.0, generator=None):
        super().__init__(num_channels, generator)
        self.scale = scale

    def forward(self, x: torch.Tensor):
        self._initialize_if_needed(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}"


# ---------------------------------------------------------------------------------------------------
# The rest of a Glow model: plain-PyTorch layers around the fused ActNormInvConv2d.
#
# Contract shared by every invertible layer below: forward(x) -> (y, logdet) with logdet either
# per-sample (N,) or a 0-dim tensor (the same for every sample, broadcastable to (N,)), and
# reverse(y) -> x. Split, which changes the number of tensors, has its own contract (see there).
# ---------------------------------------------------------------------------------------------------
COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv_lu", "invconv", "shuffle", "reverse")


def _zero_logdet(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


class ActNorm2d(_DataDependentActNorm, nn.Module):
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
        c = self.num_channels
        y = F.conv2d(x, self.weight.view(c, c, 1, 1))
        logabsdet = torch.linalg.slogdet(self.weight.to(torch.float64))[1].to(self.weight.dtype)
        return y, logabsdet * (x.shape[2] * x.shape[3])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        c = self.num_channels
        inverse = torch.linalg.inv(self.weight.to(torch.float64)).to(self.weight.dtype)
        return F.conv2d(y, inverse.view(c, c, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


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


class ZeroConv2d(nn.Module):
    """3x3 convolution (zero padding), zero-initialised, output scaled by exp(logscale_factor·logs)
    with a learned per-channel `logs` (the paper's zero-init last layer): starts as exactly 0."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x))

    def scale(self, conv_out: torch.Tensor) -> torch.Tensor:
        """The learned per-channel output scale, applied to the convolution's output."""
        return conv_out * (self.logs * self.logscale_factor).exp().view(1, -1, 1, 1)


class CouplingNN(nn.Module):
    """The coupling network: 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> ZeroConv2d (no ActNorm inside).

    The first two convolutions start from N(0, 0.05²) weights and zero biases; the last is zero, so
    the network's output starts at exactly 0. Without autograd on the CPU it runs oneDNN's inference
    convolutions on cached weights (see `_runs_prepacked`); `prepacked_inference = False` on an
    instance keeps it on the plain modules."""

    prepacked_inference = True

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels),
        )
        self.out_channels = out_channels
        for conv in (self.net[0], self.net[2]):
            nn.init.normal_(conv.weight, 0.0, 0.05)
            nn.init.zeros_(conv.bias)
        self._prepacked = None  # (key, weights) of the oneDNN inference path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 0 or x.shape[3] == 0:
            # conv2d refuses a 0-pixel-high or -wide input (padded, it is smaller than the kernel).
            return x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        if x.device.type == "cpu":
            # oneDNN's convolutions run faster on channels-last (NHWC) data: a whole K=8, L=3,
            # width-128 training step took 205 ms against 232 ms (1 thread, medians of 11).
            x = x.contiguous(memory_format=torch.channels_last)
            if self._runs_prepacked(x):
                return self._forward_prepacked(x)
        return self.net(x)

    def __getstate__(self):
        # The prepacked weights are opaque oneDNN tensors: copies and pickles rebuild them.
        return dict(self.__dict__, _prepacked=None)

    def _convs(self):
        return self.net[0], self.net[2], self.net[4].conv

    def _runs_prepacked(self, x: torch.Tensor) -> bool:
        """Without autograd (sampling, evaluation, reversible backprop's forward pass), float32 on
        the CPU: oneDNN's inference convolutions, with ReLU fused into the first two and the
        weights reordered once per parameter version and input shape instead of at every call.
        Sampling 16 images took 29.8 ms against 33.4 ms (K=8, L=3, width 128) and 696 ms against
        796 ms (K=32, width 512), same output, 2 threads, medians of 21. Hooks (the trainer's
        coupling dropout) need the modules called one by one, autocast its bfloat16 convolutions,
        and a network whose layers were swapped (another activation) its own layers, so they keep
        the plain path."""
        return (self.prepacked_inference and not torch.is_grad_enabled() and _ONEDNN_INFERENCE
                and torch.backends.mkldnn.enabled
                and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and self._is_as_built()
                and all(conv.weight.dtype == torch.float32 for conv in self._convs())
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self.net.modules())
                and not (nn.modules.module._global_forward_hooks
                         or nn.modules.module._global_forward_pre_hooks))

    def _is_as_built(self) -> bool:
        return ([type(m) for m in self.net] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, ZeroConv2d]
                and type(self.net[4].conv) is nn.Conv2d
                and all(conv.padding_mode == "zeros" for conv in self._convs()))

    def _forward_prepacked(self, x: torch.Tensor) -> torch.Tensor:
        convs = self._convs()
        key = (tuple(x.shape), _versions(self.parameters()))
        if self._prepacked is None or self._prepacked[0] != key:
            weights, size = [], list(x.shape)
            for conv in convs:
                weights.append(torch.ops.mkldnn._reorder_convolution_weight(
                    conv.weight, list(conv.padding), list(conv.stride), list(conv.dilation),
                    conv.groups, size))
                size = [size[0], conv.out_channels, size[2], size[3]]
            self._prepacked = (key, weights)
        h = x
        for conv, weight, post_op in zip(convs, self._prepacked[1], ("relu", "relu", "none")):
            h = torch.ops.mkldnn._convolution_pointwise(
                h, weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, post_op, [], "")
        return self.net[4].scale(h)


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


class AffineCoupling(_Coupling):
    """h = NN(x_a) = (h_t, h_s); scale = sigmoid(h_s + 2), y_b = (x_b + h_t)·scale, y = (x_a, y_b),
    logdet = Σ log scale (N,). The arithmetic on x_b and h is the fused op
    `glow_ext.coupling_ops.affine_coupling` (one pass, and one more backward)."""

    def __init__(self, num_channels: int, hidden_channels: int = 512):
        super().__init__(num_channels, hidden_channels, out_per_active=2)

    def _transform(self, x_b, h):
        return coupling_ops.affine_coupling(x_b, h.to(x_b.dtype))

    def _untransform(self, y_b, h):
        return coupling_ops.affine_coupling_inverse(y_b, h.to(y_b.dtype))


class AdditiveCoupling(_Coupling):
    """y_b = x_b + NN(x_a), y_a = x_a; logdet 0."""

    def __init__(self, num_channels: int, hidden_channels: int = 512):
        super().__init__(num_channels, hidden_channels, out_per_active=1)

    def _transform(self, x_b, h):
        return x_b + h, _zero_logdet(x_b)

    def _untransform(self, y_b, h):
        return y_b - h


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
        h = self.prior(kept)
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
