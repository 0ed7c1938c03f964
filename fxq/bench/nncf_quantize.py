"""NNCF's post-training quantization (``nncf.quantize``) of a float ONNX detector for OpenVINO: the peer baseline
an OpenVINO user would reach for.

OpenVINO reads the float ONNX file (``openvino.convert_model``); NNCF's OpenVINO backend inserts its FakeQuantize
ops (preset PERFORMANCE: symmetric int8 weights per output channel, int8 activations per tensor), calibrating on
the same image batches fxq calibrates with; ``model_type="transformer"`` selects NNCF's transformer scheme (it
keeps some element-wise ops and the softmax inputs float and quantizes the attention matmuls), ``None`` its
default one. The result is written as OpenVINO IR (``.xml`` with its ``.bin`` beside it), both files renamed
into place only when complete; :class:`fxq.backends.openvino_session.OpenVinoSession` runs it.

``nncf`` is an optional dependency (``pip install nncf``, with ``openvino``); its absence is one InputError.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

from fxq.backends.openvino_session import require_openvino
from fxq.errors import InputError

MODEL_TYPES = (None, "transformer")


def require_nncf() -> ModuleType:
    """The ``nncf`` module; InputError naming the pip package when it is not installed."""
    require_openvino()
    try:
        return importlib.import_module("nncf")
    except ImportError:
        raise InputError("NNCF is not installed: pip install nncf (it quantizes for OpenVINO)") from None


def nncf_quantize(float_path: str | os.PathLike, out_xml: str | os.PathLike, calibration: Iterable[torch.Tensor],
                  model_type: str | None = "transformer") -> Path:
    """Quantize the float ONNX model at ``float_path`` with NNCF for OpenVINO, calibrated on the image batches
    ``calibration``; writes OpenVINO IR to ``out_xml`` (and its ``.bin``) and returns the path."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"NNCF model type {model_type!r} is unknown; use one of {list(MODEL_TYPES)}")
    float_path, out_xml = Path(float_path), Path(out_xml)
    if not float_path.is_file():
        raise InputError(f"float model {str(float_path)!r} does not exist; export it first")
    if out_xml.suffix != ".xml":
        raise InputError(f"NNCF writes OpenVINO IR: give an output path ending in .xml, not {out_xml.name!r}")
    nncf, ov = require_nncf(), require_openvino()
    batches = [b.detach().cpu().float().numpy() for b in calibration]
    if not batches:
        raise InputError("NNCF calibration needs at least one image batch")
    options = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    quantized = nncf.quantize(ov.convert_model(str(float_path)), nncf.Dataset(batches),
                              subset_size=len(batches), **options)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nncf-", dir=out_xml.parent) as folder:
        staged = Path(folder) / out_xml.name
        ov.save_model(quantized, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), out_xml.with_suffix(".bin"))
        os.replace(staged, out_xml)
    return out_xml


def ir_bytes(xml: str | os.PathLike) -> int:
    """Bytes of an OpenVINO IR model: the .xml and its .bin."""
    xml = Path(xml)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
