"""Checks of command-line values that run before any work: numeric ranges and output paths.

Each failure is one :class:`fxq.errors.InputError` naming the flag, the value and what to give instead.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from pathlib import Path

from fxq.errors import InputError
from fxq.io import check_writable_ancestor

#: The smallest image side DETR backbones take (they downsample by 32).
MIN_SIZE = 32


def flag_name(dest: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def check_at_least(args: argparse.Namespace, bounds: dict[str, float]) -> None:
    """Every ``args.<dest>`` that is set is a finite number of at least ``bounds[dest]``."""
    for dest, low in bounds.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{flag_name(dest)} {value}: give a finite number of at least {low}")
        if value < low:
            hint = "at least 1" if low == 1 else f"a value >= {low}"
            raise InputError(f"{flag_name(dest)} {value}: give {hint}")


def check_size(value: int | Iterable[int] | None, flag: str = "--size") -> None:
    """Image sizes of at least :data:`MIN_SIZE` pixels."""
    if value is None:
        return
    sides = [value] if isinstance(value, int) else list(value)
    if any(side < MIN_SIZE for side in sides):
        shown = " ".join(map(str, sides))
        raise InputError(f"{flag} {shown} is too small: DETR backbones downsample by 32, use at least {MIN_SIZE}")


def check_output_file(path: str | os.PathLike | None, flag: str, create_folder: bool = True) -> None:
    """InputError unless a file can be written at ``path``: not a folder, its folder existing (or creatable,
    with ``create_folder``) and writable, an existing file writable."""
    if path is None:
        return
    path = Path(path)
    if not create_folder and not path.resolve().parent.is_dir():
        raise InputError(f"folder of {flag} {path} does not exist: create it or choose another path")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder: give a file name (e.g. {path / 'out.json'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable: choose another file")
    check_writable_ancestor(path, flag, f"the folder of {path.name}", start=path.resolve().parent)


def check_input_file(path: str | os.PathLike | None, flag: str) -> None:
    """InputError unless ``path`` is an existing file."""
    if path is None:
        return
    if not Path(path).is_file():
        what = "a folder" if Path(path).is_dir() else "missing"
        raise InputError(f"{flag} {path} is {what}: give an existing file")
    if Path(path).stat().st_size == 0:
        raise InputError(f"{flag} {path} is an empty file (an interrupted copy or download?): give the real file")


def check_input_folder(path: str | os.PathLike | None, flag: str) -> None:
    """InputError unless ``path`` is an existing folder."""
    if path is not None and not Path(path).is_dir():
        what = "a file" if Path(path).exists() else "missing"
        raise InputError(f"{flag} {path} is {what}: give an existing folder")


def check_checkpoint(path: str | os.PathLike | None, flag: str = "--checkpoint") -> None:
    """InputError unless ``path`` is an existing weights file or a Hugging Face model folder (with
    ``config.json``)."""
    if path is not None and Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise InputError(f"{flag} {path} is a folder without config.json: give a weights file or a Hugging "
                             "Face model folder (save_pretrained's config.json + model.safetensors)")
        return
    check_input_file(path, flag)


def check_bit_widths(bits: list[int], flag: str) -> None:
    """Candidate bit-widths given on the command line: weight widths 2..8 and 32 (kept float)."""
    from fxq.passes.sensitivity import check_candidates

    try:
        check_candidates(bits)
    except InputError:
        raise InputError(f"{flag} {' '.join(map(str, bits))}: give weight bit-widths 2..8, and 32 to keep a node "
                         "float (e.g. 2 4 8, or 8 32)") from None


def check_budget(args: argparse.Namespace) -> None:
    """The allocation options of ``args`` (``budget``, None where the command allows it; ``candidates``,
    ``budget_kind``, ``latency_table``) in range and consistent."""
    if args.budget is not None and not 0 < args.budget < math.inf:
        raise InputError(f"--budget {args.budget}: give a finite number > 0 in --budget-kind units")
    check_bit_widths(args.candidates, "--candidates")
    if args.budget_kind == "latency" and not args.latency_table:
        raise InputError("--budget-kind latency needs --latency-table FILE (write one with "
                         "`fxq bench MODEL --latency-table FILE`)")
    if args.latency_table and args.budget_kind != "latency":
        raise InputError(f"--latency-table goes with --budget-kind latency (got --budget-kind {args.budget_kind})")
