"""Evaluation and samples: test bits/dim with a fixed dequantization noise, sample grids."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import data as gdata
from .distributed import DistContext, autocast_context
from .objective import noise

EVAL_NOISE_SEED = 0x5EED_0E7A1  # the test set's dequantization noise: the same for every run


@torch.no_grad()
def evaluate_bpd(model: nn.Module, dataset: gdata.LevelsDataset, device: torch.device,
                 batch_size: int = 512, conditional: bool = False, amp: str = "none",
                 ctx: DistContext = DistContext(),
                 stop: Optional[Callable[[], bool]] = None) -> Optional[float]:
    """Mean bits/dim over `dataset` with a fixed dequantization noise (the same in every run and
    for any number of processes: batch b uses seed EVAL_NOISE_SEED + b; under torchrun batch b
    runs on rank b % world_size and the sums are all-reduced), the networks under the autocast mode
    `amp` (the trainer's test bpd always uses "none": best.pt is chosen in full precision).

    stop: asked after every round of batches (one per process); when it says so (on any process:
    under torchrun the answers are all-reduced, so all processes agree) the evaluation is abandoned
    and None returned."""
    was_training = model.training
    model.eval()
    n_bins = dataset.n_bins
    n_batches = -(-len(dataset) // batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for first in range(0, n_batches, ctx.world_size):
            b = first + ctx.rank
            if b < n_batches:
                idx = torch.arange(b * batch_size, min((b + 1) * batch_size, len(dataset)))
                levels, labels = dataset.batch(idx)
                levels = levels.to(device, non_blocking=True)
                x = gdata.dequantize(levels, n_bins,
                                     noise=noise(levels.shape, EVAL_NOISE_SEED + b, device))
                y = labels.to(device) if conditional else None
                with autocast_context(amp, device):
                    bpd = model.bits_per_dim(x, n_bins, y)
                total[0] += bpd.double().sum()
                total[1] += bpd.numel()
            if stop is not None and _any_process(stop(), ctx, device):
                return None
    finally:
        model.train(was_training)
    if ctx.active:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def _any_process(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Whether `flag` is set on any process (a collective under torchrun: every process calls it)."""
    if not ctx.active:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(flags)
    return flags.item() > 0


@torch.no_grad()
def sample_levels(model: nn.Module, n: int, n_bins: int, temperature: float = 0.7, seed: int = 0,
                  labels: Optional[torch.Tensor] = None, device=None, amp: str = "none") -> torch.Tensor:
    """n samples as integer levels (uint8, N, C, H, W), drawn with a private RNG state (the global
    one is left as it was); amp: the coupling and prior networks under that autocast mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(seed)
            with autocast_context(amp, device):
                x = model.sample(n, temperature=temperature,
                                 y=labels.to(device) if labels is not None else None)
    finally:
        model.train(was_training)
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.5, neginf=-0.5)
    return gdata.to_levels(x, n_bins)


def write_sample_grid(model, path, n, n_bins, temperature=0.7, seed=0, labels=None,
                      amp: str = "none") -> Path:
    levels = sample_levels(model, n, n_bins, temperature, seed, labels, amp=amp)
    h = levels.shape[-1]
    gdata.save_image_grid(levels, n_bins, path, scale=max(1, 64 // h))
    return Path(path)


def class_cycle(n: int, n_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., n_classes - 1, 0, 1, ... for n samples."""
    return torch.arange(n) % n_classes
