"""Recipes: a command's options as a YAML mapping, checked against the parser that declares them.

The parser's defaults are the recipe's defaults; a recipe file sets options; flags typed on the command line win
over the file. An option joins the recipe by being declared with ``action=Given``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
from pathlib import Path
from typing import Any

from fxq.errors import InputError

#: The namespace attribute holding the destinations of the recipe options typed on the command line.
GIVEN = "given_options"


class Given(argparse.Action):
    """argparse's plain store action that also records, in ``namespace.given_options``, that the option was typed."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, frozenset(getattr(namespace, GIVEN, frozenset())) | {self.dest})


def recipe_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{key: action} of the recipe options of ``parser``, in declaration order."""
    return {a.dest: a for a in parser._actions if isinstance(a, Given)}


def defaults(options: dict[str, argparse.Action]) -> dict[str, Any]:
    """{key: the parser's default} of every recipe option."""
    return {key: action.default for key, action in options.items()}


def effective_recipe(args: argparse.Namespace, options: dict[str, argparse.Action]) -> dict[str, Any]:
    """{key: value} of every recipe option in the parsed ``args``."""
    return {key: getattr(args, key) for key in options}


def load_recipe(path: str | os.PathLike, options: dict[str, argparse.Action]) -> dict[str, Any]:
    """The options a recipe file sets, checked and converted; InputError names the file and the bad key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise InputError(f"--recipe {path} is {what}: give a YAML file (`fxq pipeline --print-recipe > {path.name}` "
                         "writes one with every option)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"--recipe {path} is not valid YAML ({_one_line(exc)}): fix the file") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--recipe {path} holds a {type(data).__name__}, not a mapping of options: write one "
                         "`key: value` line per option")
    _check_keys(path, data, options)
    return {key: _convert(path, key, value, options[key]) for key, value in data.items()}


def apply_recipe(args: argparse.Namespace, recipe: dict[str, Any]) -> None:
    """Set ``args``'s options from ``recipe``, except those typed on the command line."""
    typed = getattr(args, GIVEN, frozenset())
    for key, value in recipe.items():
        if key not in typed:
            setattr(args, key, value)


def dump_recipe(recipe: dict[str, Any], options: dict[str, argparse.Action]) -> str:
    """``recipe`` as YAML, each key after a comment with its option's help."""
    import yaml

    lines = ["# fxq pipeline recipe: `fxq pipeline --recipe FILE`; flags on the command line override it"]
    for key, value in recipe.items():
        help_text = options[key].help
        if help_text and help_text is not argparse.SUPPRESS:
            lines.append(f"# {options[key].option_strings[0]}: {help_text}")
        inline = None if isinstance(value, list | tuple | dict) else False  # lists on one line, scalars as block
        lines.append(yaml.safe_dump({key: value}, default_flow_style=inline, sort_keys=False).rstrip("\n"))
    return "\n".join(lines) + "\n"


def command_line(prog: str, recipe: dict[str, Any], options: dict[str, argparse.Action]) -> str:
    """The shell command that runs ``prog`` with every option of ``recipe`` spelled out (None values left out)."""
    words = shlex.split(prog)
    for key, value in recipe.items():
        if value is None:
            continue
        words.append(options[key].option_strings[0])
        words.extend(str(v) for v in (value if isinstance(value, list | tuple) else [value]))
    return shlex.join(words)


def _check_keys(path: Path, data: dict, options: dict[str, argparse.Action]) -> None:
    unknown = [key for key in data if key not in options]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(str(key).replace("-", "_"), list(options), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    others = f"; also unknown: {', '.join(map(str, unknown[1:]))}" if unknown[1:] else ""
    raise InputError(f"--recipe {path}: unknown key {key!r}{hint}{others}; the known keys are "
                     f"{', '.join(options)}")


def _convert(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` as the option's parser would give it; InputError naming the key and the expected type."""
    if value is None and action.default is None:
        return None
    kind = action.type or str
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else None
        if items is None or (action.nargs == "+" and not items) or not all(_fits(v, kind) for v in items):
            raise InputError(f"--recipe {path}: {key} is {value!r}; expected {_expected(action)}")
        return [kind(v) for v in items]
    if not _fits(value, kind):
        raise InputError(f"--recipe {path}: {key} is {value!r}; expected {_expected(action)}")
    return kind(value)


def _fits(value: Any, kind: type) -> bool:
    """Whether a YAML scalar is a value of ``kind`` (ints only as ints; names may be written as numbers)."""
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, str | int)


def _expected(action: argparse.Action) -> str:
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
    if action.nargs in ("+", "*"):
        kind = "a list of " + kind.split(" ", 1)[1] + "s" + (" (at least one)" if action.nargs == "+" else "")
    return kind + (" or null" if action.default is None else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
