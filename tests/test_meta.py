"""The metadata registry (fxq/meta.py) against the sources: every ``fxq.*`` key used is declared, written by
its declared writer only, and read by exactly the modules it lists; roles are spelled only in fxq/roles.py.

The sources are scanned statically (ast). A string ``fxq.<name>`` is a metadata key where it is used as one:
a subscript (``node.meta["fxq.role"]``), the key of ``.get`` / ``.pop`` / ``.setdefault``, an operand of a
comparison (``"fxq.fisher" in node.meta``, ``key == "fxq.qspec"``), a key of a dict literal, or an element of a
literal tuple/list of such strings; names of fxq modules never count. Accessor calls ``meta.get/put/drop(holder,
meta.KEY, ...)`` count as reads and writes of KEY.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import fxq
from fxq import meta, roles
from fxq.errors import InputError

SOURCES = {"fxq": "fxq", "passes": "fxq.passes", "backends": "fxq.backends", "benchmarks": "benchmarks"}
KEY = re.compile(r"fxq\.[a-z_]+")
WRITING_METHODS = {"pop", "setdefault"}
ACCESSORS = {"get": "read", "put": "write", "drop": "write"}


def source_files() -> dict[str, Path]:
    """{module name: path} of every Python file that installs into fxq, and the benchmark scripts."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if folder == "fxq" and parts[0] in ("passes", "backends"):
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


MODULES = source_files()


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _literal_use(const: ast.Constant, parent: ast.AST, grand: ast.AST | None) -> str | None:
    """"read", "write", "use" (a key, but neither) or None (not used as a key)."""
    if isinstance(parent, ast.Subscript) and parent.slice is const:
        return "write" if isinstance(parent.ctx, (ast.Store, ast.Del)) else "read"
    if isinstance(parent, ast.Call) and parent.args[:1] == [const] and isinstance(parent.func, ast.Attribute):
        method = parent.func.attr
        return "write" if method in WRITING_METHODS else "read" if method == "get" else None
    if isinstance(parent, ast.Compare):
        return "read"
    if isinstance(parent, ast.Dict) and const in parent.keys:
        updated = isinstance(grand, ast.Call) and isinstance(grand.func, ast.Attribute) and grand.func.attr == "update"
        return "write" if updated else "use"
    if isinstance(parent, (ast.Tuple, ast.List, ast.Set)):
        strings = [e for e in parent.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return "use" if len(strings) == len(parent.elts) and all(KEY.fullmatch(e.value) for e in strings) else None
    return None


def _accessor_use(call: ast.Call) -> tuple[str, str] | None:
    """(key name, "read"/"write") of a ``meta.get/put/drop(holder, meta.KEY, ...)`` call."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ACCESSORS or len(call.args) < 2:
        return None
    arg = call.args[1]
    const = arg.attr if isinstance(arg, ast.Attribute) else arg.id if isinstance(arg, ast.Name) else None
    key = getattr(meta, const, None) if const else None
    return (key.name, ACCESSORS[name]) if isinstance(key, meta.Key) else None


def key_uses(path: Path) -> list[tuple[str, str]]:
    """(key, "read"/"write"/"use") for every use of a metadata key in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    parents, uses = _parents(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY.fullmatch(node.value):
            if node.value in MODULES:
                continue
            parent = parents.get(node)
            kind = _literal_use(node, parent, parents.get(parent))
            if kind is not None:
                uses.append((node.value, kind))
        elif isinstance(node, ast.Call) and (found := _accessor_use(node)) is not None:
            uses.append(found)
    return uses


@pytest.fixture(scope="module")
def uses() -> dict[str, dict[str, set[str]]]:
    """{key: {"read"/"write"/"use": modules}} over every source file."""
    table: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, path in MODULES.items():
        for key, kind in key_uses(path):
            table[key][kind].add(module)
    return table


def test_the_scanner_tells_keys_from_other_strings(tmp_path):
    source = ('import importlib\nFORMAT, VERSION = "fxq.analysis", 1\nimportlib.import_module("fxq.passes")\n'
              'node.meta["fxq.a"] = 1\nnode.meta.update({"fxq.b": 2})\nx = node.meta.get("fxq.c")\n'
              'node.meta["fxq.d"] += 1\nif "fxq.e" in node.meta: pass\nKEYS = ("fxq.f", "fxq.passes")\n'
              'meta.put(node, meta.ROLE, "conv")\nv = meta.get(gm, meta.MODEL)\nnode.meta.pop("fxq.g", None)\n')
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert sorted(key_uses(path)) == sorted([
        ("fxq.a", "write"), ("fxq.b", "write"), ("fxq.c", "read"), ("fxq.d", "write"), ("fxq.e", "read"),
        ("fxq.f", "use"), ("fxq.role", "write"), ("fxq.model", "read"), ("fxq.g", "write")])


def test_every_key_used_in_the_sources_is_declared(uses):
    undeclared = {key: sorted(set().union(*kinds.values())) for key, kinds in uses.items()
                  if key not in meta.REGISTRY}
    assert not undeclared, f"declare these keys in fxq/meta.py (key: modules using it): {undeclared}"


def _allowed_writers(key: meta.Key) -> set[str]:
    return ({key.writer} | ({"fxq.meta"} if key in meta.STRUCTURAL else set())
            | ({meta.RESTORER} if key.saved else set()))


def test_each_key_is_written_by_its_writer_and_by_nothing_else(uses):
    for key in meta.REGISTRY.values():
        writers = uses[key.name]["write"]
        assert key.writer in writers, f"{key.name}: declared writer {key.writer} does not write it"
        others = writers - _allowed_writers(key)
        assert not others, f"{key.name} is written by {sorted(others)} besides its writer {key.writer}: route " \
                           f"the write through a function of {key.writer}, or split the key"


def test_declared_readers_are_the_modules_that_read_each_key(uses):
    for key in meta.REGISTRY.values():
        readers = uses[key.name]["read"] - {key.writer, "fxq.meta"} - ({meta.RESTORER} if key.saved else set())
        readers = {r for r in readers if not r.startswith("benchmarks.")}  # scripts read freely; never write
        assert readers == set(key.readers), (f"{key.name}: readers found {sorted(readers)}, declared "
                                             f"{sorted(key.readers)}")


def test_writers_and_readers_are_real_modules():
    named = {key.writer for key in meta.REGISTRY.values()} | {r for key in meta.REGISTRY.values() for r in key.readers}
    missing = sorted(name for name in named | {meta.RESTORER} if importlib.util.find_spec(name) is None)
    assert not missing, f"no such modules: {missing}"


def test_analysis_files_keep_exactly_the_saved_node_keys():
    from fxq.passes import analysis_io

    saved = {key.name for key in meta.REGISTRY.values() if key.saved and not key.graph}
    assert set(analysis_io.KEYS) == saved


def _runtime_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in tree.body:  # top level only: an `if TYPE_CHECKING:` block imports nothing at run time
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found


def test_meta_imports_only_the_standard_library_torch_and_fxq_errors():
    imports = _runtime_imports(ast.parse((ROOT / "fxq" / "meta.py").read_text()))
    other = {m for m in imports if m.split(".")[0] not in (*sys.stdlib_module_names, "torch") and m != "fxq.errors"}
    assert not other, f"fxq/meta.py must stay importable from every layer; it imports {other}"


def _cells(row: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_the_markdown_table_has_one_row_per_key_with_its_declaration():
    rows = meta.markdown_table().strip().splitlines()
    assert _cells(rows[0]) == ["key", "on", "value", "writer", "readers", "meaning"]
    body = [_cells(r) for r in rows[2:]]
    assert [c[0] for c in body] == [f"`{name}`" for name in meta.REGISTRY]
    for cells, key in zip(body, meta.REGISTRY.values(), strict=True):
        assert len(cells) == 6
        assert cells[1] == ("graph" if key.graph else "node")
        assert cells[3].startswith(f"`{key.writer}`") and (meta.RESTORER in cells[3]) == key.saved
        assert cells[4] == (", ".join(f"`{r}`" for r in key.readers) or "—")
        assert cells[5] == key.meaning


def test_the_architecture_document_shows_the_current_table():
    doc = ROOT / "docs" / "ARCHITECTURE.md"
    assert meta.markdown_table() in doc.read_text(), \
        "docs/ARCHITECTURE.md's metadata table is stale: run `.venv/bin/python tests/test_docs.py`"


def test_accessors_read_and_write_node_and_graph_keys():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    node = next(iter(gm.graph.nodes))
    assert meta.get(node, meta.QSPEC) is None and meta.get(node, meta.PARAMS, 7) == 7
    meta.put(node, meta.PARAMS, 3)
    meta.put(gm, meta.MODEL, {"takes_mask": False})
    assert node.meta["fxq.params"] == 3 and gm.meta["fxq.model"] == {"takes_mask": False}
    meta.drop(node, meta.PARAMS)
    meta.drop(node, meta.PARAMS)
    assert "fxq.params" not in node.meta
    with pytest.raises(InputError, match="fxq.model.*GraphModule"):
        meta.put(node, meta.MODEL, {})
    with pytest.raises(InputError, match="fxq.qspec.*graph node"):
        meta.get(gm, meta.QSPEC)
    with pytest.raises(ValueError, match="twice"):
        meta.declare("fxq.role", str, "fxq.tracing", (), "again")


def test_annotate_inserted_writes_exactly_the_structural_keys():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    node = next(iter(gm.graph.nodes))
    node.meta.clear()
    meta.annotate_inserted(node, roles.QUANTIZE, "backbone", [1, 2])
    assert node.meta == {"fxq.role": "quantize", "fxq.module": "backbone", "fxq.shape": [1, 2],
                         "fxq.params": 0, "fxq.macs": 0}
    assert {k.name for k in meta.STRUCTURAL} == set(node.meta)


def _role_literals(path: Path) -> list[str]:
    """String constants compared with a node's role (``n.meta.get("fxq.role") == "conv"``, ``in (...)``)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any("fxq.role" in ast.unparse(s) or "meta.ROLE" in ast.unparse(s) for s in sides):
            continue
        for side in sides:
            elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            found += [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                      and not KEY.fullmatch(e.value)]
    return found


def test_role_values_compared_in_the_sources_exist_and_inserted_roles_use_the_constants():
    defined_in_roles = {roles.QUANTIZE, roles.BIAS_QUANTIZE, roles.CONSTANT, *roles.ATTENTION_ROLES}
    for module, path in MODULES.items():
        literals = _role_literals(path)
        unknown = set(literals) - roles.ROLES
        assert not unknown, f"{module} compares roles with values no node has: {unknown}"
        if module != "fxq.roles":
            spelled = set(literals) & defined_in_roles
            assert not spelled, f"{module} spells {spelled}: use the constants of fxq.roles"


def test_attention_roles_are_spelled_only_in_roles():
    for module, path in MODULES.items():
        if module == "fxq.roles":
            continue
        tree = ast.parse(path.read_text(), str(path))
        spelled = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                   and n.value in (*roles.ATTENTION_ROLES, roles.BIAS_QUANTIZE)}
        assert not spelled, f"{module} spells {spelled}: use fxq.roles.ATTENTION_ROLES / BIAS_QUANTIZE"


def _fields(typed_dict: type) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def test_quantization_passes_write_complete_consistent_records():
    """insert_quant and runtime_prep both create quantizer nodes: the records have the registry's fields
    exactly, and every node (inserted ones too) carries the structural keys."""
    from fxq.passes.calibrate import calibrate
    from fxq.passes.insert_quant import insert_quantizers
    from fxq.passes.policy import annotate_policy
    from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases
    from fxq.quant import FakeQuantizer

    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 64)
    gm = fxq.trace(fxq.models.build("detr_tiny").eval(), images)
    annotate_policy(gm, "4-4-8")
    insert_quantizers(gm)
    before = set(roles.quantizers(gm))
    assert insert_output_quantizers(gm).info["inserted"] > 0
    calibrate(gm, [images], progress=False)
    assert quantize_biases(gm).info["biases"] > 0
    brute = {name for name, m in gm.named_modules() if isinstance(m, FakeQuantizer)}
    nodes = roles.quantizer_nodes(gm)
    assert set(roles.quantizers(gm)) > before and {n.target for n in nodes} == brute and len(nodes) == len(brute)
    assert roles.quantizers(gm) == {n.name: gm.get_submodule(n.target) for n in nodes}
    structural = {k.name for k in meta.STRUCTURAL}
    records = {meta.QUANTIZER.name: meta.QuantizerRecord, meta.QUANTIZED_INPUTS.name: meta.QuantizedInputs,
               meta.BIAS_QUANTIZER.name: meta.BiasQuantizerRecord}
    seen = dict.fromkeys(records, 0)
    for node in gm.graph.nodes:
        assert structural <= set(node.meta), f"{node.name} lacks {structural - set(node.meta)}"
        assert node.meta["fxq.role"] in roles.ROLES
        for key, typed in records.items():
            if key in node.meta:
                assert set(node.meta[key]) == _fields(typed), (node.name, key, node.meta[key])
                seen[key] += 1
    assert all(seen.values()), seen
    assert seen[meta.QUANTIZER.name] == len(nodes)
