"""Values of input-independent FX nodes (a weight, a slice of ``in_proj_weight``), computed without running
the graph."""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.node import map_arg

from fxq.errors import LoweringError


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> object:
    """The value of ``node``, which must not depend on a graph input (LoweringError otherwise)."""
    cache: dict[torch.fx.Node, object] = {}

    def value(n: torch.fx.Node) -> object:
        if n not in cache:
            cache[n] = _evaluate(gm, n, value)
        return cache[n]

    with torch.no_grad():
        return value(node)


def _evaluate(gm: torch.fx.GraphModule, n: torch.fx.Node, value) -> object:
    if n.op == "get_attr":
        return _attr(gm, n.target)
    if n.op == "placeholder":
        raise LoweringError(f"node {n.name!r} is a graph input, but a weight quantizer reads it; weight quantizers "
                            "must read parameters (get_attr) so that their integers can be stored")
    args, kwargs = map_arg(n.args, value), map_arg(n.kwargs, value)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    raise LoweringError(f"node {n.name!r} ({n.op}) has no constant value")


def _attr(gm: torch.fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
