"""What a run optimises: the model built from the configuration, the loss (bits/dim, plus an
optional class head's cross-entropy), the optimizer and learning-rate schedule, coupling dropout,
the exponential moving average of the weights, and the dequantization noise of each step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..models import Glow, LogitGlow
from .errors import TrainingError


def build_model(config: dict, image_shape, n_classes: int = 0) -> nn.Module:
    """The Glow of the configuration, behind the logit preprocessing if --logit-alpha > 0."""
    c, h, w = image_shape
    if h != w:
        raise TrainingError(f"Glow needs square images, got {h}x{w}")
    try:
        glow = Glow(in_channels=c, image_size=h, K=config["K"], L=config["L"],
                    hidden_channels=config["hidden"], coupling=config["coupling"],
                    permutation=config["permutation"],
                    n_classes=n_classes if config["conditional"] else None,
                    learn_top=config["learn_top"], class_head=config["class_weight"] > 0,
                    actnorm_scale=config["actnorm_scale"],
                    reversible=bool(config.get("reversible")))
    except ValueError as e:
        raise TrainingError(f"cannot build the model: {e}") from e
    alpha = config.get("logit_alpha") or 0.0
    return LogitGlow(glow, alpha) if alpha > 0 else glow


class Objective(nn.Module):
    """loss = mean bits/dim (+ class_weight · cross-entropy of the class head); what DDP wraps."""

    def __init__(self, model: nn.Module, n_bins: int, class_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.n_bins = n_bins
        self.class_weight = class_weight

    def forward(self, x, y=None):
        out = self.model(x, y)
        d = x[0].numel()
        bpd = (-out.log_prob.float() + d * math.log(self.n_bins)) / (d * math.log(2.0))
        loss = bpd.mean()
        if self.class_weight > 0 and out.class_logits is not None:
            loss = loss + self.class_weight * F.cross_entropy(out.class_logits.float(), y)
        return loss, bpd.detach().mean()


def make_optimizer(config: dict, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay (if any) only on convolution and linear weights: not on ActNorm, the 1x1 conv
    factors (decaying them would pull W towards singular) or the zero-init output scales."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                decay.append(p)
            else:
                no_decay.append(p)
    wd = config["weight_decay"]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config["lr"]
    if config["optimizer"] == "adam":
        return adam(groups, lr=lr)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if config["optimizer"] == "adamax":
        return torch.optim.Adamax(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam on its fused implementation (one kernel over every parameter, CPU and CUDA): a Glow has
    ~300 parameter tensors, and the per-tensor loop (or foreach) pays their overhead each step.
    Fused Adam does not bump the parameters' version counters; the layers' caches see its steps
    through glow_ext.cache_invalidation."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def add_coupling_dropout(model: nn.Module, p: float) -> int:
    """Dropout (rate p, training mode only) after every ReLU of the coupling networks, through
    forward hooks, so the model's modules and state_dict stay as they are. Returns the count."""
    if p <= 0:
        return 0
    hooked = 0
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, inputs, output: F.dropout(output, p, m.training))
            hooked += 1
    return hooked


def lr_lambda(config: dict, total_steps: int):
    warmup, decay, floor = config["warmup"], config["lr_decay"], config["min_lr_ratio"]

    def factor(step: int) -> float:  # step = number of updates done so far
        f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if decay == "cosine" and step >= warmup and total_steps > warmup:
            t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            f *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return f

    return factor


def _warm_started_ema(decay: float):
    """get_ema_multi_avg_fn's update with a warm-started decay, min(decay, (1 + t) / (10 + t)) at
    the t-th update: a fixed decay of 0.999 would hold on to the first steps' weights for
    thousands of steps. (t counts the update that only copies the weights as the first.)"""
    def update(ema_params, params, n_averaged):
        t = int(n_averaged) + 1
        get_ema_multi_avg_fn(min(decay, (1 + t) / (10 + t)))(ema_params, params, n_averaged)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the model's parameters (Polyak averaging), evaluated and
    sampled in its place. Its buffers are not averaged (use_buffers=False): AveragedModel copies
    them from the model at each update, so ActNorm's `initialized` flags and the permutations stay
    the model's. The first update copies the weights, which happens after ActNorm's data-dependent
    initialisation (the first forward pass)."""
    return AveragedModel(model, multi_avg_fn=_warm_started_ema(decay), use_buffers=False)


def load_ema_state(ema: AveragedModel, state: dict, model: nn.Module) -> None:
    """Loads an EMA state: AveragedModel's state_dict, or the trainer's own EMA format that some
    checkpoints hold ({"decay", "updates", "shadow": {parameter name: tensor}};
    tests/fixtures/ema-v1-checkpoint.pt is one)."""
    if "shadow" not in state:
        ema.load_state_dict(state)
        return
    with torch.no_grad():
        for name, p in ema.module.named_parameters():
            p.copy_(state["shadow"][name])
        for averaged, current in zip(ema.module.buffers(), model.buffers()):
            averaged.copy_(current)
        ema.n_averaged.fill_(int(state["updates"]))


def noise(shape, seed: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) dequantization noise from a private generator seeded with `seed`."""
    generator = torch.Generator(device=device).manual_seed(int(seed) % (2**63))
    return torch.rand(shape, generator=generator, device=device)


def step_noise_seed(seed: int, step: int) -> int:
    """Seed of the dequantization noise of (0-based) training step `step`."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2**63)
