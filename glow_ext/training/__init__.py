"""The training application of glow_ext (`glow-ext train`, `sample`, `evaluate`, `ablate`), kept
out of the library: `import glow_ext` does not import it.

  config       defaults (global and per dataset), the train arguments, validation
  data         digits, CIFAR-10 and image folders as integer levels; batching, dequantization
  distributed  torchrun's process group, the device, mixed precision, rank-0 logging
  objective    the model of a configuration, the loss, optimizer, schedule, EMA, step noise
  evaluation   test bits/dim and sample grids
  checkpoint   atomic checkpoint writes, checked loads, RNG states, metrics.jsonl
  preemption   stopping cleanly on SIGTERM/SIGINT
  loop         train(): set-up, resume, steps, evaluation, checkpoints, summary
  commands     the train, sample and evaluate commands; ablation the ablate command
  errors       TrainingError and its kinds, and the exit statuses of the commands
"""
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, model_from_checkpoint
from .config import DATASET_DEFAULTS, DEFAULTS, defaults_for
from .errors import (EXIT_INTERRUPTED, CheckpointError, RunFileError, TrainingDiverged, TrainingError,
                     TrainingInterrupted)
from .evaluation import evaluate_bpd, sample_levels, write_sample_grid
from .loop import train
from .objective import Objective, add_coupling_dropout, build_model

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "DATASET_DEFAULTS", "DEFAULTS", "EXIT_INTERRUPTED",
           "Objective", "RunFileError", "TrainingDiverged", "TrainingError", "TrainingInterrupted",
           "add_coupling_dropout", "atomic_save", "build_model", "defaults_for", "evaluate_bpd",
           "load_checkpoint", "model_from_checkpoint", "sample_levels", "train", "write_sample_grid"]
