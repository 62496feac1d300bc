"""The train, sample and evaluate commands (registered in glow_ext.__main__.COMMANDS; ablate is
glow_ext.training.ablation). Each module is imported when its command runs.

Exit statuses (glow_ext.training.errors): 0 done, 2 a clear error (bad arguments, missing data,
unreadable checkpoint, a failed write), 3 training diverged (NaN/Inf loss), 75 stopped by SIGTERM
or SIGINT after writing a checkpoint (resume to continue).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def report_error(command: str, e: Exception) -> int:
    """Prints `glow-ext COMMAND: error: ...` and returns exit status 2."""
    from .errors import EXIT_ERROR

    print(f"glow-ext {command}: error: {e}", file=sys.stderr)
    return EXIT_ERROR


# --------------------------------------------------------------------------------------------------
# train

def train_arguments(parser):
    from .config import add_train_arguments

    add_train_arguments(parser)


def train_run(args) -> int:
    """`glow-ext train`: the exit status (0 done, 2 a clear error, 3 diverged, 75 interrupted)."""
    from .checkpoint import load_checkpoint
    from .config import config_from_args, defaults_for
    from .data import DataError
    from .errors import (EXIT_DIVERGED, EXIT_ERROR, EXIT_INTERRUPTED, TrainingDiverged, TrainingError,
                         TrainingInterrupted)
    from .loop import train

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
    except TrainingInterrupted:
        return EXIT_INTERRUPTED  # the trainer printed how to resume
    except TrainingDiverged as e:
        print(f"glow-ext train: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (TrainingError, DataError) as e:
        print(f"glow-ext train: error: {e}", file=sys.stderr)
        return EXIT_ERROR


# --------------------------------------------------------------------------------------------------
# sample

def sample_arguments(parser):
    from .config import AMP_MODES

    parser.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt of a run")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="prior std scale (default 0.7)")
    parser.add_argument("--label", type=int, help="class of every sample (class-conditional models; "
                        "default: cycle through the classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", choices=AMP_MODES, default=None,
                        help="the coupling and prior networks under autocast (default: the run's --amp)")
    parser.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")


def sample_checkpoint(checkpoint, n=64, temperature=0.7, label=None, seed=0, device="auto",
                      out="samples.png", amp=None) -> Path:
    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .distributed import check_amp, resolve_device
    from .errors import TrainingError
    from .evaluation import class_cycle, write_sample_grid

    if n < 1:
        raise TrainingError(f"--n must be positive, got {n}")
    if temperature < 0:
        raise TrainingError(f"--temperature must be >= 0, got {temperature}")
    device = resolve_device(device)
    state = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state, device)
    amp = config.get("amp", "none") if amp is None else amp
    check_amp(amp, device)
    n_classes = model.n_classes or 0
    if label is not None:
        if not n_classes:
            raise TrainingError("--label needs a class-conditional model; this checkpoint's "
                                "model is unconditional")
        if not 0 <= label < n_classes:
            raise TrainingError(f"--label {label} is out of range: the model has {n_classes} "
                                f"classes (0..{n_classes - 1})")
        labels = torch.full((n,), label, dtype=torch.int64)
    else:
        labels = class_cycle(n, n_classes) if n_classes else None
    return write_sample_grid(model, out, n, int(state["n_bins"]), temperature, seed, labels, amp)


def sample_run(args):
    from .data import DataError
    from .errors import TrainingError

    try:
        path = sample_checkpoint(args.checkpoint, args.n, args.temperature, args.label, args.seed,
                                 args.device, args.out, args.amp)
    except (TrainingError, DataError) as e:
        return report_error("sample", e)
    print(path)
    return 0


# --------------------------------------------------------------------------------------------------
# evaluate

def evaluate_arguments(parser):
    from .config import AMP_MODES

    parser.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt of a run")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--data-dir", help="where the data is now (default: the run's --data-dir)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", choices=AMP_MODES, default="none",
                        help="also report the bpd with the networks under this autocast mode (the "
                        "bpd reported first is always computed in float32)")


def evaluate_checkpoint(checkpoint, split="test", data_dir=None, batch_size=512, device="auto",
                        amp="none") -> dict:
    """Bits/dim of a checkpoint's model on its dataset's split (the trainer's fixed noise)."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .data import load_splits
    from .distributed import check_amp, resolve_device
    from .errors import TrainingError
    from .evaluation import evaluate_bpd

    device = resolve_device(device)
    check_amp(amp, device)
    state = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state, device)
    splits = load_splits(config["dataset"], data_dir or config["data_dir"], config["image_size"],
                         config["n_bits"], config["channels"], config["test_fraction"],
                         trust_data_files=config.get("trust_data_files", False))
    dataset = splits.test if split == "test" else splits.train
    if tuple(dataset.image_shape) != tuple(state["image_shape"]):
        raise TrainingError(f"the data has shape {dataset.image_shape}, the model "
                            f"{tuple(state['image_shape'])}")
    bpd = evaluate_bpd(model, dataset, device, batch_size, bool(model.n_classes))
    result = {"bpd": bpd, "split": split, "n_images": len(dataset), "dataset": config["dataset"],
              "step": int(state["step"]), "checkpoint": str(checkpoint)}
    if amp != "none":
        result.update(amp=amp, bpd_amp=evaluate_bpd(model, dataset, device, batch_size,
                                                     bool(model.n_classes), amp))
    return result


def evaluate_run(args):
    from .data import DataError
    from .errors import TrainingError

    try:
        result = evaluate_checkpoint(args.checkpoint, args.split, args.data_dir, args.batch_size,
                                     args.device, args.amp)
    except (TrainingError, DataError) as e:
        return report_error("evaluate", e)
    under_amp = f", {result['bpd_amp']:.4f} under --amp {result['amp']}" if "amp" in result else ""
    print(f"{result['split']} bpd {result['bpd']:.4f}{under_amp} ({result['n_images']} images, step "
          f"{result['step']})", file=sys.stderr)
    print(json.dumps(result))
    return 0
