"""The weights fxq ships: tiny models trained by the project (``fxq/weights/<name>.pt``, float16 state_dicts
to stay small; they load into float32 models) with ``<name>.json`` recording the command that made them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def embedded_weights(name: str) -> Path | None:
    """Path of the embedded weights of model ``name``, or None when fxq ships none."""
    path = Path(str(resources.files("fxq") / "weights" / f"{name}.pt"))
    return path if path.is_file() else None
