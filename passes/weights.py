"""The weight tensor a conv/linear node reads, from its ``fxq.weight`` annotation.

``fxq.weight`` (written by :mod:`fxq.costs` at trace time) names a parameter, or a row slice ``name[a:b]`` of
one (the q/k/v projections read rows of ``in_proj_weight``). Several nodes may read the same tensor (a module
called twice); several may read slices of the same parameter (q/k/v of one attention).

Reads ``fxq.role`` and ``fxq.weight``; writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from fxq.errors import InputError
from fxq.roles import WEIGHT_ROLES

_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


@dataclass(frozen=True)
class WeightRef:
    """A parameter name and an optional row range [start, stop)."""

    param: str
    rows: tuple[int | None, int | None] | None = None

    @classmethod
    def parse(cls, text: str) -> WeightRef:
        """``"a.b.weight"`` or ``"a.b.in_proj_weight[0:256]"`` as a WeightRef."""
        match = _SLICE.match(text)
        if match is None:
            return cls(text)
        start, stop = (int(v) if v else None for v in (match["start"], match["stop"]))
        return cls(match["name"], (start, stop))

    def __str__(self) -> str:
        if self.rows is None:
            return self.param
        start, stop = ("" if v is None else str(v) for v in self.rows)
        return f"{self.param}[{start}:{stop}]"

    def select(self, value: torch.Tensor) -> torch.Tensor:
        """The part of the full parameter (or of its gradient) this reference names."""
        return value if self.rows is None else value[slice(*self.rows)]


def weight_ref(node: torch.fx.Node) -> WeightRef | None:
    """The weight a conv/linear node reads, or None for other nodes and weights that are not parameters."""
    text = node.meta.get("fxq.weight") if node.meta.get("fxq.role") in WEIGHT_ROLES else None
    return WeightRef.parse(text) if text else None


def weight_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, WeightRef]]:
    """Every conv/linear node of ``gm`` with a parameter weight, in graph order, with its reference."""
    found = [(n, weight_ref(n)) for n in gm.graph.nodes]
    return [(n, ref) for n, ref in found if ref is not None]


def parameter(gm: torch.fx.GraphModule, ref: WeightRef, node: torch.fx.Node | None = None) -> torch.nn.Parameter:
    """The full parameter ``ref`` names (InputError naming the node if the graph has none by that name)."""
    try:
        return gm.get_parameter(ref.param)
    except AttributeError:
        who = f"node {node.name!r}" if node is not None else "a node"
        raise InputError(f"{who} reads weight {str(ref)!r}, which is not a parameter of the graph module; "
                         "run the analysis on the traced float graph the annotation was made for") from None


def weight_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The (detached) weight tensor ``node`` reads."""
    ref = weight_ref(node)
    if ref is None:
        raise InputError(f"node {node.name!r} reads no parameter weight (role {node.meta.get('fxq.role')!r})")
    return ref.select(parameter(gm, ref, node).detach())
