"""Mixed-precision weight bit allocation: a multiple-choice knapsack solved exactly as a MILP (FQ-DETR eq. 11,
HAWQ-V3).

Binary x_{g,b} for every tie group g (a single node, or nodes that must share a bit-width; nodes reading the
same weight tensor are always tied) and candidate bit-width b::

    minimise  Σ_{g,b} Ω_g(b)·x_{g,b}    s.t.  Σ_b x_{g,b} = 1  (every g),   Σ_{g,b} r_g(b)·x_{g,b} ≤ budget

Ω_g(b) sums the sensitivity Ω_l(b) (:mod:`fxq.passes.sensitivity`) of the group's distinct weight tensors.
The resource r_g(b) depends on ``budget_kind``:

- ``"avg_bits"``: Σ numel_l·b / N over the group's distinct weights, N = numel of all allocated weights — the
  budget is the numel-weighted average weight bit-width of the allocated weights (model size in bits / N);
- ``"size_bytes"``: Σ numel_l·b / 8 — bytes of the allocated weights (not counting scales, biases or the
  weights kept float by the policy);
- ``"bops"``: Σ macs_l·b·a_l over the group's nodes, a_l = the node's ``a_bits`` (32 for float activations),
  MACs at the traced input size (``fxq.macs``);
- ``"latency"``: Σ lat_l(b) over the group's nodes, from ``latency_table`` (:func:`load_latency_table`: the JSON
  file ``fxq bench --latency-table`` writes, or a dict {node: {bits: ms}}), plus the table's rest of the model
  (:meth:`LatencyModel.rest_for`: measured with every weight at one width): the budget and the ``used`` value are
  the whole model's predicted latency. A table recorded on another machine is used with a warning.

Solved by ``scipy.optimize.milp`` (HiGHS) with a zero relative MIP gap: the result is the exact optimum (up to
HiGHS's 1e-7 feasibility tolerance; an answer over budget by more than 1e-9 relative is re-solved tighter).
A budget below Σ_g min_b r_g(b) is infeasible: InputError stating that smallest feasible budget.

Allocated nodes are the conv/linear nodes whose ``fxq.qspec`` quantizes the weight; nodes without a qspec (kept
float by the policy) stay float. Candidate 32 (:data:`fxq.passes.sensitivity.FLOAT_BITS`) keeps an allocated node
float — weight and input activations: its qspec is removed — at Ω = 0; with ``budget_kind="latency"`` that is the
real choice on CPUs where lower weight bit-widths run on the int8 kernels.

Sensitivity: Ω from ``fxq.fisher[objective]`` (recomputed on every call;
objective ``uniform``: the quantization error alone, every layer weighted 1);
nodes without ``fxq.fisher`` may carry their own ``fxq.sensitivity`` (e.g. measured), used as given.

Reads ``fxq.role``, ``fxq.weight``, ``fxq.qspec``, ``fxq.fisher``, ``fxq.macs``, ``fxq.quant_error``,
``fxq.sensitivity``. Writes ``fxq.quant_error``, ``fxq.sensitivity`` (through :mod:`fxq.passes.sensitivity`),
``fxq.qspec`` (the chosen ``w_bits``, other fields kept; through :func:`fxq.passes.policy.assign_qspec`) on every
allocated node, and ``gm.meta["fxq.allocation"]`` (a summary).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse
import torch.fx

from fxq.errors import InputError
from fxq.machine import machine_name
from fxq.passes.pass_manager import PassResult
from fxq.passes.policy import assign_qspec
from fxq.passes.sensitivity import FLOAT_BITS, check_candidates, weight_sensitivity
from fxq.passes.tie_groups import merge_groups, shared_weight_groups
from fxq.passes.weights import parameter, weight_ref

BUDGET_KINDS = ("avg_bits", "size_bytes", "bops", "latency")
UNITS = {"avg_bits": "bits per weight", "size_bytes": "bytes", "bops": "BOPs", "latency": "ms"}
_REL_TOL = 1e-9

LatencyTable = Mapping[str, Mapping[int | str, float]]


def solve_mckp(cost: np.ndarray, resource: np.ndarray, capacity: float,
               time_limit: float | None = None) -> np.ndarray:
    """Index of the chosen column per row of ``cost`` (G, B) minimising Σ cost subject to Σ resource ≤ capacity.

    Exact (HiGHS MILP, zero gap). Raises InputError when even the cheapest choices exceed ``capacity``.
    """
    cost, resource = np.asarray(cost, dtype=float), np.asarray(resource, dtype=float)
    g, b = cost.shape
    floor = resource.min(axis=1).sum()
    if floor > capacity + _REL_TOL * max(abs(capacity), abs(floor)):
        raise InputError(f"budget {capacity:.6g} is infeasible; the smallest feasible one is {floor:.6g}")
    shifted = cost - cost.min(axis=1, keepdims=True)
    c = (shifted / (shifted.max() or 1.0)).ravel()
    one_hot = scipy.sparse.kron(scipy.sparse.eye(g), np.ones((1, b)), format="csr")
    scale = max(np.abs(resource).max(), abs(capacity), 1e-300)
    rhs = capacity
    for _ in range(4):
        constraints = [scipy.optimize.LinearConstraint(one_hot, 1, 1),
                       scipy.optimize.LinearConstraint(resource.reshape(1, -1) / scale, -np.inf, rhs / scale)]
        options = {"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})}
        res = scipy.optimize.milp(c, integrality=np.ones_like(c), bounds=scipy.optimize.Bounds(0, 1),
                                  constraints=constraints, options=options)
        if res.x is None:
            raise InputError(f"the allocation MILP found no solution ({res.message}); raise the budget above "
                             f"{floor:.6g} or the time limit")
        choice = res.x.reshape(g, b).argmax(axis=1)
        used = resource[np.arange(g), choice].sum()
        excess = used - capacity
        if excess <= _REL_TOL * max(abs(capacity), 1.0):
            return choice
        rhs -= 2 * excess
    raise InputError(f"the allocation MILP keeps exceeding budget {capacity:.6g} by solver tolerance; "
                     "loosen the budget slightly")


@dataclass
class AllocationProblem:
    """The MILP's data: groups of node names, candidates, and per (group, candidate) cost and resource."""

    groups: list[list[str]]
    candidates: tuple[int, ...]
    cost: np.ndarray
    resource: np.ndarray
    budget_kind: str
    offset: float = 0.0
    """What the budget holds besides the groups (latency: the rest of the model, ``rest_ms``)."""

    @property
    def min_budget(self) -> float:
        """The smallest feasible budget: every group at its cheapest candidate."""
        return self.offset + float(self.resource.min(axis=1).sum())

    @property
    def max_budget(self) -> float:
        """The largest useful budget: every group at its most expensive candidate."""
        return self.offset + float(self.resource.max(axis=1).sum())

    def solve(self, budget: float, time_limit: float | None = None) -> tuple[float, dict[str, int], float]:
        """(objective Σ Ω, {node: bits}, resource used) of the optimal allocation within ``budget``."""
        if budget < self.min_budget - _REL_TOL * max(abs(self.min_budget), 1.0):
            fastest = " (the fastest achievable)" if self.budget_kind == "latency" else ""
            raise InputError(f"{self.budget_kind} budget {budget:.6g} {UNITS[self.budget_kind]} is infeasible: "
                             f"the smallest feasible budget is {self.min_budget:.6g}{fastest} (every node at its "
                             f"cheapest of {list(self.candidates)} bits); raise the budget or add lower bit-widths")
        choice = solve_mckp(self.cost, self.resource, max(budget, self.min_budget) - self.offset, time_limit)
        rows = np.arange(len(self.groups))
        bits = {name: self.candidates[c] for group, c in zip(self.groups, choice, strict=True) for name in group}
        return float(self.cost[rows, choice].sum()), bits, self.offset + float(self.resource[rows, choice].sum())


def allocatable_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Conv/linear nodes with a parameter weight whose ``fxq.qspec`` quantizes the weight, in graph order."""
    nodes = [n for n in gm.graph.nodes if weight_ref(n) is not None
             and n.meta.get("fxq.qspec") is not None and n.meta["fxq.qspec"].w_bits is not None]
    if not nodes:
        raise InputError("no conv/linear node has an fxq.qspec that quantizes its weight; run "
                         'annotate_policy(gm, "W8A8") first (it keeps the heads float), then allocate_bits')
    return nodes


def _sensitivities(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], bits: tuple[int, ...],
                   objective: str) -> dict[str, dict[int, float]]:
    with_fisher = [n for n in nodes if "fxq.fisher" in n.meta]
    if with_fisher:
        weight_sensitivity(gm, bits, objective, with_fisher)
    result = {}
    for node in nodes:
        given = node.meta.get("fxq.sensitivity") or {}
        if not all(b in given for b in bits):
            raise InputError(f"node {node.name!r} has no Fisher trace (nor fxq.sensitivity for bits {list(bits)}); "
                             "run fisher_traces on the graph first, or load a saved analysis")
        result[node.name] = {b: float(given[b]) for b in bits}
    return result


@dataclass
class LatencyModel:
    """A latency table: ms per node and candidate (``nodes``), the rest of the model (``rest_ms``) and the
    machine it was measured on (None: unknown)."""

    nodes: dict[str, dict[int, float]]
    rest_ms: float | dict[int, float] = 0.0
    machine: str | None = None

    def rest_for(self, candidates: Sequence[int]) -> float:
        """The rest of the model under an allocation from ``candidates``: the largest rest measured at one of
        them (it differs with the weight width), 0 when none was measured."""
        if not isinstance(self.rest_ms, Mapping):
            return float(self.rest_ms)
        measured = [self.rest_ms[b] for b in candidates if b in self.rest_ms]
        return float(max(measured)) if measured else 0.0


LatencySource = LatencyTable | LatencyModel | str | os.PathLike


def load_latency_table(table: LatencySource | None) -> LatencyModel | None:
    """A latency table from a JSON file (``fxq bench --latency-table``: ``{"nodes": {node: {bits: ms}},
    "rest_ms": {bits: ms} (or one ms), "machine": name}``) or a mapping {node: {bits: ms}} (rest 0); warns when it
    was measured on another machine."""
    if table is None or isinstance(table, LatencyModel):
        return table
    where = "the latency table"
    if isinstance(table, (str, os.PathLike)):
        where = f"latency table {os.fspath(table)!r}"
        try:
            with open(table) as f:
                table = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {where} ({exc}); give the JSON file fxq bench --latency-table writes "
                             '({"nodes": {"node_name": {"8": ms, "32": ms}}, "rest_ms": ms})') from None
    if not isinstance(table, Mapping):
        raise InputError(f"{where} is not {{node: {{bits: ms}}}} (a JSON {type(table).__name__}); write it with "
                         "fxq bench --latency-table")
    recorded = table.get("nodes") if isinstance(table.get("nodes"), Mapping) else None
    rows = recorded if recorded is not None else table
    try:
        nodes = {str(node): {int(b): float(ms) for b, ms in row.items()} for node, row in rows.items()}
        rest = table.get("rest_ms", 0.0) if recorded is not None else 0.0
        rest = {int(b): float(ms) for b, ms in rest.items()} if isinstance(rest, Mapping) else float(rest)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{where} is not {{node: {{bits: ms}}}} ({exc}); write it with fxq bench --latency-table") \
            from None
    machine = table.get("machine") if recorded is not None else None
    if machine and machine != machine_name():
        warnings.warn(f"{where} was measured on {machine!r}, not on this machine ({machine_name()!r}): its "
                      "latencies may not hold here; re-measure with fxq bench --latency-table", stacklevel=2)
    return LatencyModel(nodes, rest, machine)


def _latency(node: torch.fx.Node, table: LatencyModel, bits: int) -> float:
    row = table.nodes.get(node.name) or {}
    if bits not in row:
        raise InputError(f"no latency for node {node.name!r} at {bits} bits; measure it on the target and add it "
                         'to latency_table ({"node": {"bits": ms}}, as fxq bench --latency-table writes it)')
    return float(row[bits])


def node_resource(gm: torch.fx.GraphModule, node: torch.fx.Node, bits: int, kind: str,
                  table: LatencyModel | None) -> float:
    """What one node costs in the budget's unit at ``bits`` (weights counted per node; see group_resource)."""
    if kind in ("avg_bits", "size_bytes"):
        ref = weight_ref(node)
        numel = ref.select(parameter(gm, ref, node)).numel()
        return numel * bits / (8 if kind == "size_bytes" else 1)
    if kind == "bops":
        a_bits = FLOAT_BITS if bits == FLOAT_BITS else node.meta["fxq.qspec"].a_bits or FLOAT_BITS
        return float(node.meta.get("fxq.macs", 0)) * bits * a_bits
    return _latency(node, table, bits)


def _allocated_ties(tie_groups: Sequence[Sequence[str]], names: list[str]) -> list[list[str]]:
    """User tie groups without the groups lying wholly outside the allocated nodes (e.g. q/k/v of a float head);
    a group mixing allocated and other nodes is refused."""
    allocated, kept = set(names), []
    for group in tie_groups:
        group = [g.name if isinstance(g, torch.fx.Node) else g for g in group]
        outside = [g for g in group if g not in allocated]
        if outside and len(outside) < len(group):
            raise InputError(f"tie group {group} mixes allocated nodes with nodes that are not being allocated "
                             f"({outside[:3]}: kept float by the policy, or not conv/linear); only nodes whose "
                             "fxq.qspec quantizes the weight can be tied — remove them or give them a qspec")
        if not outside:
            kept.append(group)
    return kept


def _distinct_weights(nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    seen: dict[str, torch.fx.Node] = {}
    for node in nodes:
        seen.setdefault(str(weight_ref(node)), node)
    return list(seen.values())


def build_problem(gm: torch.fx.GraphModule, candidates: Sequence[int] = (2, 4, 8), budget_kind: str = "avg_bits",
                  latency_table: LatencySource | None = None,
                  tie_groups: Sequence[Sequence[str]] | None = None, objective: str = "overall") -> AllocationProblem:
    """The allocation MILP of ``gm`` (module docstring); writes ``fxq.quant_error`` and ``fxq.sensitivity``."""
    if budget_kind not in BUDGET_KINDS:
        raise InputError(f"budget_kind {budget_kind!r} is unknown; use one of {BUDGET_KINDS}")
    if budget_kind == "latency" and latency_table is None:
        raise InputError('budget_kind "latency" needs latency_table: a {"node": {"bits": ms}} dict or the JSON file '
                         "fxq bench --latency-table writes")
    bits = check_candidates(candidates)
    nodes = allocatable_nodes(gm)
    names = [n.name for n in nodes]
    groups = merge_groups(gm, names, shared_weight_groups(gm, names), _allocated_ties(tie_groups or (), names))
    omega = _sensitivities(gm, nodes, bits, objective)
    table = load_latency_table(latency_table)
    by_name = {n.name: n for n in nodes}
    cost = np.zeros((len(groups), len(bits)))
    resource = np.zeros((len(groups), len(bits)))
    for i, group in enumerate(groups):
        members = [by_name[name] for name in group]
        counted = _distinct_weights(members) if budget_kind in ("avg_bits", "size_bytes") else members
        for j, b in enumerate(bits):
            cost[i, j] = sum(omega[n.name][b] for n in _distinct_weights(members))
            resource[i, j] = sum(node_resource(gm, n, b, budget_kind, table) for n in counted)
    if budget_kind == "avg_bits":
        resource /= sum(weight_ref(n).select(parameter(gm, weight_ref(n), n)).numel() for n in _distinct_weights(nodes))
    offset = table.rest_for(bits) if budget_kind == "latency" else 0.0
    return AllocationProblem(groups, bits, cost, resource, budget_kind, offset)


def allocate_bits(gm: torch.fx.GraphModule, candidates: Sequence[int] = (2, 4, 8), budget: float = 4.0,
                  budget_kind: str = "avg_bits", latency_table: LatencySource | None = None,
                  tie_groups: Sequence[Sequence[str]] | None = None, objective: str = "overall",
                  time_limit: float | None = None) -> PassResult:
    """Choose every allocated node's weight bit-width minimising Σ Ω within ``budget`` (module docstring).

    ``tie_groups``: extra groups of node names that must share a bit-width (e.g.
    :func:`fxq.passes.tie_groups.attention_groups`); groups of float nodes only are ignored, groups mixing
    float and allocated nodes refused. ``objective`` picks ``fxq.fisher[objective]`` (``uniform``: weight 1).
    """
    start = time.perf_counter()
    problem = build_problem(gm, candidates, budget_kind, latency_table, tie_groups, objective)
    built = time.perf_counter()
    value, bits, used = problem.solve(budget, time_limit)
    solved = time.perf_counter()
    for node in gm.graph.nodes:
        if node.name in bits:
            chosen = bits[node.name]
            assign_qspec(node, None if chosen == FLOAT_BITS else node.meta["fxq.qspec"].replace(w_bits=chosen))
    summary = {"budget_kind": budget_kind, "budget": float(budget), "used": used, "min_budget": problem.min_budget,
               "objective": objective, "objective_value": value, "candidates": list(problem.candidates),
               "bits": bits, "tie_groups": [g for g in problem.groups if len(g) > 1]}
    if hasattr(gm, "meta"):
        gm.meta["fxq.allocation"] = summary
    histogram = {b: sum(1 for v in bits.values() if v == b) for b in problem.candidates}
    return PassResult(gm, False, {**summary, "nodes": len(bits), "groups": len(problem.groups),
                                  "histogram": histogram, "build_s": built - start, "solve_s": solved - built})


def pareto_frontier(gm: torch.fx.GraphModule, budgets: Sequence[float], candidates: Sequence[int] = (2, 4, 8),
                    budget_kind: str = "avg_bits", latency_table: LatencySource | None = None,
                    tie_groups: Sequence[Sequence[str]] | None = None,
                    objective: str = "overall") -> list[tuple[float, float, dict[str, int]]]:
    """(budget, optimal Σ Ω, {node: bits}) for every feasible budget, ascending; infeasible budgets are left out.

    Writes ``fxq.quant_error`` and ``fxq.sensitivity`` but no ``fxq.qspec``: apply a point with allocate_bits.
    """
    problem = build_problem(gm, candidates, budget_kind, latency_table, tie_groups, objective)
    points = []
    for budget in sorted(budgets):
        if budget >= problem.min_budget - _REL_TOL * max(abs(problem.min_budget), 1.0):
            value, bits, _ = problem.solve(budget)
            points.append((float(budget), value, bits))
    return points
