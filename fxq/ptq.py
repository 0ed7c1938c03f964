"""Post-training quantization in one call: the float graph, then policy → quantizers → calibration.

``float_graph`` traces a model and canonicalises it for quantization (dropout removed, batch norm folded);
``quantize_ptq`` returns a calibrated fake-quantized copy. Calibration methods: ``minmax``,
``percentile[:q]``, ``mse``, ``lp:<p>`` and ``detptq``. The method applies to activations; weights use min-max
per channel for ``minmax``/``percentile`` and the same Lp search for ``mse``/``lp``/``detptq``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fxq.passes.calibrate import calibrate
from fxq.passes.detptq import detptq
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.pass_manager import PassManager
from fxq.passes.policy import annotate_policy
from fxq.passes.remove_dropout import remove_dropout
from fxq.quant import QSpec, parse_method
from fxq.tracing import DetectorGraph, trace


def float_graph(model: nn.Module, size: tuple[int, int] = (160, 160)) -> DetectorGraph:
    """``model`` traced at batch 1 and ``size``, with dropout removed and batch norm folded (the model is kept)."""
    gm = trace(model.eval(), torch.zeros(1, 3, *size))
    PassManager([remove_dropout, fold_batchnorm])(gm)
    return gm


def _observers(method: str) -> dict[str, str]:
    if method == "detptq":
        return {"a_observer": "lp:2", "w_observer": "lp:2"}
    kind, _ = parse_method(method)
    return {"a_observer": method, "w_observer": method if kind in ("lp", "mse") else "minmax"}


def quantize_ptq(float_gm: DetectorGraph, calib: Iterable, policy: str | QSpec = "W8A8", method: str = "minmax",
                 overrides: Mapping[str, str | QSpec | None] | None = None, progress: bool = True) -> DetectorGraph:
    """A calibrated fake-quantized copy of ``float_gm`` (``calib`` yields loader batches or image tensors)."""
    gm = copy.deepcopy(float_gm)
    annotate_policy(gm, policy, overrides, **_observers(method))
    if not insert_quantizers(gm).modified:
        return gm  # a float policy: nothing to calibrate
    if method == "detptq":
        detptq(gm, calib, float_gm, progress=progress)
    else:
        calibrate(gm, calib, progress=progress)
    return gm
