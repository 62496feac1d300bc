"""Where a run computes: torchrun's process group, the device, bf16 autocast, and rank-0 logging."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from .errors import TrainingError


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


def log(ctx: DistContext, message: str) -> None:
    """Prints on rank 0 only (stderr, flushed)."""
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)
