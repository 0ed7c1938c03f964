"""Shape and cost analysis: output shapes, parameter counts and multiply-accumulates per node.

Reads ``fxq.role``. Writes ``fxq.shape`` (output shape, or a list of shapes); ``fxq.params`` (elements of
trainable parameters the node reads directly: get_attr nodes and leaf modules; a module called several times
counts at its first call, so the sum over the graph is the model's parameter count); ``fxq.weight`` (on conv
and linear nodes: qualified name of the weight, ``name[start:stop]`` for a row slice such as a q/k/v
projection); ``fxq.macs`` (multiply-accumulates of conv, linear and matmul nodes at the traced input size,
batch included).

:func:`role_summary` reads ``fxq.role``, ``fxq.params`` and ``fxq.macs`` back and sums them per role (the
table ``fxq inspect`` prints with :func:`format_summary`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch import nn

from fxq.roles import ATTENTION_ROLES, WEIGHT_ROLES


class _ShapeRecorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["fxq.shape"] = _shape_of(result)
        return result


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return [_shape_of(v) for v in value]
    return None


def record_shapes(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> None:
    """Run ``gm`` once on ``inputs`` and store every node's output shape in ``fxq.shape``."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(*inputs)


def _arg_shape(arg: Any) -> list[int]:
    return arg.meta["fxq.shape"] if isinstance(arg, torch.fx.Node) else list(arg.shape)


def _weight_ref(node: torch.fx.Node) -> str | None:
    """``name`` of the weight parameter, or ``name[start:stop]`` for a row slice (q/k/v projections)."""
    if node.op == "call_module":
        return f"{node.target}.weight"
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    rows = ""
    if isinstance(weight, torch.fx.Node) and weight.op == "call_function" and isinstance(weight.args[1], slice):
        rows = f"[{weight.args[1].start}:{weight.args[1].stop}]"
        weight = weight.args[0]
    return weight.target + rows if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None


def macs_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int:
    """Multiply-accumulates of one node (0 for nodes that are not conv, linear or matmul)."""
    role, out = node.meta.get("fxq.role"), node.meta.get("fxq.shape")
    if role == "conv" and node.op == "call_module":
        conv = modules[node.target]
        per_output = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        return math.prod(out) * per_output
    if role == "linear":
        in_features = _arg_shape(node.args[0])[-1]
        return math.prod(out) * in_features
    if role in (*ATTENTION_ROLES, "matmul"):
        return math.prod(out) * _arg_shape(node.args[0])[-1]
    return 0


def params_of(node: torch.fx.Node, gm: torch.fx.GraphModule, modules: dict[str, nn.Module],
              counted: set[str]) -> int:
    """Trainable parameter elements the node reads directly and no earlier node in ``counted`` read."""
    if node.op == "call_module":
        first = node.target not in counted
        counted.add(node.target)
        return sum(p.numel() for p in modules[node.target].parameters()) if first else 0
    if node.op == "get_attr":
        value = _lookup(gm, node.target)
        return value.numel() if isinstance(value, nn.Parameter) else 0
    return 0


def _lookup(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def annotate_costs(gm: torch.fx.GraphModule) -> None:
    """Write ``fxq.params``, ``fxq.weight`` and ``fxq.macs`` on every node (needs ``fxq.shape``)."""
    modules, counted = dict(gm.named_modules()), set()
    for node in gm.graph.nodes:
        node.meta["fxq.params"] = params_of(node, gm, modules, counted)
        node.meta["fxq.macs"] = macs_of(node, modules)
        if node.meta.get("fxq.role") in WEIGHT_ROLES:
            node.meta["fxq.weight"] = _weight_ref(node)


def add_params(node: torch.fx.Node, count: int) -> None:
    """Count ``count`` parameter elements a transform added to the module ``node`` calls (e.g. a bias from
    folding), if ``node`` is the call that counts that module's parameters."""
    if node.meta.get("fxq.params"):
        node.meta["fxq.params"] += count


def role_summary(gm: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """``{role: {"nodes", "params", "macs"}}`` summed over the graph's nodes, roles sorted by name."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"nodes": 0, "params": 0, "macs": 0})
    for node in gm.graph.nodes:
        row = table[node.meta["fxq.role"]]
        row["nodes"] += 1
        row["params"] += node.meta.get("fxq.params", 0)
        row["macs"] += node.meta.get("fxq.macs", 0)
    return dict(sorted(table.items()))


def format_summary(summary: dict[str, dict[str, int]], title: str) -> str:
    """A fixed-width text table of :func:`role_summary`, with a total row."""
    lines = [title, f"{'role':<14}{'nodes':>8}{'params':>14}{'GMACs':>12}"]
    for role, row in summary.items():
        lines.append(f"{role:<14}{row['nodes']:>8}{row['params']:>14,}{row['macs'] / 1e9:>12.3f}")
    total = {k: sum(r[k] for r in summary.values()) for k in ("nodes", "params", "macs")}
    lines.append(f"{'total':<14}{total['nodes']:>8}{total['params']:>14,}{total['macs'] / 1e9:>12.3f}")
    return "\n".join(lines)
