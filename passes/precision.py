"""The precision a graph is quantized at: a uniform policy or a saved allocation, as ``fxq.qspec`` on its nodes.

One entry for PTQ (:func:`fxq.ptq.quantize_ptq`) and QAT (:func:`fxq.passes.prepare_qat.prepare_qat`): an
allocation is an analysis file of ``fxq allocate --out`` (:mod:`fxq.passes.analysis_io`), checked node by node
against the graph before anything is quantized.

Reads ``fxq.role``; writes ``fxq.qspec`` (through :mod:`fxq.passes.policy` and :mod:`fxq.passes.analysis_io`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch.fx

from fxq import meta
from fxq.errors import InputError
from fxq.passes.analysis_io import _read, load_analysis
from fxq.passes.policy import annotate_policy, assign_qspec
from fxq.passes.weights import parameter, weight_ref
from fxq.quant import QSpec
from fxq.roles import QUANTIZABLE_ROLES
from fxq.tracing import DetectorGraph


def annotated_copy(float_gm: DetectorGraph, policy: str | QSpec | None, allocation: str | os.PathLike | None,
                   overrides: Mapping[str, str | QSpec | None] | None = None) -> DetectorGraph:
    """A copy of ``float_gm`` whose nodes carry ``fxq.qspec`` from a uniform ``policy`` (with ``overrides``) or
    from an ``allocation`` file; InputError when the allocation was made for another graph (naming its first
    node that does not match) or nothing is quantized."""
    if policy is not None and allocation is not None:
        raise InputError("give either a uniform policy or an allocation file, not both")
    if overrides is not None and policy is None:
        raise InputError("overrides apply to a uniform policy; an allocation already fixes every node's "
                         "precision (edit it, or pass policy=... with overrides)")
    gm = copy.deepcopy(float_gm)
    if policy is not None:
        annotate_policy(gm, policy, overrides)
    elif allocation is not None:
        load_allocation(gm, allocation)
    annotated = [n.name for n in gm.graph.nodes if meta.get(n, meta.QSPEC) is not None]
    if not annotated:
        where = f"allocation {os.fspath(allocation)!r}" if allocation is not None else "the graph"
        raise InputError(f"{where} gives no node an fxq.qspec, so there is nothing to quantize; pass "
                         "policy='W4A8' (or another policy), an allocation file from fxq allocate, or annotate "
                         "the graph with annotate_policy / allocate_bits first")
    check_nodes(gm, annotated, "the graph's fxq.qspec annotations")
    return gm


def load_allocation(gm: torch.fx.GraphModule, allocation: str | os.PathLike) -> None:
    """Replace every node's ``fxq.qspec`` with the allocation file's (checked against ``gm`` first)."""
    saved = _read(allocation)["nodes"]
    check_nodes(gm, [name for name, record in saved.items() if meta.QSPEC.name in record],
                 f"allocation {os.fspath(allocation)!r}")
    for node in gm.graph.nodes:
        assign_qspec(node, None)
    load_analysis(gm, allocation)


def check_nodes(gm: torch.fx.GraphModule, names: list[str], where: str) -> None:
    """InputError naming the first of ``names`` that is not a quantizable node of ``gm`` with its weight."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in names:
        node = by_name.get(name)
        role = None if node is None else meta.get(node, meta.ROLE)
        if role not in QUANTIZABLE_ROLES:
            what = "does not exist" if node is None else f"is a {role!r} node"
            raise InputError(f"{where} does not match this graph: node {name!r} {what} here, where a "
                             "quantizable conv/linear/attention node is expected; it was made for another model "
                             "(or other passes): allocate this model's float graph (fxq allocate MODEL --out FILE)")
        if weight_ref(node) is not None:
            parameter(gm, weight_ref(node), node)
