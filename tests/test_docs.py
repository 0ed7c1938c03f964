"""The project's own notes (docs/*.md) against the repository: every path, ``fxq.*`` name and ``fxq`` command
they cite exists, the metadata table is the registry's and the layer table is tests/test_layering.py's.

Run as a script to regenerate the metadata table of docs/ARCHITECTURE.md from fxq/meta.py:
``.venv/bin/python tests/test_docs.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_layering import LAYERS, NOT_IMPORTED_BY, ORDER

from fxq import meta

DOCS = sorted((ROOT / "docs").glob("*.md"))
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN, END = "<!-- meta-table:begin", "<!-- meta-table:end -->"
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"[\w.\-<>*]+(?:/[\w.\-<>*]+)*/?(?:::\w+)?")
NAME = re.compile(r"(fxq(?:\.\w+)+)(?:\(.*\))?")
COMMAND = re.compile(r"fxq ([a-z]+)\b(.*)")
#: Where the notes may not point: the project brief is not part of the repository.
FOREIGN = "DESIGN.md"


def spans(text: str) -> list[str]:
    """The inline code spans of a markdown text (fenced blocks left out)."""
    return SPAN.findall(FENCE.sub("", text))


def fenced_words(text: str) -> list[str]:
    """The words of a markdown text's fenced blocks (split at spaces, commas and semicolons)."""
    return [w for block in FENCE.findall(text) for w in re.split(r"[\s,;]+", block.strip("`")) if w]


def is_path(span: str) -> bool:
    """A span naming a file or folder: ``a/b.py``, ``a/b/``, ``a/<name>.json``, ``tests/test_x.py::test_y``."""
    if not PATH.fullmatch(span) or "/" not in span:
        return False
    last = span.split("::")[0].rstrip("/").rsplit("/", 1)[-1]
    return span.endswith("/") or "::" in span or "." in last


def path_problem(span: str) -> str | None:
    """Why ``span`` does not name something in the repository, None when it does."""
    file, _, test = span.partition("::")
    if file.startswith("/") or ".." in Path(file).parts:
        return "points outside the repository"
    matches = sorted(ROOT.glob(re.sub(r"<[^>]*>", "*", file.rstrip("/")))) if "<" in file or "*" in file \
        else [ROOT / file]
    matches = [m for m in matches if m.exists() and (m.is_dir() or not file.endswith("/"))]
    if not matches:
        return "does not exist"
    if test and not re.search(rf"^def {re.escape(test)}\(", matches[0].read_text(), re.M):
        return f"has no function {test}"
    return None


def resolve(name: str) -> object:
    """The module or attribute a dotted ``fxq.*`` name denotes (ImportError / AttributeError when none)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def name_problem(name: str) -> str | None:
    """Why ``name`` is neither a declared metadata key nor a module or attribute of fxq, None when it is one."""
    if name in meta.REGISTRY:
        return None
    try:
        resolve(name)
    except (ImportError, AttributeError) as exc:
        return f"is no metadata key and no fxq module or attribute ({type(exc).__name__}: {exc})"
    return None


def command_problem(command: str, rest: str, helps: dict[str, str]) -> str | None:
    """Why ``fxq COMMAND rest`` names an unknown sub-command or option, None when it does not."""
    if command not in helps:
        return f"has no sub-command {command!r}"
    unknown = [o for o in re.findall(r"--[\w-]+", rest) if not re.search(rf"{o}\b", helps[command])]
    return f"has no option {unknown}" if unknown else None


def subcommand_helps() -> dict[str, str]:
    """{sub-command: its help text} of the fxq command line."""
    from fxq.cli import build_parser

    parser = build_parser()
    choices = next(a.choices for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return {name: sub.format_help() for name, sub in choices.items()}


def replace_table(text: str, table: str) -> str:
    """``text`` with the lines between the metadata-table markers replaced by ``table``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"docs/ARCHITECTURE.md needs one {BEGIN!r} line and one {END!r} line")
    head, rest = text.split(BEGIN)
    marker, _, rest = rest.partition("\n")
    _, tail = rest.split(END)
    return f"{head}{BEGIN}{marker}\n{table}{END}{tail}"


def test_the_notes_exist_and_cite_code():
    assert ARCHITECTURE in DOCS
    for doc in DOCS:
        assert any(is_path(s) for s in spans(doc.read_text())), f"{doc.name} cites no file"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_cited_path_exists_in_the_repository(doc):
    text = doc.read_text()
    problems = [f"`{s}` {why}" for s in spans(text) + fenced_words(text) if is_path(s) and (why := path_problem(s))]
    assert not problems, f"{doc.name}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_cited_fxq_name_and_command_exists(doc):
    helps = subcommand_helps()
    problems = []
    for s in spans(doc.read_text()):
        if (m := NAME.fullmatch(s)) and (why := name_problem(m.group(1))):
            problems.append(f"`{s}` {why}")
        elif (c := COMMAND.fullmatch(s)) and (why := command_problem(c.group(1), c.group(2), helps)):
            problems.append(f"`{s}`: fxq {why}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


def test_the_checks_tell_real_references_from_broken_ones():
    assert is_path("passes/fisher.py") and is_path("fxq/models/") and is_path("fxq/weights/<name>.json")
    assert not is_path("W4/W8") and not is_path("x / scale") and not is_path("gm(images[, mask])")
    assert spans("a `x/y.py` b\n```\nz/w.py, q\n```\n") == ["x/y.py"]
    assert fenced_words("a `x/y.py` b\n```\nz/w.py, q\n```\n") == ["z/w.py", "q"]
    assert path_problem("passes/fisher.py") is None and path_problem("fxq/weights/<name>.json") is None
    assert path_problem("passes/fisher_typo.py") == "does not exist"
    assert path_problem("fxq/tracing.py/") == "does not exist"  # a file is not a folder
    assert path_problem("../shared/data/") == "points outside the repository"
    assert path_problem("tests/test_docs.py::test_the_notes_exist_and_cite_code") is None
    assert "no function" in path_problem("tests/test_docs.py::test_missing")
    assert name_problem("fxq.role") is None and name_problem("fxq.passes.PassManager") is None
    assert name_problem("fxq.trace") is None and name_problem("fxq.rolez") is not None
    assert name_problem("fxq.passes.no_such_pass") is not None
    helps = subcommand_helps()
    assert command_problem("export", " --runtime R", helps) is None
    assert command_problem("export", " --runtimes R", helps) is not None
    assert command_problem("frobnicate", "", helps) is not None


def test_the_metadata_table_is_the_registrys():
    text = ARCHITECTURE.read_text()
    assert replace_table(text, meta.markdown_table()) == text, \
        "the metadata table is stale: run `.venv/bin/python tests/test_docs.py`"


def test_the_layer_table_is_the_layering_tests():
    text = ARCHITECTURE.read_text()
    assert " < ".join(ORDER) in text
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| (.*) \|$", text, re.M)}
    for layer, modules in LAYERS.items():
        assert layer in rows, f"docs/ARCHITECTURE.md's layer table has no row {layer!r}"
        assert set(SPAN.findall(rows[layer])) == set(modules), f"layer {layer!r}: {rows[layer]}"
        for excluded in NOT_IMPORTED_BY.get(layer, ()):
            assert f"imports no {excluded}" in rows[layer], f"layer {layer!r} must say it imports no {excluded}"


def test_adding_a_runtime_target_names_every_profile_flag():
    from fxq.targets import TargetProfile

    text = ARCHITECTURE.read_text().split("## Adding a runtime target", 1)[-1]
    flags = [f.name for f in dataclasses.fields(TargetProfile) if f.name not in ("name", "description")]
    missing = [f for f in flags if f"`{f}`" not in text and f"`{f}=" not in text]
    assert not missing, f"docs/ARCHITECTURE.md's 'Adding a runtime target' does not explain {missing}"


def test_nothing_points_at_the_project_brief():
    files = [ROOT / "README.md", *DOCS, *(p for d in ("fxq", "passes", "backends", "tests", "benchmarks")
                                        for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md"))]
    citing = [str(p.relative_to(ROOT)) for p in files if p != Path(__file__).resolve() and FOREIGN in p.read_text()]
    assert not citing, f"{FOREIGN} is not in this repository; point these at docs/ instead: {citing}"


if __name__ == "__main__":
    old = ARCHITECTURE.read_text()
    new = replace_table(old, meta.markdown_table())
    if new != old:
        ARCHITECTURE.write_text(new)
    print("docs/ARCHITECTURE.md: metadata table " + ("updated" if new != old else "already current"))
    sys.exit(0)
