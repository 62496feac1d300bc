"""The files of a run: checkpoints (atomic writes, checked loads, RNG states), the model of a
checkpoint, metrics.jsonl (appended a whole line at a time, truncated to the checkpoint's step on
resume). A write that fails (disk full, I/O error) raises RunFileError naming the file and the
errno, and leaves the files written before (checkpoint.pt, best.pt, the metrics lines) intact."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import defaults_for
from .errors import CheckpointError, RunFileError
from .objective import build_model

# The format tag of every checkpoint this trainer writes: a name, not a module path, so that moving
# the trainer's modules never changes it and every checkpoint written with it keeps loading.
CHECKPOINT_FORMAT = "glow_ext.train/1"


def rng_state() -> dict:
    """The torch, numpy, python and CUDA RNG states, in a form torch.load(weights_only=True) reads."""
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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_error(path, error: OSError) -> RunFileError:
    """A RunFileError naming the file and the errno, e.g. "... [Errno 28] No space left on device
    (ENOSPC) ...", for a failed write of `path`."""
    code = errno.errorcode.get(error.errno, "?") if error.errno else "?"
    return RunFileError(f"cannot write {str(path)!r}: [Errno {error.errno}] "
                        f"{error.strerror or error} ({code}); the file as it was before is unchanged")


def _os_error_in(error: BaseException):
    """The OSError behind `error` (torch.save reports a failed write of its file object as a
    RuntimeError whose context is the OSError), or None."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _atomic_write(path, write) -> None:
    """write(file) into a temporary file in the same folder, fsync, os.replace, fsync the folder:
    a reader (or a run killed mid-write) sees either the old file or the new one, never a torn one.
    A failed write (disk full, I/O error) leaves the old file as it was, removes the temporary one
    and raises RunFileError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise write_error(path, cause) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Makes the rename durable on power loss (POSIX). The new file is in place by then, so a
    folder that cannot be opened or synced (some file systems refuse) is not an error."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path) -> None:
    """torch.save(obj) to `path`, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """metrics.jsonl, one JSON record per line, appended so that the file never ends in a torn
    line: each record is a single os.write of the whole line on an unbuffered descriptor (so it is
    flushed when write returns), and a write that fails or comes up short is cut off again
    (ftruncate to the length before it) before RunFileError is raised. Should even that fail,
    truncate_metrics drops the torn line on --resume."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from e

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(line)} bytes")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise write_error(self.path, e) from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop what a killed run logged after its last checkpoint."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill or a failed write
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
