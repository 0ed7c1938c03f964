"""The `fxq` command: one sub-command per module of this package.

A module here joins the command line by defining ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

from fxq.errors import FxqError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every sub-command module of fxq.cli registered."""
    parser = argparse.ArgumentParser(prog="fxq", description="Quantization toolkit for DETR detectors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


#: Exit status of an interrupted command (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line; fxq's errors print as one line and exit with status 2, Ctrl-C prints one line and
    exits with status 130."""
    args, format_warning = None, warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except FxqError as exc:
        command = f"fxq {args.command}" if args is not None else "fxq"
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if not _caused_by_interrupt(exc):
            raise
        print(interrupted_message(args), file=sys.stderr)  # a library's cleanup failed after the Ctrl-C
        return INTERRUPTED
    finally:
        warnings.formatwarning = format_warning
    return int(code or 0)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in the chain of exceptions that led to ``exc``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line (``fxq: UserWarning: ...``), without the source line Python adds."""
    return f"fxq: {category.__name__}: {message}\n"


def interrupted_message(args: argparse.Namespace | None) -> str:
    """What an interrupted command leaves and how to go on."""
    command = f"fxq {args.command}" if args is not None else "fxq"
    if args is not None and args.command == "pipeline":
        return (f"{command}: interrupted; the stages finished so far are kept in {args.out} (stages.json) and no "
                "file was left half-written: run the same command again to continue from the interrupted stage")
    if args is not None and hasattr(args, "resume"):
        return (f"{command}: interrupted; every file in {args.out} is complete (checkpoints are written "
                "atomically): run the same command with --resume to continue from the last checkpoint")
    return f"{command}: interrupted; no file was left half-written: run the command again"


if __name__ == "__main__":
    sys.exit(main())
