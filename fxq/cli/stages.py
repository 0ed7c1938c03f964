"""The stages of a run folder and which of them are done for the current options, so a rerun skips them.

A stage is done when ``stages.json`` records it under the key the current options give and its artifacts are
all in the folder. The key is a SHA-256 over the stage's own options, the contents of the input files those
options name, and the keys of the stages it reads, so changing an option reruns exactly the stages downstream
of it. Before any stage runs, every stage that is not done loses its record and its artifacts (the folder never
mixes a stage's old files with new upstream ones); each stage's record is written, atomically, only after all
its artifacts are. An interruption therefore leaves the stages before it done and the rest absent, and the
next run with the same options continues from the interrupted stage (a stage that trains keeps its checkpoints
for that: :attr:`Stage.resumable`).

``stages.json``: ``{"format": "fxq.stages", "version": 1, "stages": {name: {"key", "run_id", "seconds",
"artifacts"}}}``; ``run_id`` is the run that produced the stage (every JSON artifact carries the same); a
resumable stage that started but did not finish has its key alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxq.errors import InputError
from fxq.io import write_json

STAGES_FILE = "stages.json"
FORMAT, VERSION = "fxq.stages", 1


@dataclass(frozen=True)
class Stage:
    """A stage: the options it reads (recipe keys), those of them naming input files or folders whose contents
    count, the stages it reads, the artifacts it writes (files or folders of the run folder), and those of its
    artifacts an interrupted attempt leaves for the next attempt with the same key to continue from (a
    training run's checkpoints)."""

    name: str
    options: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    resumable: tuple[str, ...] = ()


class StageBook:
    """The done/not-done state of ``stages`` (in run order) in run folder ``out`` for ``recipe``."""

    def __init__(self, out: Path, stages: Iterable[Stage], recipe: Mapping[str, Any]) -> None:
        self.out, self.stages = out, {s.name: s for s in stages}
        self.keys: dict[str, str] = {}
        for stage in self.stages.values():
            self.keys[stage.name] = _key(stage, recipe, self.keys)
        self.records = _read(out)

    def done(self, name: str) -> bool:
        """Whether stage ``name`` is recorded under its current key with every artifact present."""
        record = self.records.get(name)
        return (record is not None and record.get("key") == self.keys[name] and "run_id" in record
                and all((self.out / a).exists() for a in self.stages[name].artifacts))

    def prepare(self, rerun: Iterable[str] = ()) -> list[str]:
        """Forget every stage that is not done (and those in ``rerun``): its record and artifacts go, as do
        records of stages no longer in the run; the stages that will run, in order."""
        todo = [name for name in self.stages if name in set(rerun) or not self.done(name)]
        for name in todo:
            record, stage = self.records.pop(name, None), self.stages[name]
            interrupted = record is not None and record.get("key") == self.keys[name] and "run_id" not in record
            kept = stage.resumable if interrupted and name not in set(rerun) else ()
            if kept:
                self.records[name] = record
            for artifact in stage.artifacts:
                if artifact not in kept:
                    _remove(self.out / artifact)
        for name in [n for n in self.records if n not in self.stages]:
            del self.records[name]
        self._write()
        return todo

    def start(self, name: str) -> None:
        """Record that stage ``name`` has started under its key (so its resumable artifacts outlive an
        interruption)."""
        if self.stages[name].resumable:
            self.records[name] = {"key": self.keys[name]}
            self._write()

    def finish(self, name: str, run_id: str, seconds: float) -> None:
        """Record stage ``name`` as done by run ``run_id``."""
        self.records[name] = {"key": self.keys[name], "run_id": run_id, "seconds": round(seconds, 1),
                              "artifacts": list(self.stages[name].artifacts)}
        self._write()

    def _write(self) -> None:
        write_json(self.out / STAGES_FILE, {"format": FORMAT, "version": VERSION, "stages": self.records})


def read_stages(out: Path) -> dict[str, dict]:
    """{stage: record} of run folder ``out``'s stages.json ({} when there is none)."""
    return _read(out)


def _read(out: Path) -> dict[str, dict]:
    path = out / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged ({exc}): delete it, and the run's stages all run again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("stages"), dict):
        raise InputError(f"{path} is not an fxq stage record: delete it, and the run's stages all run again")
    return data["stages"]


def _key(stage: Stage, recipe: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    digest = hashlib.sha256(stage.name.encode())
    payload = {"options": {k: recipe.get(k) for k in stage.options},
               "files": {k: _content_digest(recipe.get(k)) for k in stage.files},
               "after": {name: upstream[name] for name in stage.after if name in upstream}}
    digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _content_digest(path: Any) -> str | None:
    """SHA-256 of a file's contents, or of a folder's file names, sizes and modification times (hidden files
    left out; hashing every image of a data set would cost more than most stages); None for none."""
    if path is None:
        return None
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if not any(part.startswith(".") for part in relative.parts):
            stat = file.stat()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
