"""What a training run raises, and the exit statuses the commands turn them into."""

EXIT_ERROR = 2  # TrainingError (CheckpointError, RunFileError): a clear error, nothing to retry as is
EXIT_DIVERGED = 3  # TrainingDiverged
# TrainingInterrupted: stopped by SIGTERM/SIGINT after writing a checkpoint; resuming continues the
# run (sysexits.h's EX_TEMPFAIL, "temporary failure, retry later": what a scheduler should requeue).
EXIT_INTERRUPTED = 75


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why (exit status 2)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable or not a glow_ext training checkpoint."""


class RunFileError(TrainingError):
    """A file of the run could not be written (disk full, I/O error); the message names the file
    and the errno, and the files written before are unchanged."""


class TrainingDiverged(TrainingError):
    """The loss or the gradient norm became NaN/Inf (exit status 3)."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run at `step`, after it wrote its checkpoint; the message ends
    with the command that resumes it (exit status EXIT_INTERRUPTED)."""

    def __init__(self, message: str, step: int, resume_command: str):
        super().__init__(message)
        self.step = step
        self.resume_command = resume_command
