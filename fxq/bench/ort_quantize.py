"""onnxruntime's own post-training quantization (``onnxruntime.quantization.quantize_static``) as a baseline:
per-channel s8 weights, u8 activations, calibrated (min-max by default; entropy or percentile) on the images fxq
calibrates with.

``fmt="qdq"`` writes QuantizeLinear/DequantizeLinear pairs (what fxq writes too); ``fmt="qoperator"`` writes
QLinearConv / QLinearMatMul / ... directly. The float model is first run through ORT's
``quant_pre_process`` (shape inference and basic graph optimization), as its documentation recommends; when
that fails, or its result quantizes to a model onnxruntime refuses (seen with QOperator on DETR-R50), the
model is quantized as exported (``QuantizedBaseline.preprocessed`` says which).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from fxq.errors import InputError

FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
#: quantize_static's activation calibrators by short name (ORT's defaults: Entropy 128 bins, Percentile 99.999).
CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}


class _Images(CalibrationDataReader):
    """Feeds one image batch at a time to the calibration."""

    def __init__(self, input_name: str, batches: Iterable[torch.Tensor]) -> None:
        self._feeds = iter([{input_name: np.ascontiguousarray(b.detach().cpu().float().numpy())} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@dataclass
class QuantizedBaseline:
    """Where onnxruntime's quantized model was written and how."""

    path: str
    fmt: str
    preprocessed: bool
    calibration: str = "minmax"


def _preprocess(float_path: Path, folder: str) -> tuple[Path, bool]:
    out = Path(folder) / "preprocessed.onnx"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quant_pre_process(str(float_path), str(out), skip_symbolic_shape=False)
        onnx.checker.check_model(str(out))
        return out, True
    except Exception:  # ORT's pre-processing raises many types on models it cannot handle; quantize as is
        return float_path, False


def ort_quantize_static(float_path: str | os.PathLike, out_path: str | os.PathLike,
                        calibration: Iterable[torch.Tensor], fmt: str = "qdq",
                        method: str = "minmax") -> QuantizedBaseline:
    """Quantize the float ONNX model at ``float_path`` with onnxruntime (per-channel u8s8, activation ranges
    from calibrator ``method`` of :data:`CALIBRATIONS` over the ``calibration`` image batches) and write it to
    ``out_path``."""
    if fmt not in FORMATS:
        raise InputError(f"quantize_static format {fmt!r} is unknown; use one of {list(FORMATS)}")
    if method not in CALIBRATIONS:
        raise InputError(f"quantize_static calibration {method!r} is unknown; use one of {list(CALIBRATIONS)}")
    float_path = Path(float_path)
    if not float_path.is_file():
        raise InputError(f"float model {str(float_path)!r} does not exist; export it first")
    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    batches = list(calibration)
    with tempfile.TemporaryDirectory(prefix="fxq-ortq-") as folder:
        float_path = _unshared_biases(float_path, folder)
        source, preprocessed = _preprocess(float_path, folder)
        _quantize(source, out_path, input_name, batches, fmt, method)
        if preprocessed and not _loads(out_path):
            _quantize(float_path, out_path, input_name, batches, fmt, method)
            preprocessed = False
    return QuantizedBaseline(str(out_path), fmt, preprocessed, method)


def _unshared_biases(float_path: Path, folder: str) -> Path:
    """A copy of the model in which every Conv / Gemm bias is an initializer of its own.

    The exporter stores equal tensors once, the other readers going through Identity nodes (e.g. the all-zero
    biases that batch-norm folding gives a randomly initialised ResNet); quantize_static's QOperator mode
    needs each bias as an initializer and quantizes it per node.
    """
    model = onnx.load(str(float_path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()  # the exporter shares equal tensors through Identity nodes
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        inits[copy.name] = copy
        model.graph.node.remove(node)
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if node.input[2] in seen:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[2]])
            copy.name = f"{node.input[2]}/{node.name}"
            model.graph.initializer.append(copy)
            node.input[2] = copy.name
        seen.add(node.input[2])
    out = Path(folder) / "float.onnx"
    onnx.save_model(model, str(out))
    return out


def _quantize(source: Path, out_path: str | os.PathLike, input_name: str, batches: list[torch.Tensor],
              fmt: str, method: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(source), str(out_path), _Images(input_name, batches), quant_format=FORMATS[fmt],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CALIBRATIONS[method])


def _loads(path: str | os.PathLike) -> bool:
    """Whether onnxruntime accepts the model (quantize_static's QOperator output of a pre-processed model can
    be invalid: an int32 bias fed to QLinearAdd)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime's own exception types
        return False
