"""Where a run computes: torchrun's process group, the device, mixed precision (autocast and the
float16 loss scaler), and rank-0 logging."""
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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    """Refuses a mixed-precision mode the device cannot run, before any work."""
    if amp == "none":
        return
    if amp not in AUTOCAST_DTYPES:
        raise TrainingError(f"unknown --amp {amp!r}; choose from none, {', '.join(AUTOCAST_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs --device cuda: float16's range needs a loss scaler and "
                            "the CPU has no fast float16 convolutions; on the CPU use --amp bf16")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                            "support; use --amp fp16")


def autocast_context(amp: str, device: torch.device):
    """torch.autocast for --amp bf16 / fp16: the coupling and prior networks' convolutions run in
    reduced precision; the flow itself stays in its parameters' dtype (see docs/mixed-precision.md)."""
    check_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[amp])


def grad_scaler(amp: str, device: torch.device):
    """The loss scaler float16 gradients need (their 5-bit exponent underflows without it); None for
    float32 and bfloat16, whose exponent is float32's."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def log(ctx: DistContext, message: str) -> None:
    """Prints on rank 0 only (stderr, flushed)."""
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)
