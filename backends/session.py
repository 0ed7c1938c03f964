"""An onnxruntime session over a lowered detector: batched image tensor in, named torch tensors out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fxq.backends.capabilities import resolve_provider
from fxq.errors import InputError

#: Graph optimization levels by name.
OPTIMIZATIONS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: ORT fuses a weight-only DequantizeLinear→MatMul into MatMulNBits; at accuracy level 4 (ORT's default) that
#: kernel quantizes the activations to int8 on the fly, which is not the graph's numerics; 1 computes in fp32.
MATMULNBITS_ACCURACY_LEVEL = 1


def _options(threads: int | None, optimization: str, accuracy_level: int) -> ort.SessionOptions:
    if optimization not in OPTIMIZATIONS:
        raise InputError(f"optimization={optimization!r} is unknown; use one of {list(OPTIMIZATIONS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads={threads!r} must be a positive integer (or None for onnxruntime's default)")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATIONS[optimization]
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _open(path: Path, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    if not path.is_file():
        raise InputError(f"ONNX model {str(path)!r} does not exist; write one with fxq.backends.lower_to_onnx")
    try:
        return ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{str(path)!r} is not an ONNX model onnxruntime can load ({first}); pass a .onnx file "
                         "written by fxq.backends.lower_to_onnx or torch.onnx.export") from None


class OrtSession:
    """An onnxruntime InferenceSession on ``provider`` ("cpu", "cuda", "tensorrt") for an ONNX detector.

    ``threads`` sets the intra-op thread count (None = onnxruntime's default); ``optimization`` the graph
    optimization level ("disable", "basic", "extended", "all"); ``matmulnbits_accuracy_level`` the compute
    type of fused MatMulNBits kernels (1 = fp32, the graph's numerics; 4 = int8 activations, faster).
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", *, threads: int | None = None,
                 optimization: str = "all", matmulnbits_accuracy_level: int = MATMULNBITS_ACCURACY_LEVEL) -> None:
        self.path = Path(path)
        self.provider = resolve_provider(provider)
        options = _options(threads, optimization, matmulnbits_accuracy_level)
        self.session = _open(self.path, options, self.provider)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs (``pred_logits``, ``pred_boxes``) as CPU torch tensors for images [B, 3, H, W]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a float tensor [B, 3, H, W], got {got}")
        if len(self.input_names) != 1:
            raise InputError(f"the model takes inputs {self.input_names}; OrtSession.run feeds images only")
        feed = {self.input_names[0]: np.ascontiguousarray(images.detach().cpu().to(torch.float32).numpy())}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as exc:  # shape or type mismatches from onnxruntime
            raise InputError(f"onnxruntime could not run {self.path.name} on images {tuple(images.shape)}: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outputs, strict=True)}

    __call__ = run
