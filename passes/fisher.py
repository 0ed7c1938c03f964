"""Empirical Fisher analysis: the sensitivity of the detection loss to each quantizable node's weight.

For every conv/linear node l with a parameter weight W_l (``fxq.weight``: a parameter or a row slice of one,
e.g. the q/k/v rows of ``in_proj_weight``)::

    s_l = E[ ‖∂L/∂W_l‖² ] / numel(W_l)            (the mean diagonal of the empirical Fisher over W_l)

with L = L_A (``"overall"``), L_F (``"critical"``) or α·L_A + L_F (``"combined"``, which also records the
other two) — see :mod:`fxq.passes.fisher_objective`.

The expectation is taken, by choice, over

- batches (``per_sample=False``, the default): ‖g_B‖² of each batch's gradient (the criterion's own
  normalisation: mean over the batch's boxes), averaged over batches. Cheap (one backward per batch) but it
  depends on the batch size: E‖g_B‖² = ‖E g‖² + tr Cov(g)/|B|.
- images (``per_sample=True``): ‖g_i‖² of each image's loss as a batch of one, averaged over images — the
  textbook empirical Fisher. It is a loop over single images, not ``torch.func.vmap``: the Hungarian
  matching (scipy) and the criterion's per-image ragged indexing cannot be vmapped. The traced graph
  processes images independently (batch norm folded, attention within an image), so a batch of one is the
  image's own loss.

Gradients are computed in the graph's dtype (float64 graphs give float64 traces), accumulated in float64.

Under ``torchrun`` the ranks share the batches out (batch i on rank i % world_size) and add their squared-norm
sums and counts (:mod:`fxq.passes.fisher_objective`); both expectations are over whole batches or the images
in them, so every rank writes the records one process would over the same batches (up to summation order).

Reads ``fxq.role``, ``fxq.weight``. Writes ``fxq.fisher`` on every such node: ``{"overall": s, "critical": s,
"combined": s (those computed), "alpha": α (critical/combined), "samples": images seen, "batches": batches
seen, "method": "empirical", "per_sample": bool}`` (:class:`fxq.meta.FisherRecord`, through
:func:`record_fisher`, which :mod:`fxq.passes.hutchinson` uses too). :func:`save_analysis` /
:func:`load_analysis` keep it (and the allocation's annotations) as JSON.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.fx

from fxq.errors import InputError
from fxq.meta import FisherRecord
from fxq.passes.analysis_io import load_analysis, save_analysis
from fxq.passes.fisher_objective import DetectionLosses, analysis_ranks, iterate, require_batches, sum_over_ranks, units
from fxq.passes.pass_manager import PassResult
from fxq.passes.weights import WeightRef, parameter, weight_nodes

__all__ = ["fisher_traces", "load_analysis", "save_analysis", "check_finite_weights", "analysed_params"]

Grads = dict[str, torch.Tensor]


def analysed_params(gm: torch.fx.GraphModule) -> tuple[list[tuple[torch.fx.Node, WeightRef]],
                                                       dict[str, torch.nn.Parameter]]:
    """The conv/linear nodes with parameter weights, and those parameters by name."""
    targets = weight_nodes(gm)
    if not targets:
        raise InputError("the graph has no conv/linear node with a parameter weight (fxq.weight); "
                         "analyse a graph made by fxq.trace")
    return targets, {ref.param: parameter(gm, ref, node) for node, ref in targets}


def check_finite_weights(gm: torch.fx.GraphModule, targets: Sequence[tuple[torch.fx.Node, WeightRef]]) -> None:
    """InputError naming the first node whose weight holds NaN/inf."""
    for node, ref in targets:
        if not torch.isfinite(ref.select(gm.get_parameter(ref.param).detach())).all():
            raise InputError(f"node {node.name!r} reads weight {str(ref)!r}, which holds NaN/inf values; "
                             "load a finite checkpoint (a diverged training run leaves NaN weights)")


@contextlib.contextmanager
def differentiable(gm: torch.fx.GraphModule, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients enabled for ``params`` and the graph in eval mode; both restored afterwards."""
    params = list(params)
    flags, training = [p.requires_grad for p in params], gm.training
    try:
        for p in params:
            p.requires_grad_(True)
        gm.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        gm.train(training)


def gradients(loss: torch.Tensor, params: dict[str, torch.nn.Parameter], retain: bool) -> Grads:
    """∂loss/∂p for every parameter (zeros where the loss does not depend on it)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=retain, allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def _combine(alpha: float, overall: Grads, critical: Grads) -> Grads:
    return {n: alpha * overall[n] + critical[n] for n in overall}


def _unit_gradients(gm: torch.fx.GraphModule, unit: tuple, losses: DetectionLosses,
                    params: dict[str, torch.nn.Parameter]) -> dict[str, Grads]:
    inputs, targets = unit
    values = losses(gm(*inputs), targets)
    keys = list(values)
    grads = {k: gradients(values[k], params, retain=i < len(keys) - 1) for i, k in enumerate(keys)}
    return losses.with_combined(grads, _combine)


class _SquaredNorms:
    """Running sums of ‖g_l‖² per node and objective key, with a finiteness check naming the node."""

    def __init__(self, targets: Sequence[tuple[torch.fx.Node, WeightRef]]) -> None:
        self.targets = targets
        self.sums: dict[str, dict[str, float]] = {}
        self.terms = 0

    def add(self, grads: dict[str, Grads], batch_index: int) -> None:
        for key, by_param in grads.items():
            sums = self.sums.setdefault(key, {n.name: 0.0 for n, _ in self.targets})
            for node, ref in self.targets:
                g = ref.select(by_param[ref.param])
                value = float(g.double().square().sum())
                if not math.isfinite(value):
                    raise InputError(
                        f"Fisher analysis: the gradient of the {key} loss w.r.t. node {node.name!r}'s weight "
                        f"{str(ref)!r} is not finite on batch {batch_index}; check that batch's images and "
                        "targets for NaN/inf (and the boxes for zero width/height), or drop the batch")
                sums[node.name] += value
        self.terms += 1


def record_fisher(node: torch.fx.Node, record: FisherRecord) -> None:
    """Store ``record`` as the node's ``fxq.fisher`` (every estimator writes it here, so all records have the
    fields of :class:`fxq.meta.FisherRecord`)."""
    missing = FisherRecord.__required_keys__ - record.keys()
    unknown = record.keys() - FisherRecord.__required_keys__ - FisherRecord.__optional_keys__
    if missing or unknown:
        raise ValueError(f"fxq.fisher of node {node.name!r}: missing fields {sorted(missing)}, unknown fields "
                         f"{sorted(unknown)} (see fxq.meta.FisherRecord)")
    node.meta["fxq.fisher"] = record


def fisher_traces(gm: torch.fx.GraphModule, loader: Iterable, objective: str = "overall",
                  critical_ids: Sequence[int] | None = None, alpha: float = 1.0, num_batches: int | None = None,
                  per_sample: bool = False, progress: bool = True) -> PassResult:
    """Write the empirical Fisher trace ``fxq.fisher`` of every conv/linear node (see the module docstring).

    ``loader`` yields ``(images, mask, targets)`` batches (:func:`fxq.data.collate`); ``critical_ids`` (model
    category ids) are needed for the "critical" and "combined" objectives. NaN/inf gradients and an empty
    loader raise :class:`fxq.errors.InputError`.
    """
    start = time.perf_counter()
    losses = DetectionLosses(gm, objective, critical_ids, alpha)
    targets, params = analysed_params(gm)
    check_finite_weights(gm, targets)
    ranks = analysis_ranks(gm)

    def local() -> dict:
        norms, images, batches = _SquaredNorms(targets), 0, 0
        with differentiable(gm, params.values()):
            for index, batch in iterate(loader, num_batches, progress, f"Fisher ({objective})", ranks):
                for unit in units(gm, batch, per_sample, index):
                    norms.add(_unit_gradients(gm, unit, losses, params), index)
                    images += unit[0][0].shape[0]
                batches += 1
        return {"sums": norms.sums, "terms": norms.terms, "images": images, "batches": batches}

    total = sum_over_ranks(local, ranks)
    images, batches = total["images"], total["batches"]
    require_batches(batches, "Fisher analysis")
    extra = {"alpha": losses.alpha} if objective != "overall" else {}
    for node, ref in targets:
        numel = ref.select(params[ref.param]).numel()
        traces = {key: sums[node.name] / total["terms"] / numel for key, sums in total["sums"].items()}
        record_fisher(node, {**traces, **extra, "samples": images, "batches": batches,
                             "method": "empirical", "per_sample": per_sample})
    return PassResult(gm, False, {"nodes": len(targets), "objective": objective, "samples": images,
                                  "batches": batches, "per_sample": per_sample,
                                  "seconds": time.perf_counter() - start})
