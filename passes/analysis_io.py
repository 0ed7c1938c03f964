"""Saving and loading the analysis annotations of a graph as JSON, keyed by node name.

Kept: ``fxq.fisher``, ``fxq.quant_error``, ``fxq.sensitivity``, ``fxq.qspec`` (as ``QSpec.to_dict()``) of
every node that has them, and the graph's ``meta["fxq.allocation"]`` summary — enough to print the report or
lower the allocated graph without recomputing the analysis. Bit-width keys (JSON strings) come back as ints.

File layout: ``{"format": "fxq.analysis", "version": 1, "model": ..., "allocation": ..., "nodes": {name: {key:
value}}}``. Loading sets the saved keys on the named nodes and leaves every other annotation as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.fx

from fxq.errors import InputError
from fxq.io import write_json
from fxq.passes.pass_manager import PassResult
from fxq.quant import QSpec

FORMAT, VERSION = "fxq.analysis", 1
BITS_KEYED = ("fxq.quant_error", "fxq.sensitivity")
KEYS = ("fxq.fisher", *BITS_KEYED, "fxq.qspec")


def _encode(key: str, value: Any) -> Any:
    if key == "fxq.qspec":
        return value.to_dict()
    if key in BITS_KEYED:
        return {str(bits): float(v) for bits, v in value.items()}
    return value


def _decode(key: str, value: Any) -> Any:
    if key == "fxq.qspec":
        return QSpec.from_dict(value)
    if key in BITS_KEYED:
        return {int(bits): float(v) for bits, v in value.items()}
    return value


def save_analysis(gm: torch.fx.GraphModule, path: str | os.PathLike) -> int:
    """Write the analysis annotations of ``gm`` to ``path`` (atomically); returns the number of nodes saved."""
    nodes = {}
    for node in gm.graph.nodes:
        record = {key: _encode(key, node.meta[key]) for key in KEYS if node.meta.get(key) is not None}
        if record:
            nodes[node.name] = record
    meta = getattr(gm, "meta", {})
    write_json(path, {"format": FORMAT, "version": VERSION, "model": meta.get("fxq.model"),
                      "allocation": meta.get("fxq.allocation"), "nodes": nodes})
    return len(nodes)


def _read(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"analysis file {os.fspath(path)!r} does not exist; write it with save_analysis") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"analysis file {os.fspath(path)!r} is not valid JSON ({exc}); write it again "
                         "with save_analysis") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{os.fspath(path)!r} is not an fxq analysis file (no \"format\": \"{FORMAT}\")")
    return data


def load_analysis(gm: torch.fx.GraphModule, path: str | os.PathLike) -> PassResult:
    """Set the annotations saved in ``path`` on the nodes of ``gm`` with the same names."""
    data = _read(path)
    by_name = {n.name: n for n in gm.graph.nodes}
    unknown = [name for name in data["nodes"] if name not in by_name]
    if unknown:
        raise InputError(f"analysis file {os.fspath(path)!r} names nodes this graph lacks ({unknown[:3]}); "
                         "load it into a graph traced from the same model with the same passes applied")
    for name, record in data["nodes"].items():
        for key, value in record.items():
            if key in KEYS:
                by_name[name].meta[key] = _decode(key, value)
    if data.get("allocation") is not None and hasattr(gm, "meta"):
        gm.meta["fxq.allocation"] = data["allocation"]
    return PassResult(gm, False, {"nodes": len(data["nodes"]), "model": data.get("model")})
