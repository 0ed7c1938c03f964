"""Lower a calibrated, fake-quantized GraphModule to an ONNX QDQ model that onnxruntime runs.

The float computation is exported with each quantizer as a marker (:mod:`fxq.backends.onnx_export`), then
each marker becomes QuantizeLinear→DequantizeLinear with the quantizer's own scale and zero-point, or, for a
weight, its integer initializer→DequantizeLinear (:mod:`fxq.backends.qdq_rewrite`). ORT's QuantizeLinear
(x / scale, round half to even, saturate) equals fxq's fake-quant numerics, so ORT reproduces the graph's
fake-quant outputs up to float reassociation in the unquantized ops.

Biases stay float (the PyTorch reference does not quantize them); quantizing them to int32 with
scale s_x·s_w, as ORT's fused Conv/MatMul kernels want, needs the reference to do the same first.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch
import torch.fx

from fxq.backends.constants import constant_value
from fxq.backends.onnx_export import MAX_OPSET, MIN_OPSET, export_marked, markers_installed, output_names
from fxq.backends.qdq_rewrite import RewriteCounts, rewrite_markers
from fxq.backends.quant_points import QuantPoint, collect_points
from fxq.backends.report import LoweringReport
from fxq.errors import InputError, LoweringError
from fxq.tracing import check_images

#: Above this serialized size the model is saved with its tensors in ``<path>.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def check_arguments(gm: torch.fx.GraphModule, images: torch.Tensor, opset: int,
                    points: dict[str, QuantPoint]) -> None:
    """InputError unless ``gm``, ``images`` and ``opset`` can be lowered (int4/int16 storage needs opset 21)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"lower_to_onnx needs a torch.fx.GraphModule (from fxq.trace), got {type(gm).__name__}")
    if getattr(gm, "takes_mask", False):
        raise InputError("the graph takes a padding mask; lowering exports images-only graphs: trace with "
                         "fxq.trace(model, images) (no mask)")
    check_images(images)
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset={opset!r} is not supported; use {MIN_OPSET}..{MAX_OPSET} (21 for int4/int16 storage)")
    narrow = next((p for p in points.values() if p.enabled and p.storage_bits in (4, 16)), None)
    if narrow is not None and opset < 21:
        raise InputError(f"quantizer node {narrow.name!r} is {narrow.bits}-bit: its {narrow.storage_bits}-bit "
                         f"ONNX storage needs opset 21; pass opset=21")


def _save(model: onnx.ModelProto, path: Path, threshold: int) -> str | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() <= threshold:
        onnx.checker.check_model(model)
        onnx.save_model(model, path)
        return None
    location = f"{path.name}.data"
    if (path.parent / location).exists():
        (path.parent / location).unlink()
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    onnx.checker.check_model(str(path))
    return str(path.parent / location)


def lower_to_onnx(gm: torch.fx.GraphModule, example_images: torch.Tensor, path: str | os.PathLike, *,
                  opset: int = 21, dynamic: bool = True,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> LoweringReport:
    """Write ``gm`` (calibrated quantizers) to ``path`` as an ONNX QDQ model and report what it holds.

    Input ``images`` [B, 3, H, W] (batch, height and width dynamic when ``dynamic``); outputs the graph's
    tensor outputs by name (``pred_logits``, ``pred_boxes``). Models whose proto exceeds
    ``external_data_threshold`` bytes keep their tensors in ``<path>.data``.
    """
    points = collect_points(gm)
    check_arguments(gm, example_images, opset, points)
    model, counts, float_bytes = build_qdq_model(gm, example_images, points, opset, dynamic)
    return save_lowered(model, Path(path), external_data_threshold, counts, points, float_bytes, dynamic)


def build_qdq_model(gm: torch.fx.GraphModule, example_images: torch.Tensor, points: dict[str, QuantPoint],
                    opset: int, dynamic: bool) -> tuple[onnx.ModelProto, RewriteCounts, int]:
    """(QDQ model, what the rewrite produced, serialized bytes of the float export) for ``gm`` with ``points``."""
    was_training = gm.training
    gm.eval()
    learning = [p for p in gm.parameters() if p.requires_grad]
    try:
        names = output_names(gm)
        # a QAT graph's learnable scales require grad, and the TorchScript exporter refuses such a tensor where it
        # has to become a constant (seen lowering a 4-4-8 QAT run prepared for ort-cpu)
        for p in learning:
            p.requires_grad_(False)
        with torch.no_grad(), markers_installed(gm, points):
            model = export_marked(gm, example_images, names, opset, dynamic,
                                  marked=any(p.enabled for p in points.values()))
    finally:
        gm.train(was_training)
        for p in learning:
            p.requires_grad_(True)
    float_bytes = model.ByteSize()
    weights = _weights(gm, points)
    counts = rewrite_markers(model, points, weights)
    _check_placement(model, points, counts)
    return model, counts, float_bytes


def save_lowered(model: onnx.ModelProto, path: Path, external_data_threshold: int, counts: RewriteCounts,
                 points: dict[str, QuantPoint], float_bytes: int, dynamic: bool) -> LoweringReport:
    """Save ``model`` to ``path`` (tensors in ``<path>.data`` above the threshold) and report on it."""
    external = _save(model, path, external_data_threshold)
    size = path.stat().st_size + (Path(external).stat().st_size if external else 0)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return LoweringReport(
        path=str(path), opset=opset, dynamic=dynamic, qdq_pairs=dict(sorted(counts.qdq_pairs.items())),
        weights=dict(sorted(counts.weights.items())), clips=counts.clips,
        disabled=sum(not p.enabled for p in points.values()), file_bytes=size, float_bytes=float_bytes,
        external_data=external, inputs=[i.name for i in model.graph.input],
        outputs=[o.name for o in model.graph.output],
    )


def _weights(gm: torch.fx.GraphModule, points: dict[str, QuantPoint]) -> dict[str, torch.Tensor]:
    """The float tensor each enabled weight quantizer reads, by quantizer node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: constant_value(gm, nodes[name].args[0]) for name, p in points.items()
            if p.enabled and p.kind == "weight"}


def _check_placement(model: onnx.ModelProto, points: dict[str, QuantPoint], counts: RewriteCounts) -> None:
    """Every enabled quantizer became exactly one Q/DQ pair or one weight DequantizeLinear."""
    placed = {n.name.rsplit("/", 1)[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    missing = [p.name for p in points.values() if p.enabled and p.name not in placed]
    if missing:
        raise LoweringError(f"quantizer node {missing[0]!r} has no Q/DQ in the exported model (the exporter "
                            f"dropped its marker; {len(missing)} missing in all): its output may be unused")
    expected = sum(p.enabled for p in points.values())
    if sum(counts.qdq_pairs.values()) + sum(counts.weights.values()) != expected:
        raise LoweringError(f"{expected} quantizers but the rewrite produced "
                            f"{sum(counts.qdq_pairs.values())} Q/DQ pairs and {sum(counts.weights.values())} weights")
