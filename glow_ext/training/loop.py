"""Training Glow: `python -m glow_ext train` (or `glow-ext train`), also under torchrun.

What a run does, in its run folder (`--out`):
  config.json        the resolved configuration
  metrics.jsonl      one JSON object per line: train entries (step, loss, bpd, lr, grad_norm, it/s)
                     every --log-every steps and test entries (test bpd) every --eval-every steps
  checkpoint.pt      the latest state (model, optimizer, scheduler, step, RNG states, EMA, config),
                     written atomically every --checkpoint-every steps and at the end; --resume
                     continues from it
  best.pt            the model with the lowest test bpd so far (held-out selection)
  samples/           sample grids (PNG) every --sample-every steps
  summary.json       best and final test bpd, steps, wall time

Determinism and resume: the order of the training data is a function of (seed, epoch) and the
dequantization noise of step s a function of (seed, s), drawn for the whole global batch, so a
resumed run computes exactly the losses the uninterrupted run would have, and a run on R
processes (each taking its 1/R slice of every global batch) matches a one-process run.

Data-parallel training: launched by torchrun (WORLD_SIZE > 1), it uses gloo on the CPU and nccl on
GPUs; gradients are averaged by DistributedDataParallel, ActNorm's data-dependent initialisation
all-reduces its statistics (glow_ext.nn), and only rank 0 writes files or prints.

A non-finite loss or gradient norm stops the run before the update is applied, with
TrainingDiverged (exit status 3 from the command line); the last checkpoint written stays as it was.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as gdata

CHECKPOINT_FORMAT = "glow_ext.train/1"
EVAL_NOISE_SEED = 0x5EED_0E7A1  # the test set's dequantization noise: the same for every run

# Defaults: DEFAULTS, overridden per dataset by DATASET_DEFAULTS[dataset]. The image datasets get
# the paper's CIFAR-10 model (K=32, L=3, width 512, affine, learned 1x1 conv, Adam 1e-3 with
# warm-up). The digits default is chosen so that `glow-ext train` reaches a test bpd below 2.0 on
# the scikit-learn digits in a few minutes on 2 CPU cores: the data is tiny (1500 images), so the
# model is small, regularised with dropout in the coupling networks, fed through RealNVP's logit
# preprocessing (digits pixels pile up at 0 and 16: the edges of the box), trained with a cosine
# schedule and selected by held-out bpd.
DEFAULTS = dict(
    dataset="digits", data_dir=None, image_size=None, n_bits=None, channels=3, test_fraction=0.1,
    K=32, L=3, hidden=512, coupling="affine", permutation="invconv_lu", actnorm_scale=1.0,
    learn_top=True, conditional=False, n_classes=None, class_weight=0.0, logit_alpha=0.0,
    steps=100_000, epochs=None, batch_size=64, lr=1e-3, warmup=1000, lr_decay="cosine",
    min_lr_ratio=0.0, weight_decay=0.0, grad_clip=50.0, optimizer="adam", ema=0.0, dropout=0.0,
    eval_every=1000, sample_every=5000, checkpoint_every=None, log_every=100, eval_batch_size=512,
    n_samples=64, temperature=0.7, seed=0, out=None, device="auto", amp="none",
    time_limit=None, reversible=False,
)
DATASET_DEFAULTS = {
    "digits": dict(K=8, L=3, hidden=64, dropout=0.2, logit_alpha=0.002, steps=3000, lr=2e-3,
                   warmup=200, eval_every=100, sample_every=500, log_every=100),
    "cifar10": dict(),
    "folder": dict(),
}


def defaults_for(dataset: Optional[str]) -> dict:
    """DEFAULTS with the dataset's own defaults on top (and `out` = runs/<dataset>)."""
    dataset = dataset or DEFAULTS["dataset"]
    return dict(DEFAULTS, dataset=dataset, out=f"runs/{dataset}", **DATASET_DEFAULTS.get(dataset, {}))


# Settings that define the model, the data or the optimisation: fixed once a run has started.
FIXED_ON_RESUME = (
    "dataset", "image_size", "n_bits", "channels", "test_fraction", "K", "L", "hidden", "coupling",
    "permutation", "actnorm_scale", "learn_top", "conditional", "n_classes", "class_weight",
    "batch_size", "lr", "warmup", "lr_decay", "min_lr_ratio", "weight_decay", "grad_clip",
    "optimizer", "ema", "dropout", "logit_alpha", "seed",
)
# Settings of one invocation, not inherited by --resume.
PER_INVOCATION = ("time_limit",)
OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")
LR_DECAYS = ("none", "cosine")
AMP_MODES = ("none", "bf16")


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why (exit status 2)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable or not a glow_ext training checkpoint."""


class TrainingDiverged(TrainingError):
    """The loss or the gradient norm became NaN/Inf (exit status 3)."""


# --------------------------------------------------------------------------------------------------
# Command-line arguments (every default is None, so that a resumed run can tell what was given)

def add_train_arguments(parser) -> None:
    d = defaults_for("digits")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=gdata.DATASETS, help=f"default {d['dataset']}")
    g.add_argument("--data-dir", help="cifar10: the python batches (or their cifar-10-batches-py "
                   "parent); folder: a folder of images (class subfolders give labels)")
    g.add_argument("--image-size", type=int, help="folder: resize + centre-crop to this (default 32)")
    g.add_argument("--n-bits", type=int, help="cifar10/folder: keep the top n bits (default 8)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="folder: 3 = RGB (default), 1 = grey")
    g.add_argument("--test-fraction", type=float,
                   help="folder without train/ and test/ subfolders: held-out fraction (default 0.1)")
    g = parser.add_argument_group(
        "model", "defaults: the digits model below; cifar10 and folder default to the paper's "
        "CIFAR-10 model (K=32, L=3, hidden 512, no dropout, no logit preprocessing, warm-up 1000, "
        "lr 1e-3, 100000 steps)")
    g.add_argument("--K", type=int, help=f"flow steps per level (default {d['K']})")
    g.add_argument("--L", type=int, help=f"levels (default {d['L']})")
    g.add_argument("--hidden", type=int, help=f"coupling network width (default {d['hidden']})")
    g.add_argument("--coupling", choices=("affine", "additive"), help=f"default {d['coupling']}")
    g.add_argument("--permutation", choices=("invconv_lu", "invconv", "shuffle", "reverse"),
                   help=f"default {d['permutation']}")
    g.add_argument("--actnorm-scale", type=float, help="ActNorm init scale (default 1.0)")
    g.add_argument("--no-learn-top", dest="learn_top", action="store_const", const=False,
                   help="a fixed N(0, I) top prior instead of the learned one")
    g.add_argument("--conditional", action="store_const", const=True,
                   help="class-conditional prior (labels from the dataset)")
    g.add_argument("--n-classes", type=int, help="number of classes for --conditional (default: the "
                   "dataset's); every label must be below it")
    g.add_argument("--class-weight", type=float, help="weight of a class-prediction head's "
                   "cross-entropy (needs --conditional; default 0 = no head)")
    g.add_argument("--logit-alpha", type=float, help="RealNVP's logit preprocessing before the flow, "
                   "x -> logit(a + (1-2a)(x+0.5)), its log-Jacobian counted in the density, so bits/dim "
                   f"stay exact; 0 = off (default {d['logit_alpha']})")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--epochs", type=float, help="train for this many epochs instead of --steps")
    g.add_argument("--batch-size", type=int, help="global batch size, split over torchrun processes "
                   f"(default {d['batch_size']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {d['warmup']})")
    g.add_argument("--lr-decay", choices=LR_DECAYS, help=f"after warm-up (default {d['lr_decay']})")
    g.add_argument("--min-lr-ratio", type=float, help="cosine decay ends at lr x this (default 0)")
    g.add_argument("--weight-decay", type=float, help="on convolution/linear weights (default 0)")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default {d['grad_clip']})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d['optimizer']}")
    g.add_argument("--ema", type=float, help="evaluate, sample and select an exponential moving "
                   "average of the weights with this decay (e.g. 0.999; default 0 = off)")
    g.add_argument("--dropout", type=float, help="dropout rate after the ReLUs of the coupling "
                   f"networks, in training only (default {d['dropout']})")
    g.add_argument("--seed", type=int, help="model init, data order and noise (default 0)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/DATASET)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or from OUT/checkpoint.pt")
    g.add_argument("--force", action="store_true", help="start afresh in a run folder that "
                   "already holds a checkpoint (it is overwritten)")
    g.add_argument("--device", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=AMP_MODES, help="bf16: autocast to bfloat16 (CUDA only)")
    g.add_argument("--reversible", action="store_const", const=True,
                   help="reversible backprop: recompute each flow step's input from its output in "
                   "the backward pass instead of storing activations (memory flat in K, ~4/3 the "
                   "compute, same gradients); kept by --resume")
    g.add_argument("--time-limit", type=float, help="stop cleanly after this many seconds")
    g.add_argument("--eval-every", type=int, help=f"test bpd every N steps (default {d['eval_every']})")
    g.add_argument("--sample-every", type=int, help=f"sample grid every N steps, 0 = only at the end "
                   f"(default {d['sample_every']})")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    g.add_argument("--log-every", type=int, help=f"progress line every N steps (default {d['log_every']})")
    g.add_argument("--eval-batch-size", type=int, help=f"default {d['eval_batch_size']}")
    g.add_argument("--n-samples", type=int, help=f"images per sample grid (default {d['n_samples']})")
    g.add_argument("--temperature", type=float, help=f"sampling temperature (default {d['temperature']})")


def config_from_args(args, base: Optional[dict] = None) -> dict:
    """The dataset's defaults, then `base` (a checkpoint's config), then the arguments given on the
    command line (those fixed once a run has started must match `base`)."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if base:
        config = defaults_for(base.get("dataset"))
        config.update({k: v for k, v in base.items() if k in DEFAULTS and k not in PER_INVOCATION})
        saved = dict(config)
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            raise TrainingError(
                "cannot change " + ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} -> {given[k]!r})"
                                             for k in changed) + " when resuming a run")
    else:
        config = defaults_for(given.get("dataset"))
    config.update(given)
    return config


def validate_config(c: dict) -> None:
    def positive(name, allow_none=False):
        v = c[name]
        if v is None and allow_none:
            return
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {v!r}")

    for name in ("K", "L", "hidden", "batch_size", "lr", "eval_every", "log_every", "eval_batch_size",
                 "n_samples"):
        positive(name)
    for name in ("steps", "epochs", "time_limit", "checkpoint_every", "n_classes"):
        positive(name, allow_none=True)
    for name in ("warmup", "sample_every"):
        if c[name] < 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if not 0 <= c["logit_alpha"] < 0.5:
        raise TrainingError(f"--logit-alpha must be in [0, 0.5), got {c['logit_alpha']}")
    for name in ("weight_decay", "grad_clip", "class_weight", "min_lr_ratio", "temperature"):
        if not c[name] >= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if not 0 <= c["dropout"] < 1:
        raise TrainingError(f"--dropout must be in [0, 1), got {c['dropout']}")
    if not 0 <= c["ema"] < 1:
        raise TrainingError(f"--ema must be in [0, 1), got {c['ema']}")
    if c["optimizer"] not in OPTIMIZERS:
        raise TrainingError(f"unknown optimizer {c['optimizer']!r}; choose from {OPTIMIZERS}")
    if c["lr_decay"] not in LR_DECAYS:
        raise TrainingError(f"unknown --lr-decay {c['lr_decay']!r}; choose from {LR_DECAYS}")
    if c["amp"] not in AMP_MODES:
        raise TrainingError(f"unknown --amp {c['amp']!r}; choose from {AMP_MODES}")
    if c["class_weight"] > 0 and not c["conditional"]:
        raise TrainingError("--class-weight needs --conditional (the class head predicts the label)")
    if c["n_classes"] is not None and not c["conditional"]:
        raise TrainingError("--n-classes is for --conditional training")


# --------------------------------------------------------------------------------------------------
# Devices and processes

@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_arg: str) -> DistContext:
    """Joins the torchrun process group when WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    dist = torch.distributed
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _wants_cuda(device_arg)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _wants_cuda(device_arg: str) -> bool:
    if device_arg == "auto":
        return torch.cuda.is_available()
    return str(device_arg).startswith("cuda")


def resolve_device(device_arg: str, ctx: DistContext = DistContext()) -> torch.device:
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError as e:
        raise TrainingError(f"invalid --device {device_arg!r}: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {device_arg}: CUDA is not available on this machine")
        if ctx.active:
            device = torch.device("cuda", ctx.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise TrainingError(f"--device {device_arg}: only cpu and cuda are supported")
    return device


def autocast_context(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise TrainingError("--amp bf16 needs --device cuda (bfloat16 autocast on the CPU is not "
                            "supported by this trainer)")
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _noise(shape, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(int(seed) % (2**63))
    return torch.rand(shape, generator=generator, device=device)


def step_noise_seed(seed: int, step: int) -> int:
    """Seed of the dequantization noise of (0-based) training step `step`."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2**63)


# --------------------------------------------------------------------------------------------------
# Model, objective, optimizer

def build_model(config: dict, image_shape, n_classes: int = 0) -> nn.Module:
    from ..models import Glow

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
        return torch.optim.Adam(groups, lr=lr)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if config["optimizer"] == "adamax":
        return torch.optim.Adamax(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


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


class EMA:
    """Exponential moving average of the parameters (Polyak averaging), warm-started:
    decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1 - d)

    def reset(self, model: nn.Module) -> None:
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Inside: the model holds the averaged weights."""
        saved = {k: p.detach().clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(saved[k])

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.updates = state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# --------------------------------------------------------------------------------------------------
# Evaluation and samples

@torch.no_grad()
def evaluate_bpd(model: nn.Module, dataset: gdata.LevelsDataset, device: torch.device,
                 batch_size: int = 512, conditional: bool = False, amp: str = "none",
                 ctx: DistContext = DistContext()) -> float:
    """Mean bits/dim over `dataset` with a fixed dequantization noise (the same in every run and
    for any number of processes: batch b uses seed EVAL_NOISE_SEED + b; under torchrun batch b
    runs on rank b % world_size and the sums are all-reduced)."""
    was_training = model.training
    model.eval()
    n_bins = dataset.n_bins
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for b, start in enumerate(range(0, len(dataset), batch_size)):
            if b % ctx.world_size != ctx.rank:
                continue
            idx = torch.arange(start, min(start + batch_size, len(dataset)))
            levels, labels = dataset.batch(idx)
            levels = levels.to(device, non_blocking=True)
            x = gdata.dequantize(levels, n_bins, noise=_noise(levels.shape, EVAL_NOISE_SEED + b, device))
            y = labels.to(device) if conditional else None
            with autocast_context(amp, device):
                bpd = model.bits_per_dim(x, n_bins, y)
            total[0] += bpd.double().sum()
            total[1] += bpd.numel()
    finally:
        model.train(was_training)
    if ctx.active:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_levels(model: nn.Module, n: int, n_bins: int, temperature: float = 0.7, seed: int = 0,
                  labels: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """n samples as integer levels (uint8, N, C, H, W), drawn with a private RNG state (the global
    one is left as it was)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(seed)
            x = model.sample(n, temperature=temperature,
                             y=labels.to(device) if labels is not None else None)
    finally:
        model.train(was_training)
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.5, neginf=-0.5)
    return gdata.to_levels(x, n_bins)


def write_sample_grid(model, path, n, n_bins, temperature=0.7, seed=0, labels=None) -> Path:
    levels = sample_levels(model, n, n_bins, temperature, seed, labels)
    h = levels.shape[-1]
    gdata.save_image_grid(levels, n_bins, path, scale=max(1, 64 // h))
    return Path(path)


def _class_cycle(n: int, n_classes: int) -> torch.Tensor:
    return torch.arange(n) % n_classes


# --------------------------------------------------------------------------------------------------
# Checkpoints

def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader (or a
    run killed mid-write) sees either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by this trainer (checkpoint.pt or best.pt), checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
        detail = next((l for l in lines if "Unpickler error" in l), lines[0])[:300]
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is corrupt, truncated or "
                              f"not a glow_ext checkpoint ({type(e).__name__}: {detail})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a glow_ext training checkpoint (expected format "
                              f"{CHECKPOINT_FORMAT!r})")
    for key in ("config", "model", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {key!r}")
    return state


def model_from_checkpoint(state: dict, device="cpu", image_shape=None, n_classes=None):
    """(model in eval mode, config) from a checkpoint's state."""
    config = defaults_for(state["config"].get("dataset"))
    config.update(state["config"])
    shape = image_shape or tuple(state.get("image_shape") or ())
    if not shape:
        raise CheckpointError("checkpoint lacks the image shape")
    model = build_model(config, shape, n_classes if n_classes is not None else state.get("n_classes", 0))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model: {e}") from e
    return model.to(device).eval(), config


# --------------------------------------------------------------------------------------------------
# The training loop

def _log(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def total_steps(config: dict, n_train: int) -> int:
    if config["epochs"] is not None:
        return max(1, int(round(config["epochs"] * gdata.steps_per_epoch(n_train, config["batch_size"]))))
    return int(config["steps"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop what a killed run logged after its last checkpoint."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a line torn by the kill
    _atomic_write_text(path, "".join(k + "\n" for k in kept))


def train(config: dict, resume: Optional[str] = None, force: bool = False) -> dict:
    """Runs (or resumes) training; returns the summary dict (also written to OUT/summary.json on
    rank 0). Raises TrainingError / CheckpointError / TrainingDiverged / DataError."""
    checkpoint = None
    config = dict(config)
    if not config.get("out"):
        config["out"] = f"runs/{config['dataset']}"
    out = Path(config["out"])
    if resume:
        path = out / "checkpoint.pt" if resume == "auto" else Path(resume)
        checkpoint = load_checkpoint(path)
        saved = dict(defaults_for(checkpoint["config"].get("dataset")), **checkpoint["config"])
        fixed = {k: saved.get(k) for k in FIXED_ON_RESUME}
        changed = {k: (fixed[k], config[k]) for k in FIXED_ON_RESUME if config.get(k) != fixed[k]}
        if changed:
            raise TrainingError("the configuration differs from the checkpoint's in " + ", ".join(
                f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items()))
    validate_config(config)
    ctx = setup_distributed(config["device"])
    try:
        summary = _train(config, checkpoint, ctx, out, force)
        if ctx.active:
            # Every rank waits for rank 0's last writes: a gloo group torn down while a peer is
            # still working aborts the process ("terminate called without an active exception").
            torch.distributed.barrier()
        return summary
    finally:
        if ctx.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config, checkpoint, ctx: DistContext, out: Path, force: bool) -> dict:
    device = resolve_device(config["device"], ctx)
    autocast_context(config["amp"], device)  # refuses bf16 on the CPU before any work
    if checkpoint is None and (out / "checkpoint.pt").exists() and not force:
        raise TrainingError(f"{str(out)!r} already holds a run (checkpoint.pt): pass --resume to "
                            f"continue it, --force to start afresh, or another --out")

    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] % (2**32))
    random.seed(config["seed"])

    splits = gdata.load_splits(config["dataset"], config["data_dir"], config["image_size"],
                               config["n_bits"], config["channels"], config["test_fraction"])
    train_set, test_set = splits.train, splits.test
    n_bins, image_shape = splits.n_bins, splits.image_shape
    n_classes = 0
    if config["conditional"]:
        if train_set.labels is None:
            raise TrainingError(f"--conditional needs labels, but {train_set.name} has none (a folder "
                                f"dataset takes labels from class subfolders)")
        n_classes = config["n_classes"] or train_set.n_classes
        for split in (train_set, test_set):
            if split.labels is not None and len(split) and int(split.labels.max()) >= n_classes:
                raise TrainingError(f"labels of {split.name} go up to {int(split.labels.max())}, out of "
                                    f"range for --n-classes {n_classes} (labels must be in 0..{n_classes - 1})")
    batch_size = config["batch_size"]
    if batch_size % ctx.world_size:
        raise TrainingError(f"--batch-size {batch_size} is not divisible by the {ctx.world_size} processes")
    part = gdata.rank_slice(batch_size, ctx.rank, ctx.world_size)
    n_train = len(train_set)
    spe = gdata.steps_per_epoch(n_train, batch_size)
    steps_total = total_steps(config, n_train)

    model = build_model(config, image_shape, n_classes).to(device)
    add_coupling_dropout(model, config["dropout"])
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_total))
    ema = EMA(model, config["ema"]) if config["ema"] > 0 else None
    step = 0
    best = {"bpd": math.inf, "step": None}
    history = {"last_eval_step": None, "last_test_bpd": None}

    if checkpoint is not None:
        if checkpoint.get("kind") != "last" or "optimizer" not in checkpoint:
            raise CheckpointError("this checkpoint holds only model weights (best.pt); resume from "
                                  "the run's checkpoint.pt")
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if ema is not None:
                ema.load_state_dict(checkpoint["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"the checkpoint does not fit this run's model/optimizer: {e}") from e
        step = int(checkpoint["step"])
        best = dict(checkpoint.get("best", best))
        history["last_test_bpd"] = checkpoint.get("last_test_bpd")
        _set_rng_state(checkpoint["rng"])
        # Settings that may change on resume (e.g. more --steps) take effect from here on.
        scheduler.lr_lambdas[0] = lr_lambda(config, steps_total)

    objective = Objective(model, n_bins, config["class_weight"])
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)

    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        if checkpoint is None:
            for name in ("metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json"):
                if (out / name).exists():
                    (out / name).unlink()
        else:
            _truncate_metrics(metrics_path, step)
        _atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    metrics_file = open(metrics_path, "a") if ctx.is_main else None

    def write_metrics(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def checkpoint_state(kind: str) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "kind": kind, "config": config, "step": step,
                 "image_shape": list(image_shape), "n_bins": n_bins, "n_classes": n_classes,
                 "best": best, "last_test_bpd": history["last_test_bpd"],
                 "world_size": ctx.world_size, "torch_version": str(torch.__version__)}
        if kind == "best":
            state["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), rng=_rng_state(),
                         ema=ema.state_dict() if ema is not None else None)
        return state

    def save_checkpoint() -> None:
        if ctx.is_main:
            atomic_save(checkpoint_state("last"), out / "checkpoint.pt")

    def averaged():
        return ema.swapped(model) if ema is not None and ema.updates > 0 else contextlib.nullcontext()

    def run_eval() -> float:
        with averaged():
            bpd = evaluate_bpd(model, test_set, device, config["eval_batch_size"], config["conditional"],
                               config["amp"], ctx)
            improved = bpd < best["bpd"]
            if improved:
                best.update(bpd=bpd, step=step)
                if ctx.is_main:
                    atomic_save(checkpoint_state("best"), out / "best.pt")
        history.update(last_eval_step=step, last_test_bpd=bpd)
        write_metrics({"split": "test", "step": step, "epoch": step / spe, "bpd": bpd,
                       "best_bpd": best["bpd"], "best_step": best["step"],
                       "elapsed_s": time.perf_counter() - t_start})
        _log(ctx, f"  test bpd {bpd:.4f} at step {step}" + ("  (best)" if improved else
                                                              f"  (best {best['bpd']:.4f} at step {best['step']})"))
        return bpd

    def run_samples() -> None:
        if not ctx.is_main:
            return
        labels = _class_cycle(config["n_samples"], n_classes) if n_classes else None
        with averaged():
            write_sample_grid(model, out / "samples" / f"step_{step:07d}.png", config["n_samples"],
                              n_bins, config["temperature"], seed=config["seed"], labels=labels)

    ckpt_every = config["checkpoint_every"] or config["eval_every"]
    time_limit = config["time_limit"]
    _log(ctx, f"glow_ext train: {train_set.name} ({n_train} train, {len(test_set)} test, "
              f"{'x'.join(map(str, image_shape))}, {n_bins} levels) on {device}"
              f"{f' x {ctx.world_size} processes' if ctx.active else ''}; Glow K={config['K']} "
              f"L={config['L']} hidden={config['hidden']} {config['coupling']} {config['permutation']}"
              f"{' conditional' if n_classes else ''}{' reversible' if config['reversible'] else ''}: "
              f"{n_params:,} parameters; steps {step} -> "
              f"{steps_total} ({spe} per epoch), batch {batch_size}, {config['optimizer']} lr {config['lr']}")

    t_start = time.perf_counter()
    t_log, step_log, loss_sum, bpd_sum, n_sum = t_start, step, 0.0, 0.0, 0
    stop_reason = "steps"
    model.train()
    try:
        while step < steps_total:
            idx = gdata.global_batch_indices(n_train, batch_size, config["seed"], step)
            levels, labels = train_set.batch(idx[part])
            levels = levels.to(device, non_blocking=True)
            noise = _noise((batch_size,) + tuple(image_shape), step_noise_seed(config["seed"], step),
                           device)[part]
            x = gdata.dequantize(levels, n_bins, noise=noise)
            y = labels.to(device, non_blocking=True) if n_classes else None

            optimizer.zero_grad(set_to_none=True)
            with autocast_context(config["amp"], device):
                loss, bpd = objective(x, y)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, config["grad_clip"] if config["grad_clip"] > 0 else math.inf)
            over_time = time_limit is not None and time.perf_counter() - t_start >= time_limit
            stats = torch.stack([loss.detach().double(), bpd.double(),
                                 torch.tensor(float(over_time and ctx.is_main), dtype=torch.float64,
                                              device=loss.device)])
            if ctx.active:
                torch.distributed.all_reduce(stats)
                stats[:2] /= ctx.world_size
            loss_value, bpd_value, stop_flag = stats.tolist()
            grad_norm = float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                last = out / "checkpoint.pt"
                kept = (f"the last good checkpoint, {str(last)!r}, was kept unchanged"
                        if last.exists() else "no checkpoint had been written yet")
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss {loss_value}, gradient norm "
                    f"{grad_norm}; the update was not applied and {kept}. Lower --lr, lengthen "
                    f"--warmup or set --grad-clip.")
            optimizer.step()
            scheduler.step()
            step += 1
            if ema is not None:
                if ema.updates == 0:
                    ema.reset(model)  # after ActNorm's data-dependent init
                ema.update(model)

            loss_sum += loss_value
            bpd_sum += bpd_value
            n_sum += 1
            if step % config["log_every"] == 0 or step == steps_total or step == 1:
                now = time.perf_counter()
                its = (step - step_log) / max(now - t_log, 1e-9)
                record = {"split": "train", "step": step, "epoch": step / spe, "loss": loss_value,
                          "bpd": bpd_value, "loss_avg": loss_sum / n_sum, "bpd_avg": bpd_sum / n_sum,
                          "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                          "it_per_s": its, "img_per_s": its * batch_size, "elapsed_s": now - t_start}
                write_metrics(record)
                _log(ctx, f"step {step}/{steps_total} ep {step / spe:.1f} loss {loss_sum / n_sum:.4f} "
                          f"bpd {bpd_sum / n_sum:.4f} lr {record['lr']:.2e} |g| {grad_norm:.2f} "
                          f"{its:.1f} it/s {its * batch_size:.0f} img/s")
                t_log, step_log, loss_sum, bpd_sum, n_sum = now, step, 0.0, 0.0, 0
            if step % config["eval_every"] == 0:
                run_eval()
            if config["sample_every"] and step % config["sample_every"] == 0:
                run_samples()
            if stop_flag > 0:
                stop_reason = "time_limit"
                _log(ctx, f"time limit of {time_limit:g} s reached at step {step}: stopping")
                break
            if step % ckpt_every == 0:
                save_checkpoint()
        if history["last_eval_step"] != step and step > 0:
            run_eval()
        if not (config["sample_every"] and step % config["sample_every"] == 0) and step > 0:
            run_samples()
        save_checkpoint()
    finally:
        if metrics_file is not None:
            metrics_file.close()

    wall = time.perf_counter() - t_start
    summary = {"step": step, "steps_total": steps_total, "stopped_by": stop_reason,
               "best_test_bpd": best["bpd"], "best_step": best["step"],
               "final_test_bpd": history["last_test_bpd"], "wall_s": wall,
               "n_params": n_params, "world_size": ctx.world_size, "device": str(device),
               "out": str(out)}
    if ctx.is_main:
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _log(ctx, f"done: {step} steps in {wall:.1f} s; best test bpd {best['bpd']:.4f} at step "
              f"{best['step']}, final {history['last_test_bpd']}; run folder {str(out)!r}")
    return summary


def run_from_args(args) -> int:
    """`glow-ext train`: the exit status (0 done, 2 a clear error, 3 diverged)."""
    try:
        base = None
        if args.resume:
            out = Path(args.out or defaults_for(args.dataset)["out"])
            path = out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
            base = load_checkpoint(path)["config"]
            if args.out is None and args.resume != "auto":
                args.out = base.get("out")
        config = config_from_args(args, base)
        train(config, resume=args.resume, force=args.force)
        return 0
    except TrainingDiverged as e:
        print(f"glow-ext train: {e}", file=sys.stderr)
        return 3
    except (TrainingError, gdata.DataError) as e:
        print(f"glow-ext train: error: {e}", file=sys.stderr)
        return 2
