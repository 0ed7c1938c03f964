"""The models ``fxq bench`` compares, built from one float graph and one set of real images.

- ``torch``: the eager PyTorch model, fp32;
- ``ort-fp32``: the float graph exported to ONNX;
- ``ort-qdq`` / ``ort-qoperator``: onnxruntime's ``quantize_static`` of that export (:mod:`.ort_quantize`);
- ``fxq-int8``: fxq W8A8, prepared and lowered for the runtime (:func:`quantize_for_runtime`,
  :func:`fxq.backends.runtime_lower.lower_for_runtime`);
- ``fxq-mixed``: fxq W4A8 (4-bit weights; the stem conv, attention matmuls and activations at 8 bits; heads
  float — :data:`fxq.passes.policy.DEFAULT_OVERRIDES`), same preparation;
- ``fxq-int8-plain``: fxq W8A8 through the plain QDQ lowering, for comparison.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fxq.errors import InputError
from fxq.passes.calibrate import calibrate
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import DEFAULT_OVERRIDES, annotate_policy
from fxq.passes.runtime_prep import RUNTIMES as PREPARED_RUNTIMES
from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases
from fxq.quant import QSpec

ROWS = ("torch", "ort-fp32", "ort-qdq", "ort-qoperator", "fxq-int8", "fxq-mixed", "fxq-int8-plain")
POLICIES = {"fxq-int8": "W8A8", "fxq-mixed": "W4A8", "fxq-int8-plain": "W8A8"}
#: The allocation's latency table measures each node at each bit-width: no node is pinned to 8 bits.
TABLE_OVERRIDES = {pattern: policy for pattern, policy in DEFAULT_OVERRIDES.items() if policy is None}


def check_rows(rows: Sequence[str]) -> list[str]:
    """The requested rows in canonical order; InputError naming the known ones for an unknown row."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise InputError(f"unknown bench row(s) {unknown or rows}; choose from {', '.join(ROWS)}")
    return [r for r in ROWS if r in rows]


def bench_images(folder: str | os.PathLike, size: tuple[int, int], count: int) -> torch.Tensor:
    """``count`` images [count, 3, H, W] of a COCO folder: normalised, resized to fit H×W, zero-padded."""
    from fxq.data import CocoDetection, eval_transforms

    h, w = size
    data = CocoDetection.from_folder(folder, transforms=eval_transforms(min(h, w), max(h, w)))
    if len(data) == 0:
        raise InputError(f"{os.fspath(folder)!r} holds no images; give a COCO folder with images")
    out = torch.zeros(count, 3, h, w)
    for i in range(count):
        image, _ = data[i % len(data)]
        scale = min(h / image.shape[1], w / image.shape[2], 1.0)
        if scale < 1.0:
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
        out[i, :, : image.shape[1], : image.shape[2]] = image[:, :h, :w]
    return out


def quantize_for_runtime(float_gm: torch.fx.GraphModule, calibration: Sequence[torch.Tensor],
                         policy: str | QSpec, runtime: str | None = "ort-cpu",
                         overrides: Mapping[str, str | QSpec | None] | None = None) -> torch.fx.GraphModule:
    """A calibrated fake-quantized copy of ``float_gm`` under ``policy``, prepared for ``runtime`` (output
    quantizers before calibration, int32 conv biases after it, for the runtimes that need them)."""
    prepare = runtime in PREPARED_RUNTIMES
    gm = copy.deepcopy(float_gm)
    annotate_policy(gm, policy, overrides)
    insert_quantizers(gm)
    if prepare:
        insert_output_quantizers(gm, runtime)
    calibrate(gm, calibration, progress=False)
    if prepare:
        quantize_biases(gm, runtime)
    return gm
