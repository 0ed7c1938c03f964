"""Atomic file writing: a temp file in the target's folder, renamed over the target when complete; Ctrl-C
during a write takes effect once the file is in place."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from fxq.errors import InputError


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT inside the block and raise its KeyboardInterrupt at the end (main thread only; elsewhere
    a no-op), so that a write is either complete or not started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        _deliver(previous, *received[0])


def _deliver(handler, signum: int, frame) -> None:
    """Act on a held-back signal as ``handler`` (the one in place before) would have."""
    if handler is signal.SIG_IGN or handler is None:
        return
    if handler is signal.SIG_DFL:
        os.kill(os.getpid(), signum)
        return
    handler(signum, frame)  # Python's default_int_handler raises KeyboardInterrupt


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "w") -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it to ``path``; nothing half-written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with deferred_interrupt():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def check_writable_ancestor(path: Path, flag: str, created: str, start: Path | None = None) -> None:
    """InputError (naming ``flag`` and ``path``) unless the nearest existing ancestor of ``start`` (default:
    ``path``) is a writable folder, so that ``created``, the missing folders, can be made."""
    existing = path if start is None else start
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, so {created} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder {existing} is not writable; choose a path you can write to")
