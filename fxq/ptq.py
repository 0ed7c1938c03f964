"""Post-training quantization in one call: the float graph, then the one PTQ recipe that ``fxq export``,
``fxq pipeline`` and ``fxq bench`` all run.

``float_graph`` traces a model and canonicalises it for quantization (dropout removed, batch norm folded);
``quantize_ptq`` returns a calibrated fake-quantized copy: policy → quantizers → [output quantizers, for a
target that fuses a conv only with one] → calibration → [int32 conv biases, for a target that adds them in
int32]. The bracketed steps follow the target's profile (:data:`fxq.targets.TARGETS`); without a target the
graph is the plain recipe's. Calibration methods: ``minmax``, ``percentile[:q]``, ``mse``, ``lp:<p>`` and
``detptq``. The method applies to activations; weights use min-max per channel for ``minmax``/``percentile``
and the same Lp search for ``mse``/``lp``/``detptq``. A target whose kernels need symmetric activations
(``TargetProfile.activation_symmetric``) gets them in every QSpec.
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
from fxq.passes.policy import DEFAULT_OVERRIDES, annotate_policy
from fxq.passes.remove_dropout import remove_dropout
from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases
from fxq.quant import QSpec, parse_method
from fxq.targets import TargetProfile, target_profile
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


def _symmetric(policy: str | QSpec | None, profile: TargetProfile | None) -> str | QSpec | None:
    """``policy`` with the target's activation symmetry (QSpecs are replaced; strings get it as a field)."""
    if profile is None or profile.activation_symmetric is None or not isinstance(policy, QSpec):
        return policy
    return policy.replace(a_symmetric=profile.activation_symmetric)


def _annotate(gm: DetectorGraph, policy: str | QSpec, overrides: Mapping[str, str | QSpec | None] | None,
              method: str, profile: TargetProfile | None) -> None:
    fields: dict[str, object] = _observers(method)
    if profile is not None and profile.activation_symmetric is not None:
        fields["a_symmetric"] = profile.activation_symmetric
        overrides = {k: _symmetric(v, profile) for k, v in (DEFAULT_OVERRIDES if overrides is None
                                                             else overrides).items()}
    annotate_policy(gm, _symmetric(policy, profile), overrides, **fields)


def quantize_ptq(float_gm: DetectorGraph, calib: Iterable, policy: str | QSpec = "W8A8", method: str = "minmax",
                 overrides: Mapping[str, str | QSpec | None] | None = None, progress: bool = True,
                 target: str | TargetProfile | None = None, num_batches: int | None = None) -> DetectorGraph:
    """A calibrated fake-quantized copy of ``float_gm`` (``calib`` yields loader batches or image tensors),
    prepared for runtime ``target`` (a name of :data:`fxq.targets.TARGETS` or a profile; None: the plain
    recipe); ``num_batches`` batches of ``calib`` calibrate (all by default)."""
    profile = None if target is None else target_profile(target)
    gm = copy.deepcopy(float_gm)
    _annotate(gm, policy, overrides, method, profile)
    if not insert_quantizers(gm).modified:
        return gm  # a float policy: nothing to calibrate
    if profile is not None and profile.conv_needs_output_q:
        insert_output_quantizers(gm, profile)
    if method == "detptq":
        detptq(gm, calib, float_gm, num_batches=num_batches, progress=progress)
    else:
        calibrate(gm, calib, num_batches=num_batches, progress=progress)
    if profile is not None and profile.int32_conv_bias:
        quantize_biases(gm, profile)
    return gm
