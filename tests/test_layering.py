"""The import direction between fxq's layers: core < passes < backends < recipes (PTQ, QAT) < bench < cli.

Each layer may import only the layers below it, and the backends (lowering and runtimes) do not import the
passes either: a quantized graph reaches them as data (its modules and ``node.meta``). Checked twice: in a
fresh interpreter (what importing a layer actually loads) and statically, over every import statement of every
source file, function-level imports included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT

#: Every module of fxq belongs to one layer; a module in no layer fails the test (declare it here).
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("fxq.errors", "fxq.quant", "fxq.models", "fxq.data", "fxq.objectives", "fxq.evaluation",
             "fxq.roles", "fxq.tracing", "fxq.tracer", "fxq.meta", "fxq.targets", "fxq.costs", "fxq.io", "fxq.machine",
             "fxq.train"),
    "passes": ("fxq.passes",),
    "backends": ("fxq.backends",),
    "recipe": ("fxq.ptq", "fxq.qat"),
    "bench": ("fxq.bench",),
    "cli": ("fxq.cli",),
}
ORDER = tuple(LAYERS)
#: Not every lower layer: the lowering takes a quantized graph as data and never calls a pass.
NOT_IMPORTED_BY = {"backends": {"passes"}}
#: Source folders and the package each installs as.
SOURCES = {"fxq": "fxq", "passes": "fxq.passes", "backends": "fxq.backends"}


def layer_of(module: str) -> str | None:
    """The layer of ``module`` (longest declared prefix), None for a module of no declared layer."""
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return None if best is None else best[1]


def allowed(layer: str) -> set[str]:
    """The layers ``layer`` may import: itself and those below it, less its exceptions."""
    return set(ORDER[: ORDER.index(layer) + 1]) - NOT_IMPORTED_BY.get(layer, set())


def source_modules() -> dict[str, tuple[ast.Module, bool]]:
    """{module name: (parsed source, whether it is a package)} of every Python file that installs into fxq."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if folder == "fxq" and parts[0] in ("passes", "backends"):
                continue  # not a source folder of fxq (the mapped folders are at the root)
            is_package = parts[-1] == "__init__"
            parts = parts[:-1] if is_package else parts
            out[".".join((package, *parts))] = ast.parse(path.read_text(), str(path)), is_package
    return out


def imported(module: str, tree: ast.Module, is_package: bool) -> set[str]:
    """The fxq modules (or names of fxq packages) that ``tree`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{a.name}" for a in node.names}  # "from fxq import passes" imports fxq.passes
    return {name for name in found if name == "fxq" or name.startswith("fxq.")}


def test_every_source_module_has_a_layer():
    unknown = [m for m in source_modules() if m != "fxq" and layer_of(m) is None]
    assert not unknown, f"modules in no layer of tests/test_layering.py: {unknown}"


def test_no_module_imports_a_layer_above_it():
    violations = []
    for module, (tree, is_package) in source_modules().items():
        layer = "core" if module == "fxq" else layer_of(module)
        if layer is None:
            continue  # test_every_source_module_has_a_layer names it
        for target in sorted(imported(module, tree, is_package)):
            target_layer = layer_of(target) or "core"  # names of the root package (fxq.InputError, ...)
            if target_layer not in allowed(layer):
                violations.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not violations, "\n".join(violations)


def test_the_static_check_sees_function_level_and_relative_imports():
    tree = ast.parse("def f():\n    from fxq.passes.calibrate import calibrate\nfrom . import timing\n"
                     "from fxq import bench\n")
    assert imported("fxq.bench", tree, is_package=True) == {"fxq.passes.calibrate.calibrate", "fxq.bench.timing",
                                                            "fxq.bench"}
    assert layer_of("fxq.passes.calibrate.calibrate") == "passes" and "passes" not in allowed("backends")
    assert layer_of("fxq.benchmark") is None  # a prefix is a whole dotted component


@pytest.mark.parametrize("module, forbidden", [
    ("fxq.backends", ("fxq.passes", "fxq.bench", "fxq.ptq", "fxq.cli")),
    ("fxq.passes", ("fxq.backends", "fxq.bench", "fxq.ptq", "fxq.cli", "onnxruntime")),
    ("fxq.targets", ("fxq.passes", "fxq.backends", "onnxruntime", "torch")),
])
def test_importing_a_layer_loads_nothing_above_it(module, forbidden):
    code = (f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {sorted({f.split('.')[0] for f in forbidden})!r})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                       cwd=ROOT).stdout)
    assert not [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)], loaded
