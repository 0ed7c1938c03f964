"""An OpenVINO session over a lowered detector, behind :class:`fxq.backends.OrtSession`'s interface: batched image
tensor in, named torch tensors out; and the layers OpenVINO actually runs (its runtime model).

OpenVINO reads the ONNX QDQ file itself: its low-precision transformations turn QuantizeLinear/DequantizeLinear
around Convolution / MatMul into int8 layers, and its runtime model says, per executed layer, the layer type,
the precision it runs in and the original ONNX nodes fused into it (:func:`runtime_layers`). ``precision="f32"``
(the default) keeps the float layers in fp32 (``INFERENCE_PRECISION_HINT``) and turns off the dynamic int8
quantization of activations read by compressed-weight layers (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0), so the
file's own numerics are run; on CPUs with AMX / AVX-512 BF16 OpenVINO would otherwise run float layers in bf16.

``openvino`` is an optional dependency (``pip install openvino``); every entry point names it when missing.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from fxq.backends.session import image_array
from fxq.errors import InputError

#: OpenVINO devices by short name (only CPU is known to fxq).
DEVICES = {"cpu": "CPU"}
PRECISIONS = ("f32", "bf16", "f16")


def require_openvino() -> ModuleType:
    """The ``openvino`` module; InputError naming the pip package when it is not installed."""
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise InputError("the OpenVINO runtime is not installed: pip install openvino (or pip install "
                         "'fxq[openvino]'), or use an onnxruntime provider") from None


def openvino_version() -> str | None:
    """The installed OpenVINO version ("2026.4.1"), None when it is not installed."""
    try:
        return require_openvino().__version__.split("-")[0]
    except InputError:
        return None


def _device(ov: ModuleType, device: str) -> str:
    name = DEVICES.get(device.lower(), device) if isinstance(device, str) else device
    available = ov.Core().available_devices
    if name not in available:
        raise InputError(f"OpenVINO device {device!r} is not present here (available: {', '.join(available)}); "
                         "use device='cpu'")
    return name


def _config(threads: int | None, precision: str) -> dict[str, object]:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads={threads!r} must be a positive integer (or None for OpenVINO's default)")
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if precision == "f32":
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def compile_onnx(model: str | os.PathLike | bytes, device: str = "cpu", threads: int | None = None,
                 precision: str = "f32"):
    """An OpenVINO CompiledModel of an ONNX file (or its serialized bytes); InputError when OpenVINO is missing,
    the device absent, or the file not one OpenVINO can read (with OpenVINO's first line)."""
    ov = require_openvino()
    core, config = ov.Core(), _config(threads, precision)
    name = _device(ov, device)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise InputError(f"ONNX model {os.fspath(model)!r} does not exist; write one with fxq.backends.lower_to_onnx")
    try:
        read = core.read_model(model, b"") if isinstance(model, bytes) else core.read_model(os.fspath(model))
        return core.compile_model(read, name, config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line messages
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        label = "the model" if isinstance(model, bytes) else repr(os.fspath(model))
        raise InputError(f"OpenVINO {openvino_version()} cannot load {label} ({first.strip()[:200]}); pass a .onnx "
                         "file written by fxq.backends.lower_to_onnx") from None


@dataclass(frozen=True)
class RuntimeLayer:
    """One layer of the graph OpenVINO runs: its type, runtime precision and the ONNX nodes fused into it."""

    name: str
    layer_type: str
    precision: str
    originals: tuple[str, ...]

    @property
    def kernel(self) -> str:
        """``"type/precision"``, e.g. ``"Convolution/u8"`` (the form of ``TargetProfile.integer_kernels``)."""
        return f"{self.layer_type}/{self.precision}"


_IO_LAYERS = ("Input", "Output", "Parameter", "Result", "Const")


def runtime_layers(compiled) -> list[RuntimeLayer]:
    """The executed layers of a CompiledModel in order (inputs, outputs and constants left out)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str)
        if layer_type in _IO_LAYERS:
            continue
        originals = tuple(n for n in info["originalLayersNames"].astype(str).split(",") if n)
        layers.append(RuntimeLayer(op.get_friendly_name(), layer_type, info["runtimePrecision"].astype(str),
                                   originals))
    return layers


class OpenVinoSession:
    """An OpenVINO CompiledModel on ``device`` ("cpu") for an ONNX detector, run like :class:`OrtSession`.

    ``threads``: inference threads (None = OpenVINO's default); ``precision``: the precision of its float layers
    ("f32" keeps the file's numerics; "bf16" / "f16" are faster where the CPU has them).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
                 precision: str = "f32") -> None:
        self.path = Path(path)
        self.provider = f"OpenVINO:{DEVICES.get(device.lower(), device)}"
        self.compiled = compile_onnx(self.path, device, threads, precision)
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs (``pred_logits``, ``pred_boxes``) as CPU torch tensors for images [B, 3, H, W]."""
        feed = image_array(images, self.input_names, "OpenVinoSession")
        self._check_channels(images)
        try:
            results = self.request.infer({self.input_names[0]: feed})
        except Exception as exc:  # shape or type mismatches from OpenVINO
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise InputError(f"OpenVINO could not run {self.path.name} on images {tuple(images.shape)}: "
                             f"{first.strip()[:200]}") from None
        return {name: torch.from_numpy(np.array(results[port])) for name, port
                in zip(self.output_names, self.compiled.outputs, strict=True)}

    def _check_channels(self, images: torch.Tensor) -> None:
        """InputError when the model's input has a fixed channel count that ``images`` does not have (OpenVINO
        does not check it for dynamic-shape models)."""
        shape = self.compiled.inputs[0].get_partial_shape()
        if shape.rank.is_static and len(shape) == 4 and shape[1].is_static and shape[1].get_length() != images.shape[1]:
            raise InputError(f"OpenVINO could not run {self.path.name} on images {tuple(images.shape)}: the model "
                             f"takes {shape[1].get_length()} channels")

    def run_feed(self, feed: np.ndarray) -> None:
        """One inference on a prepared float32 array (the timing loop's call; outputs discarded)."""
        self.request.infer({self.input_names[0]: feed})

    def layers(self) -> list[RuntimeLayer]:
        """The layers OpenVINO runs for this model (:func:`runtime_layers`)."""
        return runtime_layers(self.compiled)

    __call__ = run
