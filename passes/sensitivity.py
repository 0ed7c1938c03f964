"""Quantization sensitivity of each weight: Ω_l(b) = s_l · ‖Q_b(W_l) − W_l‖² for candidate bit-widths b.

s_l is the node's Fisher (or Hessian) trace ``fxq.fisher[objective]``; Q_b is the project's weight quantizer
with the node's own settings: ``FakeQuantizer.from_qspec(qspec.replace(w_bits=b), "weight")`` calibrated on
W_l (granularity, symmetry and ``w_observer`` of the node's ``fxq.qspec``; per-channel symmetric min-max for
nodes without one), so the error is the one the exported model will have.

Candidate ``FLOAT_BITS`` (32) keeps the node float — its weight and its input activations, a float island as
the policies' float nodes — with Ω = 0 and ‖Q_32(W) − W‖² = 0.

Activation term: none — the sensitivity is the weight term only. The allocation chooses weight bit-widths;
each node's activation bit-width is fixed by its policy QSpec, so an activation term would add a per-node
constant that cannot move the optimum — except against candidate 32, which also removes the node's activation
error: Ω(32) = 0 values keeping a node float by its weight error alone (a stated approximation; under 8-bit
activations the weight term dominates). (It would also need the activation-space Fisher E‖∂L/∂X‖², which is
a different quantity from the weight-space s_l; multiplying s_l by an activation error mixes units.)

Reads ``fxq.weight``, ``fxq.qspec``, ``fxq.fisher``. Writes ``fxq.quant_error`` = {b: ‖Q_b(W) − W‖²}
(independent of the objective, reused by later calls unless ``refresh=True``) and ``fxq.sensitivity`` = {b: Ω}.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx

from fxq.errors import InputError
from fxq.passes.pass_manager import PassResult
from fxq.passes.weights import weight_nodes, weight_of
from fxq.quant import FakeQuantizer, QSpec
from fxq.quant.qspec import WEIGHT_BITS

#: The candidate that keeps a node float (weight and input activations).
FLOAT_BITS = 32
CANDIDATE_BITS = (*WEIGHT_BITS, FLOAT_BITS)


def check_candidates(candidates: Iterable[int]) -> tuple[int, ...]:
    """The candidate weight bit-widths (32: kept float), sorted and validated."""
    bits = tuple(sorted(set(candidates)))
    bad = [b for b in bits if isinstance(b, bool) or b not in CANDIDATE_BITS]
    if not bits or bad:
        raise InputError(f"candidate bit-widths {list(candidates)} are not usable; give weight bit-widths from "
                         f"{WEIGHT_BITS}, or {FLOAT_BITS} to keep a node float, e.g. (2, 4, 8) or (8, 32)")
    return bits


def base_spec(node: torch.fx.Node) -> QSpec:
    """The node's QSpec, or the default one (per-channel symmetric min-max) for nodes without one."""
    spec = node.meta.get("fxq.qspec")
    return spec if spec is not None else QSpec()


def quantize_weight(weight: torch.Tensor, spec: QSpec, bits: int) -> torch.Tensor:
    """Q_b(W): ``weight`` fake-quantized at ``bits`` with ``spec``'s weight quantizer, calibrated on it."""
    quantizer = FakeQuantizer.from_qspec(spec.replace(w_bits=bits), "weight")
    with torch.no_grad():
        quantizer.start_observing()
        quantizer(weight)
        quantizer.calibrate()
        return quantizer(weight)


def weight_quant_error(weight: torch.Tensor, spec: QSpec, bits: int) -> float:
    """‖Q_b(W) − W‖² (summed in float64); 0 for ``FLOAT_BITS``."""
    if bits == FLOAT_BITS:
        return 0.0
    return float((quantize_weight(weight, spec, bits).double() - weight.double()).square().sum())


def quantization_errors(gm: torch.fx.GraphModule, candidates: Sequence[int] = (2, 4, 8),
                        nodes: Iterable[torch.fx.Node] | None = None, refresh: bool = False) -> PassResult:
    """Write ``fxq.quant_error`` for every candidate on ``nodes`` (default: all conv/linear weight nodes)."""
    bits = check_candidates(candidates)
    nodes = [n for n, _ in weight_nodes(gm)] if nodes is None else list(nodes)
    computed = 0
    for node in nodes:
        errors = {} if refresh else dict(node.meta.get("fxq.quant_error", {}))
        missing = [b for b in bits if b not in errors]
        if missing:
            weight, spec = weight_of(gm, node), base_spec(node)
            errors.update({b: weight_quant_error(weight, spec, b) for b in missing})
            computed += len(missing)
        node.meta["fxq.quant_error"] = errors
    return PassResult(gm, False, {"nodes": len(nodes), "computed": computed})


UNIFORM = "uniform"
"""The objective that weights every layer's quantization error alike (Ω = ‖Q_b(W) − W‖²): the baseline an
allocation by Fisher information is compared with."""


def fisher_value(node: torch.fx.Node, objective: str) -> float:
    """``fxq.fisher[objective]`` of a node (1 for :data:`UNIFORM`), or InputError saying which analysis to run."""
    if objective == UNIFORM:
        return 1.0
    fisher = node.meta.get("fxq.fisher")
    if fisher is None:
        raise InputError(f"node {node.name!r} has no Fisher trace; run fisher_traces (or hutchinson_traces) on the "
                         "graph first, or load a saved analysis with load_analysis")
    if objective not in fisher:
        have = [k for k in ("overall", "critical", "combined") if k in fisher]
        ids = ", critical_ids=[...]" if objective != "overall" else ""
        raise InputError(f"node {node.name!r} has Fisher traces for {have}, not {objective!r}; run "
                         f'fisher_traces(..., objective="{objective}"{ids}) first')
    return float(fisher[objective])


def weight_sensitivity(gm: torch.fx.GraphModule, candidates: Sequence[int] = (2, 4, 8), objective: str = "overall",
                       nodes: Iterable[torch.fx.Node] | None = None, refresh: bool = False) -> PassResult:
    """Write ``fxq.sensitivity`` = {b: s·‖Q_b(W) − W‖²} on ``nodes`` (default: every node with ``fxq.fisher``)."""
    bits = check_candidates(candidates)
    nodes = [n for n, _ in weight_nodes(gm) if "fxq.fisher" in n.meta] if nodes is None else list(nodes)
    if not nodes:
        raise InputError("no node has a Fisher trace; run fisher_traces on the graph first")
    info = quantization_errors(gm, bits, nodes, refresh).info
    for node in nodes:
        s = fisher_value(node, objective)
        node.meta["fxq.sensitivity"] = {b: s * node.meta["fxq.quant_error"][b] for b in bits}
    return PassResult(gm, False, {**info, "objective": objective, "candidates": bits})
