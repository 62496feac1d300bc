"""Stopping a run early on SIGTERM (what SLURM, Kubernetes and spot instances send before they kill
a job) or SIGINT (Ctrl-C): the signal only sets a flag; the trainer finishes the step in progress,
or abandons an evaluation between two batches, writes its checkpoint at the step reached and raises
TrainingInterrupted (exit status EXIT_INTERRUPTED). Under torchrun the flag travels with each
step's all-reduced statistics, so every process stops after the same step."""
from __future__ import annotations

import shlex
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While active (a context manager), the first SIGTERM or SIGINT sets `signum` and puts the
    previous handlers back, so that a second signal acts as it would have without the trainer
    (e.g. a second Ctrl-C ends the process at once). Handlers can only be installed from the main
    thread; elsewhere the request is never set."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        if self.signum is None:
            return "a stop signal received by another process"
        return signal.Signals(self.signum).name


def resume_command(out, world_size: int) -> str:
    """The command line that continues the run in `out` (torchrun with as many processes per node
    as the run had, when it had more than one)."""
    command = f"glow-ext train --resume --out {shlex.quote(str(out))}"
    if world_size > 1:
        command = (f"torchrun --nproc_per_node {world_size} -m glow_ext train --resume --out "
                   f"{shlex.quote(str(out))}")
    return command
