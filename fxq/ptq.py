"""Post-training quantization in one call: the float graph, then the one PTQ recipe that ``fxq export``,
``fxq pipeline`` and ``fxq bench`` all run.

``float_graph`` traces a model and canonicalises it for quantization (dropout removed, batch norm folded);
``quantize_ptq`` returns a calibrated fake-quantized copy: policy → quantizers → [output quantizers, for a
target that fuses a conv only with one] → calibration → [int32 conv biases, for a target that adds them in
int32]. The bracketed steps follow the target's profile (:data:`fxq.targets.TARGETS`); without a target the
graph is the plain recipe's. Calibration methods: ``minmax``, ``percentile[:q]``, ``mse``, ``lp:<p>`` and
``detptq``. The method applies to activations; weights use min-max per channel for ``minmax``/``percentile``
and the same Lp search for ``mse``/``lp``/``detptq`` (DetPTQ then refits both on each layer's output,
:mod:`fxq.passes.detptq`). A target whose kernels need symmetric activations
(``TargetProfile.activation_symmetric``) gets them in every QSpec.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.pass_manager import PassManager
from fxq.passes.precision import annotated_copy
from fxq.passes.quantize import quantize_annotated
from fxq.passes.remove_dropout import remove_dropout
from fxq.quant import QSpec
from fxq.targets import TargetProfile, target_profile
from fxq.tracing import DetectorGraph, trace


def float_graph(model: nn.Module, size: tuple[int, int] = (160, 160)) -> DetectorGraph:
    """``model`` traced at batch 1 and ``size``, with dropout removed and batch norm folded (the model is kept)."""
    gm = trace(model.eval(), torch.zeros(1, 3, *size))
    PassManager([remove_dropout, fold_batchnorm])(gm)
    return gm


def quantize_ptq(float_gm: DetectorGraph, calib: Iterable, policy: str | QSpec | None = "W8A8",
                 method: str = "minmax", overrides: Mapping[str, str | QSpec | None] | None = None,
                 progress: bool = True, target: str | TargetProfile | None = None, num_batches: int | None = None,
                 allocation: str | os.PathLike | None = None) -> DetectorGraph:
    """A calibrated fake-quantized copy of ``float_gm`` (``calib`` yields loader batches or image tensors) at a
    uniform ``policy`` or, with ``policy=None``, at the per-node precision of an ``allocation`` file
    (``fxq allocate --out``), prepared for runtime ``target`` (a name of :data:`fxq.targets.TARGETS` or a
    profile; None: the plain recipe); ``num_batches`` batches of ``calib`` calibrate (all by default)."""
    profile = None if target is None else target_profile(target)
    gm = annotated_copy(float_gm, policy, allocation, overrides)
    quantize_annotated(gm, calib, float_gm, method, profile, num_batches, progress)
    return gm


def ptq_structure(float_gm: DetectorGraph, state: Mapping[str, torch.Tensor], policy: str | QSpec | None = "W8A8",
                  target: str | TargetProfile | None = None,
                  allocation: str | os.PathLike | None = None) -> DetectorGraph:
    """The graph :func:`quantize_ptq` makes for these settings, holding a saved ``state`` (its state_dict:
    weights, scales, zero-points; loaded strictly) instead of a calibration's: no data needed."""
    from fxq import meta
    from fxq.errors import InputError
    from fxq.passes.calibrate import record_calibration

    images = next((n for n in float_gm.graph.nodes if n.op == "placeholder"), None)
    shape = None if images is None else meta.get(images, meta.SHAPE)
    if not shape or len(shape) != 4:
        raise InputError("the float graph's input has no traced shape (fxq.shape); trace it with fxq.trace")
    blank = [torch.zeros(1, *shape[1:])]  # a structural stand-in: every scale comes from ``state``
    gm = quantize_ptq(float_gm, blank, policy, "minmax", progress=False, target=target, allocation=allocation)
    gm.load_state_dict(state, strict=True)
    record_calibration(gm)
    return gm
