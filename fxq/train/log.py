"""JSON-lines training log (one record per logged step), trimmed to the resumed step on resume."""

from __future__ import annotations

import json
from pathlib import Path


class JsonlLog:
    """Appends records to ``path``; ``resume_step`` drops records of steps after it (a crashed tail)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append one record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:
        return float("inf")
