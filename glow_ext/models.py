"""The Glow model (Kingma & Dhariwal 2018) on glow_ext's layers.

L levels; each starts with a squeeze (C, H, W -> 4C, H/2, W/2), runs K flow steps
(ActNorm -> 1x1 conv / permutation -> coupling) and, except the last, ends with a split whose
half of the channels leaves as z_i under a learned conditional Gaussian prior. The top z has a
Gaussian prior from a zero-initialised conv of zeros (learn_top) plus, for class-conditional
models, a zero-initialised linear map of the one-hot label.

Densities are in nats over the continuous input; `bits_per_dim` turns the density of a
dequantized input in [-0.5, 0.5) into bits per dimension of the discrete data.

Inverses of the LU weights: `sample` (and `decode` under no_grad) invert each fused step with a
cached folded inverse map, diag(exp(−logs))·W⁻¹, computed once per parameter version and applied by
the `glow_ext.ops.channel_map` kernel; an optimizer step, load_state_dict or a move to another
device/dtype invalidates it (see `InvConv2dLU.reverse`). When autograd needs the inverse, it runs
the differentiable inverse op instead.

`LogitGlow` puts RealNVP's logit preprocessing in front of a Glow, as one more invertible layer
whose log-Jacobian is counted in the density (the trainer's --logit-alpha).

`CompiledAfterInit` runs a Glow (or anything holding one, e.g. a loss module) under
torch.compile(fullgraph=True) once its ActNorm layers have initialised from data; the fast training
set-up is

    flow = CompiledAfterInit(model)           # model = Glow(...) or LogitGlow(...)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss = -flow(x).log_prob.mean()           # or any loss of the GlowOutput
"""
import math
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from .nn import (COUPLINGS, PERMUTATIONS, ActNorm2d, ActNormInvConv, FlowStep, Split, ZeroConv2d,
                 gaussian_log_prob, gaussian_sample, squeeze2d, unsqueeze2d)
from .reversible import reversible_steps

__all__ = ["Glow", "GlowOutput", "GlowLevel", "LogitGlow", "CompiledAfterInit"]


class GlowOutput(NamedTuple):
    """What Glow.forward returns.

    log_prob: (N,) continuous log-density of x in nats (prior terms of every z + total logdet).
    logdet: (N,) total log|det ∂z/∂x| of the flow.
    zs: one latent per level (the split-off halves, then the top z last).
    class_logits: (N, n_classes) from the class head on the top z, or None without a class head.
    """
    log_prob: torch.Tensor
    logdet: torch.Tensor
    zs: List[torch.Tensor]
    class_logits: Optional[torch.Tensor]


class GlowLevel(nn.Module):
    """squeeze -> K flow steps -> optional split."""

    def __init__(self, in_channels: int, K: int, hidden_channels: int, coupling: str,
                 permutation: str, actnorm_scale: float, split: bool):
        super().__init__()
        self.channels = 4 * in_channels
        self.steps = nn.ModuleList(
            FlowStep(self.channels, hidden_channels, coupling, permutation, actnorm_scale)
            for _ in range(K))
        self.split = Split(self.channels) if split else None
        self.out_channels = self.split.kept_channels if split else self.channels


class Glow(nn.Module):
    """Glow(in_channels=3, image_size=32, K=32, L=3, hidden_channels=512, coupling="affine",
    permutation="invconv_lu", n_classes=None, learn_top=True, class_head=False, actnorm_scale=1.0,
    reversible=False)

    coupling: "affine" | "additive". permutation: "invconv_lu" (fused ActNorm + LU 1x1 conv
    kernels) | "invconv" (dense W with slogdet, the baseline) | "shuffle" | "reverse".
    n_classes: a class-conditional top prior (y, int64 labels (N,), is then required everywhere a
    prior is used); class_head: also predict the class from the top z (needs n_classes).
    ActNorm initialises from the first batch seen in train mode (run it eagerly before compiling).
    reversible: backprop through each level's K steps by reconstructing every step's input from its
    output (glow_ext.reversible) instead of storing activations, so that training memory does not
    grow with K. Same gradients, ~4/3 of the compute, no double backward; under torch.compile the
    reversible levels graph-break and run eagerly. The first (ActNorm-initialising) forward runs
    the ordinary way.

    Sampling reuses cached inverse maps of the LU weights until a parameter changes (see the module
    docstring).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, K: int = 32, L: int = 3,
                 hidden_channels: int = 512, coupling: str = "affine",
                 permutation: str = "invconv_lu", n_classes: Optional[int] = None,
                 learn_top: bool = True, class_head: bool = False, actnorm_scale: float = 1.0,
                 reversible: bool = False):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("K", K),
                            ("L", L), ("hidden_channels", hidden_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % (2 ** L):
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**L = {2 ** L}: each of the L={L} "
                f"levels squeezes H and W by 2 (use L <= {_max_levels(image_size)} or another size)")
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; expected one of {COUPLINGS}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"unknown permutation {permutation!r}; expected one of {PERMUTATIONS}")
        if n_classes is not None and (not isinstance(n_classes, int) or isinstance(n_classes, bool)
                                      or n_classes < 1):
            raise ValueError(f"n_classes must be None or a positive int, got {n_classes!r}")
        if class_head and n_classes is None:
            raise ValueError("class_head=True needs n_classes")
        if not actnorm_scale > 0:
            raise ValueError(f"actnorm_scale must be positive, got {actnorm_scale!r}")

        self.in_channels = in_channels
        self.image_size = image_size
        self.K, self.L = K, L
        self.hidden_channels = hidden_channels
        self.coupling = coupling
        self.permutation = permutation
        self.n_classes = n_classes
        self.learn_top = learn_top
        self.actnorm_scale = actnorm_scale
        self.reversible = bool(reversible)

        levels, channels, size = [], in_channels, image_size
        self.z_shapes = []  # (C, H, W) of each z, the top last
        for i in range(L):
            level = GlowLevel(channels, K, hidden_channels, coupling, permutation, actnorm_scale,
                              split=i < L - 1)
            size //= 2
            if level.split is not None:
                self.z_shapes.append((level.split.z_channels, size, size))
            channels = level.out_channels
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.z_shapes.append((channels, size, size))
        self.top_channels = channels

        self.top_prior = ZeroConv2d(2 * channels, 2 * channels) if learn_top else None
        if n_classes is not None:
            self.class_embedding = nn.Linear(n_classes, 2 * channels)
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)
        else:
            self.class_embedding = None
        if class_head:
            self.class_head = nn.Linear(channels, n_classes)
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)
        else:
            self.class_head = None

    # ---- input checks -------------------------------------------------------------------------
    @property
    def input_shape(self):
        return (self.in_channels, self.image_size, self.image_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            c, h, w = self.input_shape
            raise ValueError(f"Glow expects x of shape (N, {c}, {h}, {w}) "
                             f"(in_channels={c}, image_size={h}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"Glow expects a floating-point x (dequantized data), got {x.dtype}")

    def _one_hot(self, y, n: int, like: torch.Tensor):
        """One-hot labels for the class-conditional prior, or None for an unconditional model."""
        if self.n_classes is None:
            if y is not None:
                raise ValueError("this Glow is not class-conditional (n_classes=None); pass y=None")
            return None
        if y is None:
            raise ValueError(f"this Glow is class-conditional (n_classes={self.n_classes}); "
                             "pass labels y, an int64 tensor of shape (N,)")
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                              torch.int8, torch.uint8):
            raise ValueError(f"y must be an integer tensor of labels, got "
                             f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        if tuple(y.shape) != (n,):
            raise ValueError(f"y must have shape ({n},) (one label per sample), got {tuple(y.shape)}")
        if n > 0:
            low, high = torch.aminmax(y)
            low, high = int(low), int(high)  # one host synchronisation
            if low < 0 or high >= self.n_classes:
                raise ValueError(f"labels must lie in [0, {self.n_classes}), got values in "
                                 f"[{low}, {high}]")
        return nn.functional.one_hot(y.long(), self.n_classes).to(device=like.device, dtype=like.dtype)

    # ---- priors -------------------------------------------------------------------------------
    def top_prior_params(self, n: int, y=None, like: Optional[torch.Tensor] = None):
        """(mean, log_std) of the top z, each (n, C_top, H_top, W_top)."""
        if like is None:
            like = next(self.parameters())
        one_hot = self._one_hot(y, n, like)
        c, h, w = self.z_shapes[-1]
        # The learned top prior is a conv of zeros: the same for every sample, so run it once.
        # Under autocast the prior's networks run in reduced precision; their outputs are widened
        # to the flow's dtype before they are combined and parametrise the log-probability.
        params = like.new_zeros((1, 2 * c, h, w))
        if self.top_prior is not None:
            params = self.top_prior(params).to(like.dtype)
        params = params.expand(n, -1, -1, -1)
        if one_hot is not None:
            params = params + self.class_embedding(one_hot).to(like.dtype).view(n, 2 * c, 1, 1)
        return params[:, :c], params[:, c:]

    # ---- the flow -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y=None) -> GlowOutput:
        self._check_input(x)
        top_mean, top_log_std = self.top_prior_params(x.shape[0], y, like=x)
        zs, logdet, split_log_prob = self._flow(x)
        h = zs[-1]
        log_prob = split_log_prob + gaussian_log_prob(h, top_mean, top_log_std) + logdet
        class_logits = (self.class_head(h.mean(dim=(2, 3))).to(h.dtype)
                        if self.class_head is not None else None)
        return GlowOutput(log_prob=log_prob, logdet=logdet, zs=zs, class_logits=class_logits)

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """(N,) log-density of x in nats."""
        return self.forward(x, y).log_prob

    def bits_per_dim(self, x: torch.Tensor, n_bins: int, y=None) -> torch.Tensor:
        """(N,) bits/dim of the discrete data behind the dequantized x in [-0.5, 0.5):
        (−log p(x) + D·log n_bins) / (D·ln 2), D = C·H·W."""
        if n_bins < 1:
            raise ValueError(f"n_bins must be positive, got {n_bins}")
        d = math.prod(self.input_shape)
        return (-self.log_prob(x, y) + d * math.log(n_bins)) / (d * math.log(2.0))

    def encode(self, x: torch.Tensor, y=None) -> List[torch.Tensor]:
        """The latents [z_1, ..., z_{L-1}, z_top] of x. The flow does not depend on the label: y is
        optional even for a class-conditional model, and only checked when given."""
        self._check_input(x)
        if y is not None:
            self._one_hot(y, x.shape[0], x)
        return self._flow(x)[0]

    def _flow(self, x: torch.Tensor):
        """x through every level: the latents (top last), the total logdet and the split priors'
        log-probability, both per sample."""
        n = x.shape[0]
        logdet = x.new_zeros(n)
        log_prob = x.new_zeros(n)
        zs = []
        h = x
        for level in self.levels:
            h = squeeze2d(h)
            if self._backprop_reversibly(level):
                h, level_logdet = reversible_steps(level.steps, h)
                logdet = logdet + level_logdet
            else:
                for step in level.steps:
                    h, step_logdet = step(h)
                    logdet = logdet + step_logdet
            if level.split is not None:
                h, z, z_log_p = level.split(h)
                zs.append(z)
                log_prob = log_prob + z_log_p
        zs.append(h)
        return zs, logdet, log_prob

    def _backprop_reversibly(self, level: GlowLevel) -> bool:
        if not (self.reversible and torch.is_grad_enabled()):
            return False
        # The data-dependent ActNorm init needs the ordinary forward pass.
        return all(layer._initialized for layer in level.modules()
                   if isinstance(layer, (ActNorm2d, ActNormInvConv)))

    def _check_latents(self, zs) -> None:
        if not isinstance(zs, (list, tuple)) or len(zs) != self.L:
            raise ValueError(f"zs must be a list of {self.L} latents (one per level, the top last), "
                             f"got {type(zs).__name__} of length {len(zs) if hasattr(zs, '__len__') else '?'}")
        n = zs[-1].shape[0] if zs[-1].dim() == 4 else None
        for i, (z, shape) in enumerate(zip(zs, self.z_shapes)):
            if z.dim() != 4 or tuple(z.shape[1:]) != shape or z.shape[0] != n:
                raise ValueError(f"zs[{i}] must have shape (N, {', '.join(map(str, shape))}) with "
                                 f"one N for all levels, got {tuple(z.shape)}")

    def _reverse(self, h: torch.Tensor, zs=None, temperature: float = 1.0) -> torch.Tensor:
        for i in reversed(range(self.L)):
            level = self.levels[i]
            if level.split is not None:
                h = level.split.reverse(h, None if zs is None else zs[i], temperature)
            for step in reversed(level.steps):
                h = step.reverse(h)
            h = unsqueeze2d(h)
        return h

    def decode(self, zs: List[torch.Tensor], y=None) -> torch.Tensor:
        """The exact inverse of encode: x from all L latents (the split-off z's are reused).
        Differentiable; the fused steps invert through the kernels' inverse op. y: as in encode."""
        self._check_latents(zs)
        if y is not None:
            self._one_hot(y, zs[-1].shape[0], zs[-1])
        return self._reverse(zs[-1], zs)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None) -> torch.Tensor:
        """n samples (N, C, H, W): every z drawn from its prior with the std scaled by temperature
        (0 gives the prior means, so the result is deterministic). y: labels (n,) when
        class-conditional. Runs without autograd."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        mean, log_std = self.top_prior_params(n, y)
        return self._reverse(gaussian_sample(mean, log_std, temperature), None, temperature)

    # ---- helpers ------------------------------------------------------------------------------
    def actnorm_layers(self):
        """Every ActNorm of the model (ActNorm2d or the fused ActNormInvConv)."""
        return [m for m in self.modules() if isinstance(m, (ActNorm2d, ActNormInvConv))]

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, K={self.K}, "
                f"L={self.L}, hidden_channels={self.hidden_channels}, coupling={self.coupling!r}, "
                f"permutation={self.permutation!r}, n_classes={self.n_classes}, "
                f"learn_top={self.learn_top}, class_head={self.class_head is not None}, "
                f"actnorm_scale={self.actnorm_scale}, reversible={self.reversible}")


def _max_levels(image_size: int) -> int:
    levels = 0
    while image_size % 2 == 0:
        image_size //= 2
        levels += 1
    return levels


class LogitGlow(nn.Module):
    """A Glow behind RealNVP's logit preprocessing (Dinh et al. 2017):

        u = logit(p),  p = a + (1 - 2a)·(x + 0.5)   for x in [-0.5, 0.5),

    log p(x) = log p_glow(u) + Σ log|du/dx|, log|du/dx| = log(1 - 2a) - log p - log(1 - p), so
    log_prob, bits_per_dim and sample are those of a density on x exactly like Glow's own (the
    preprocessing is one more invertible layer). Data piled up at the ends of the range (digits'
    0 and 16) becomes a smooth target. The flow is `self.flow` (state_dict keys "flow.*")."""

    def __init__(self, flow: nn.Module, alpha: float = 0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.flow = flow
        self.alpha = float(alpha)

    @property
    def n_classes(self):
        return self.flow.n_classes

    @property
    def input_shape(self):
        return self.flow.input_shape

    def to_logit(self, x: torch.Tensor):
        """(u, log|du/dx| summed per sample (N,))."""
        a = self.alpha
        p = a + (1 - 2 * a) * (x.to(torch.promote_types(x.dtype, torch.float32)) + 0.5)
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        logdet = (math.log(1 - 2 * a) - log_p - log_1mp).flatten(1).sum(1)
        return (log_p - log_1mp).to(x.dtype), logdet

    def from_logit(self, u: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(u) - self.alpha) / (1 - 2 * self.alpha) - 0.5

    def forward(self, x: torch.Tensor, y=None):
        u, logdet = self.to_logit(x)
        out = self.flow(u, y)
        return out._replace(log_prob=out.log_prob + logdet, logdet=out.logdet + logdet)

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        return self.forward(x, y).log_prob

    def bits_per_dim(self, x: torch.Tensor, n_bins: int, y=None) -> torch.Tensor:
        d = math.prod(self.input_shape)
        return (-self.log_prob(x, y) + d * math.log(n_bins)) / (d * math.log(2.0))

    def encode(self, x: torch.Tensor, y=None):
        return self.flow.encode(self.to_logit(x)[0], y)

    def decode(self, zs, y=None) -> torch.Tensor:
        return self.from_logit(self.flow.decode(zs, y))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None) -> torch.Tensor:
        return self.from_logit(self.flow.sample(n, temperature, y))


class CompiledAfterInit(nn.Module):
    """`module` (a Glow, a LogitGlow, or a loss module holding one) called through
    torch.compile(fullgraph=True) once every ActNorm inside it has initialised, and eagerly before:
    the data-dependent initialisation reads its batch on the host, which cannot be traced. The
    compiled forward has no graph break (the custom ops have fake kernels) and its backward runs
    through AOTAutograd. `module` keeps its parameters; this wrapper adds none (its state_dict is
    the module's under "module."). Reversible backprop runs eagerly, so a Glow with
    reversible=True is refused."""

    def __init__(self, module: nn.Module, **compile_options):
        super().__init__()
        if any(getattr(m, "reversible", False) for m in module.modules() if isinstance(m, Glow)):
            raise ValueError("reversible backprop runs eagerly: CompiledAfterInit needs a Glow "
                             "with reversible=False")
        self.module = module
        self._actnorms = [m for m in module.modules() if isinstance(m, (ActNorm2d, ActNormInvConv))]
        # Kept out of the module tree: the compiled wrapper holds the same parameters.
        self.__dict__["_compiled"] = torch.compile(module, fullgraph=True, **compile_options)

    @property
    def compiled(self) -> bool:
        """Whether the next call runs the compiled module."""
        return all(layer._initialized for layer in self._actnorms)

    def forward(self, *args, **kwargs):
        if self.compiled:
            return self._compiled(*args, **kwargs)
        return self.module(*args, **kwargs)
