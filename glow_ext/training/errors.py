"""What a training run raises. The commands turn them into exit statuses: 2 for TrainingError
(and CheckpointError), 3 for TrainingDiverged."""


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why (exit status 2)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable or not a glow_ext training checkpoint."""


class TrainingDiverged(TrainingError):
    """The loss or the gradient norm became NaN/Inf (exit status 3)."""
