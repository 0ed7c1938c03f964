"""Shared pieces of the benchmark scripts: the synthetic data set they use and result writing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fxq.backends.runtime_session import open_session
from fxq.data import CocoDetection, collate, eval_transforms, write_synthetic
from fxq.io import write_json

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "runs" / "synth"
#: The synthetic set the tiny models were trained on (fxq/weights/*.json record the same command).
SYNTH_ARGS = {"seed": 0, "train": 4000, "val": 500, "size": 160}


def synthetic_root() -> Path:
    """runs/synth, written deterministically (`fxq data synth --seed 0 --train 4000 --val 500`) if missing."""
    if not (SYNTH / "annotations" / "instances_val.json").is_file():
        write_synthetic(SYNTH, **SYNTH_ARGS)
    return SYNTH


def loader(split: str, images: int, size: int = 160, batch_size: int = 16, root: Path | None = None) -> DataLoader:
    """The first ``images`` images of a split of ``root`` (default: the synthetic set), resized to ``size``, in
    batches."""
    ds = CocoDetection.from_folder(root or synthetic_root(), split, transforms=eval_transforms(size))
    return DataLoader(Subset(ds, range(min(images, len(ds)))), batch_size=batch_size, collate_fn=collate)


def save(path: Path, rows: list[dict], table: str, command: str) -> None:
    """Write the JSON results and print the markdown table with the command that made it."""
    write_json(path, {"command": command, "torch": torch.__version__, "rows": rows})
    print(f"\n`{command}`\n\n{table}")
    print(f"\nwrote {path}")


def markdown(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` over ``columns`` (floats with 3 decimals)."""
    fmt = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        fmt.append(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return "\n".join(f"| {line} |" for line in fmt)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


class SessionDetector(nn.Module):
    """An ONNX / OpenVINO IR detector run by its runtime behind a module's call, for
    :func:`fxq.evaluation.evaluate_model` (one thread)."""

    takes_mask = False

    def __init__(self, path: Path, provider: str, head: str) -> None:
        super().__init__()
        self.session, self.head = open_session(path, provider, threads=1), head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.session.run(images)
