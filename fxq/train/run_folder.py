"""Run folders: refuse one that holds another run unless resuming or overwriting, and write nothing until the
caller has checked everything else.

``claim_run_folder(path, config, resume, overwrite)`` checks the folder without touching it and returns a
:class:`RunFolder`; its :meth:`RunFolder.commit` (called once every other check has passed, on rank 0) removes
the files of an overwritten run and writes ``config.json``. A resume whose options differ from the run's
``config.json`` is refused before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fxq.errors import InputError
from fxq.io import check_writable_ancestor, write_json

CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"
#: Files that mark a folder as holding a run (of fxq train, pretrain, qat or pipeline).
RUN_FILES = ("config.json", "checkpoint.pt", "log.jsonl", "model.pt", "eval.json", "qat_model.pt", "backbone.pt",
             "summary.json")
#: Options that say how a run is executed, not what it computes: they may change on resume.
RUN_CONTROL = frozenset({"func", "resume", "overwrite", "stop_after", "no_progress", "threads", "ckpt_every",
                         "skip_bad_images", "out", "command"})


@dataclass(frozen=True)
class RunFolder:
    """A checked run folder; :meth:`commit` makes it this run's."""

    path: Path
    config: dict
    resume: bool = False
    stale: tuple[str, ...] = field(default_factory=tuple)

    def commit(self, main: bool = True) -> None:
        """Remove an overwritten run's files and write ``config.json`` (a resumed run keeps its own); only
        when ``main`` (rank 0)."""
        if not main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for name in self.stale:
            (self.path / name).unlink(missing_ok=True)
        if not self.resume:
            write_json(self.path / CONFIG_NAME, {"argv": self.config})


def claim_run_folder(path: str | os.PathLike, config: dict, resume: bool = False, overwrite: bool = False,
                     files: Iterable[str] = RUN_FILES, resumable: bool = True) -> RunFolder:
    """Check that ``path`` can take this run (``config``: the command's options) and return it, unwritten.
    ``files`` mark a folder as holding a run; ``resumable`` says whether the command has ``--resume`` (the
    refusal suggests it).

    Refused (InputError, nothing written): a path that is a file or not writable, a folder holding a run without
    ``resume`` or ``overwrite``, both flags together, ``resume`` without a checkpoint, and ``resume`` with
    options (other than :data:`RUN_CONTROL`) that differ from the run's ``config.json``.
    """
    path = Path(path)
    config = {k: v for k, v in config.items() if k != "func"}
    check_output_folder(path, "--out")
    if int(os.environ.get("RANK", "0")) != 0:
        # under torchrun rank 0 alone checks and commits: the others could see its fresh config.json as a run
        return RunFolder(path, config, resume=resume)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run or replace it, not both")
    present = tuple(name for name in files if (path / name).exists())
    if resume:
        _check_resume(path, config)
        return RunFolder(path, config, resume=True)
    if present and not overwrite:
        resume_hint = "continue it with --resume, " if resumable else ""
        raise InputError(
            f"{path} holds another run ({', '.join(present)}): {resume_hint}replace it with --overwrite, or "
            "choose another --out (nothing was written)"
        )
    return RunFolder(path, config, stale=present)


def check_output_folder(path: Path, flag: str) -> None:
    """InputError unless ``path`` is (or can be created as) a writable folder."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file: give a folder for the run")
    check_writable_ancestor(path, flag, "the folder")


def _check_resume(path: Path, config: dict) -> None:
    if not (path / CHECKPOINT_NAME).is_file():
        raise InputError(f"--resume: {path} holds no {CHECKPOINT_NAME} to continue from; drop --resume to start "
                         "the run (nothing was written)")
    stored = _stored_config(path)
    if stored is None:
        return
    diffs = [f"--{k.replace('_', '-')} {config[k]!r} (the run has {stored[k]!r})" for k in sorted(config)
             if k in stored and k not in RUN_CONTROL and _plain(config[k]) != _plain(stored[k])]
    if diffs:
        raise InputError(f"--resume {path}: the run was started with other options: {'; '.join(diffs)}; resume "
                         "with the run's options, or start a new run elsewhere (nothing was written)")


def _stored_config(path: Path) -> dict | None:
    file = path / CONFIG_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{file} is not valid JSON ({exc}); the run folder is damaged: start a new run "
                         "elsewhere or with --overwrite") from exc
    argv = data.get("argv") if isinstance(data, dict) else None
    return argv if isinstance(argv, dict) else None


def _plain(value):
    """JSON's view of ``value`` (tuples are lists), so stored and parsed options compare equal."""
    return json.loads(json.dumps(value, default=str))
