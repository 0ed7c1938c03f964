"""Atomic checkpoint files: write a temporary file, fsync, then ``os.replace`` onto the target."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fxq.errors import CheckpointError
from fxq.io import deferred_interrupt

FORMAT = "fxq.train/1"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (tensors and plain types) to ``path`` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with deferred_interrupt():  # Ctrl-C takes effect once the new checkpoint is in place
        try:
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, **payload}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk leaves the previous checkpoint and no temp file
            tmp.unlink(missing_ok=True)
            raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train without resume first or pass the right path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is damaged or not a "
            "fxq training checkpoint: delete it and restart, or resume from another file"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a fxq training checkpoint (format {FORMAT}); resume only from files fxq.train wrote"
        )
    return payload
