"""The `fxq` command: one sub-command per module of this package.

A module here joins the command line by defining ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; fxq's errors print as one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except FxqError as exc:
        print(f"fxq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
