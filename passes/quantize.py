"""The quantization step of the PTQ and QAT recipes: an annotated graph → a calibrated fake-quantized graph.

``quantize_annotated`` gives every annotated node's QSpec the observers of the calibration ``method``
(:func:`fxq.quant.observer_fields`) and the target's activation symmetry, then runs insert_quantizers →
[insert_output_quantizers, for a target that fuses a conv only with a quantized output] → [quantize_sampling_values,
for a target with an int8 deformable sampling core] → calibrate or detptq →
[quantize_biases, for a target that adds conv biases in int32]. :func:`fxq.ptq.quantize_ptq` and
:func:`fxq.passes.prepare_qat.prepare_qat` both call it, so the two recipes cannot drift apart.

Reads ``fxq.qspec``; writes it (the observer and symmetry fields) and what the passes it runs write.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx

from fxq import meta
from fxq.passes.calibrate import calibrate
from fxq.passes.detptq import detptq
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.pass_manager import PassResult
from fxq.passes.policy import assign_qspec
from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases
from fxq.passes.sampling_values import quantize_sampling_values
from fxq.quant import observer_fields
from fxq.targets import TargetProfile


def quantize_annotated(gm: torch.fx.GraphModule, calib: Iterable, float_gm: torch.fx.GraphModule,
                       method: str = "minmax", profile: TargetProfile | None = None,
                       num_batches: int | None = None, progress: bool = True) -> PassResult:
    """Quantize ``gm`` in place as its ``fxq.qspec`` annotations say, calibrated by ``method`` on ``calib``
    (``float_gm``: the float reference DetPTQ compares against); unmodified when every node is float."""
    symmetric = None if profile is None else profile.activation_symmetric
    for node in gm.graph.nodes:
        spec = meta.get(node, meta.QSPEC)
        if spec is not None:
            fields = {} if symmetric is None else {"a_symmetric": symmetric}
            fields.update(observer_fields(method, fields.get("a_symmetric", spec.a_symmetric)))
            assign_qspec(node, spec.replace(**fields))
    inserted = insert_quantizers(gm)
    if not inserted.modified:
        return PassResult(gm, False, {"method": method})
    if profile is not None and profile.conv_needs_output_q:
        insert_output_quantizers(gm, profile)
    if profile is not None and profile.int8_sampling_core:
        quantize_sampling_values(gm)
    if method == "detptq":
        detptq(gm, calib, float_gm, num_batches=num_batches, progress=progress)
    else:
        calibrate(gm, calib, num_batches=num_batches, progress=progress)
    if profile is not None and profile.int32_conv_bias:
        quantize_biases(gm, profile)
    return PassResult(gm, True, {"method": method, **inserted.info})
