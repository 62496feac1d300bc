"""The files of a run: checkpoints (atomic writes, checked loads, RNG states), the model of a
checkpoint, and metrics.jsonl's truncation on resume."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import defaults_for
from .errors import CheckpointError
from .objective import build_model

# The format tag of every checkpoint this trainer writes (a name, not a module path: it predates
# glow_ext.training and stays so that older checkpoints load).
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


def atomic_write_text(path, text: str) -> None:
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


def truncate_metrics(path: Path, step: int) -> None:
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
    atomic_write_text(path, "".join(k + "\n" for k in kept))
