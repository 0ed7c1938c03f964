"""Calibration pass: observe activations over a data loader and set every quantizer's scale and zero-point.

Reads the quantizer nodes written by :mod:`fxq.passes.insert_quant`; writes ``fxq.calib`` on each of them:
{"method", "scale", "zero_point"} (lists, one value per channel for per-channel weights). Each quantizer uses
the calibration method its QSpec names (``w_observer`` / ``a_observer``: minmax, percentile, mse, lp:<p>).
Activations are observed on the float graph (all quantizers pass data through while observing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from fxq.device import module_device
from fxq.errors import InputError
from fxq.passes.insert_quant import quantizers
from fxq.passes.pass_manager import PassResult


def graph_inputs(gm: torch.fx.GraphModule, batch: Any) -> tuple[torch.Tensor, ...]:
    """The positional inputs ``gm`` takes from a loader batch: (images,) or (images, mask), on ``gm``'s device."""
    device = module_device(gm)
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),)
    images, mask = batch[0], batch[1] if len(batch) > 1 else None
    if getattr(gm, "takes_mask", False):
        return images.to(device), None if mask is None else mask.to(device)
    return (images.to(device),)


def _set_weight_modes(gm: torch.fx.GraphModule, observing: bool) -> None:
    for node in gm.graph.nodes:
        if node.meta.get("fxq.quantizer", {}).get("kind") == "weight":
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
            gm(*graph_inputs(gm, batch))
            if seen == 0:
                _set_weight_modes(gm, observing=False)  # weights are constant: one observation is enough
            seen += 1
    if seen == 0:
        raise InputError("the calibration loader yielded no batches; pass a loader over at least one image")
    return seen


def record_calibration(gm: torch.fx.GraphModule) -> None:
    """Copy every calibrated quantizer's method, scale and zero-point into ``fxq.calib`` of its node."""
    for node in gm.graph.nodes:
        if node.meta.get("fxq.role") == "quantize":
            q = gm.get_submodule(node.target)
            scale, zp = q.qparams()
            node.meta["fxq.calib"] = {"method": q.method, "scale": scale.flatten().tolist(),
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
