"""Tie groups: sets of nodes that must get one shared weight bit-width, found with networkx.

:func:`graph_view` is a DiGraph view of the FX graph: one vertex per node (attributes ``op``, ``role``,
``module``), a ``kind="data"`` edge from every input node to its user, and one vertex ``"param:<name>"`` per
weight parameter with a ``kind="weight"`` edge (attribute ``rows``: the row slice or None) to every
conv/linear node that reads it. Tie groups are connected components over those weight edges:

- :func:`shared_weight_groups` — nodes reading the very same tensor (a module called twice). These are
  always tied by the allocation: one tensor has one bit-width.
- :func:`attention_groups` — nodes reading row slices of one parameter: the q/k/v projections of one
  attention (``in_proj_weight``), which a runtime kernel may fuse into one MatMul.
- :func:`merge_groups` — the connected components of several groupings together (e.g. the two above plus
  groups a user names); every node appears in exactly one group, in graph order.

Reads ``fxq.role``, ``fxq.module``, ``fxq.weight``; writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import networkx as nx
import torch.fx

from fxq.errors import InputError
from fxq.passes.weights import weight_nodes

PARAM = "param:"


def graph_view(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The DiGraph view of ``gm`` described in the module docstring."""
    view = nx.DiGraph()
    for node in gm.graph.nodes:
        view.add_node(node.name, op=node.op, role=node.meta.get("fxq.role"), module=node.meta.get("fxq.module"))
        view.add_edges_from(((src.name, node.name) for src in node.all_input_nodes), kind="data")
    for node, ref in weight_nodes(gm):
        view.add_node(PARAM + ref.param, op="parameter", role="parameter", module=None)
        view.add_edge(PARAM + ref.param, node.name, kind="weight", rows=ref.rows)
    return view


def _weight_components(gm: torch.fx.GraphModule, nodes: Iterable[str] | None, same_rows: bool) -> list[list[str]]:
    """Components of ``nodes`` joined when they read the same parameter (and, if ``same_rows``, the same rows)."""
    view = graph_view(gm)
    wanted = [n for n, _ in weight_nodes(gm)] if nodes is None else list(nodes)
    ties = nx.Graph()
    ties.add_nodes_from(n.name if isinstance(n, torch.fx.Node) else n for n in wanted)
    for param in (v for v in view if v.startswith(PARAM)):
        first: dict[object, str] = {}
        for reader in (v for v in view.successors(param) if v in ties):
            rows = view.edges[param, reader]["rows"] if same_rows else None
            anchor = first.setdefault(rows, reader)
            if anchor != reader:
                ties.add_edge(anchor, reader)
    return _ordered(gm, nx.connected_components(ties))


def _ordered(gm: torch.fx.GraphModule, components: Iterable[set[str]]) -> list[list[str]]:
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    groups = [sorted(c, key=order.__getitem__) for c in components]
    return sorted(groups, key=lambda g: order[g[0]])


def shared_weight_groups(gm: torch.fx.GraphModule, nodes: Iterable[str] | None = None) -> list[list[str]]:
    """Components of ``nodes`` (default: every conv/linear weight node) that read the very same weight tensor."""
    return _weight_components(gm, nodes, same_rows=True)


def attention_groups(gm: torch.fx.GraphModule, nodes: Iterable[str] | None = None) -> list[list[str]]:
    """Groups of two or more nodes reading slices of one parameter (q/k/v projections of one attention)."""
    return [g for g in _weight_components(gm, nodes, same_rows=False) if len(g) > 1]


def merge_groups(gm: torch.fx.GraphModule, nodes: Sequence[str],
                 *groupings: Iterable[Iterable[str]]) -> list[list[str]]:
    """The connected components of ``nodes`` under every given grouping; InputError for names not in ``nodes``."""
    ties = nx.Graph()
    ties.add_nodes_from(nodes)
    for grouping in groupings:
        for group in grouping:
            names = [g.name if isinstance(g, torch.fx.Node) else g for g in group]
            unknown = [n for n in names if n not in ties]
            if unknown:
                raise InputError(f"tie group {names} names nodes that are not being allocated ({unknown[:3]}): only "
                                 "conv/linear nodes whose fxq.qspec quantizes the weight can be tied; remove them")
            nx.add_path(ties, names)
    return _ordered(gm, nx.connected_components(ties))
