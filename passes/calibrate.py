"""Calibration pass: observe activations over a data loader and set every quantizer's scale and zero-point.

Reads the quantizer nodes written by :mod:`fxq.passes.insert_quant`; writes ``fxq.calib`` on each of them:
{"method", "scale", "zero_point"} (lists, one value per channel for per-channel weights). Each quantizer uses
the calibration method its QSpec names (``w_observer`` / ``a_observer``: minmax, percentile, mse, lp:<p>).
Activations are observed on the float graph (all quantizers pass data through while observing). Batches reach
the graph through :func:`fxq.tracing.model_batch`: a graph traced with images only observes padded images as
they are, padding included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
from tqdm import tqdm

from fxq.errors import InputError
from fxq.passes.pass_manager import PassResult
from fxq.roles import quantizer_nodes, quantizers
from fxq.tracing import model_batch


def _set_weight_modes(gm: torch.fx.GraphModule, observing: bool) -> None:
    for node in quantizer_nodes(gm):
        if node.meta["fxq.quantizer"]["kind"] == "weight":
            q = gm.get_submodule(node.target)
            q.start_observing() if observing else q.disable()


def observe(gm: torch.fx.GraphModule, loader: Iterable, num_batches: int | None = None,
            progress: bool = True) -> int:
    """Run ``gm`` over the loader with every quantizer observing; returns the number of batches seen."""
    for q in quantizers(gm).values():
        q.start_observing()
    seen = 0
    with torch.no_grad():
        for batch in tqdm(loader, total=num_batches, desc="calibrate", disable=not progress, leave=False):
            if num_batches is not None and seen >= num_batches:
                break
            gm(*model_batch(gm, batch, index=seen).inputs)
            if seen == 0:
                _set_weight_modes(gm, observing=False)  # weights are constant: one observation is enough
            seen += 1
    if seen == 0:
        raise InputError("the calibration loader yielded no batches; pass a loader over at least one image")
    return seen


def record_calibration(gm: torch.fx.GraphModule) -> None:
    """Copy every calibrated quantizer's method, scale and zero-point into ``fxq.calib`` of its node."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, q in quantizers(gm).items():
        scale, zp = q.qparams()
        nodes[name].meta["fxq.calib"] = {"method": q.method, "scale": scale.flatten().tolist(),
                                         "zero_point": zp.flatten().to(torch.int64).tolist()}


def calibrate(gm: torch.fx.GraphModule, loader: Iterable, num_batches: int | None = None,
              progress: bool = True) -> PassResult:
    """Observe ``num_batches`` batches (all by default), then calibrate and enable every quantizer."""
    qs = quantizers(gm)
    if not qs:
        raise InputError("the graph has no quantizers: run annotate_policy and insert_quantizers first")
    seen = observe(gm, loader, num_batches, progress)
    for q in qs.values():
        q.calibrate()
    record_calibration(gm)
    return PassResult(gm, False, {"batches": seen, "quantizers": len(qs)})
