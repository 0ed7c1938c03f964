"""What OpenVINO CPU makes of each QDQ pattern (the facts behind the ``openvino`` target profile), read from the
layers it runs, and the executed layer of every node of a lowered file.

Each :class:`OpenVinoFact` is one probe of :func:`fxq.backends.fusion_probes.probe_model` and the layer type and
runtime precision its compute node must run as (:func:`fxq.backends.openvino_session.runtime_layers`);
``tests/test_openvino.py`` checks every fact on the installed OpenVINO. Measured on OpenVINO 2026.4 (x86-64,
AVX-512 VNNI + AMX; rechecked on an AMD EPYC, where only the s8-activation Conv reports u8 instead of i8), in short:

- Conv with a dequantized u8 or s8 input and int8 weight runs as an int8 Convolution **with or without** an
  output QuantizeLinear (unlike ORT CPU, which needs one); an int32 bias DequantizeLinear is folded in;
- MatMul with a constant int8 weight runs as an int8 FullyConnected (u8 or s8 activations; a bias Add folds);
- MatMul of two dequantized activations (Q·Kᵀ, attention·V) runs in int8 only when both are signed with
  zero-point 0; with u8 (asymmetric, or zero-point 0) inputs it runs in fp32 on the dequantized values;
- int4 weights with quantized activations fall back to fp32 (Conv) unless stored int4 and cast to int8 (then
  int8, as on ORT); weight-only int4 MatMul weights run as a compressed-weight FullyConnected (i4), blocked or not;
- uint16 and uint4 activations run in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import onnx

from fxq.backends.node_map import COMPUTE_OPS, runtime_name
from fxq.backends.openvino_session import RuntimeLayer, compile_onnx, runtime_layers

#: Layer types that do a node's arithmetic (the layer a compute node's name maps to first).
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")


@dataclass(frozen=True)
class OpenVinoFact:
    """One QDQ pattern and the compute layer OpenVINO CPU runs it as (``layer`` type, ``precision``; "a|b" where
    the precision it reports differs by CPU)."""

    name: str
    pattern: str
    layer: str
    precision: str
    probe: dict[str, Any]

    @property
    def precisions(self) -> tuple[str, ...]:
        """The runtime precisions the fact allows."""
        return tuple(self.precision.split("|"))

    @property
    def fused(self) -> bool:
        """Whether the compute runs in an integer precision."""
        return all(p in ("u8", "i8") for p in self.precisions)


OPENVINO_FACTS: tuple[OpenVinoFact, ...] = (
    OpenVinoFact("conv_u8_without_output_q", "DQ(u8)·DQ(s8) → Conv (no output Q)", "Convolution", "u8",
                 {"op": "conv", "bias": "float"}),
    OpenVinoFact("conv_u8_output_q", "DQ(u8)·DQ(s8) → Conv → Q", "Convolution", "u8",
                 {"op": "conv", "bias": "float", "output_q": True}),
    # s8 activations: reported i8 on an Intel Xeon with AMX, u8 on an AMD EPYC (OpenVINO shifts them to u8): int8
    OpenVinoFact("conv_s8_without_output_q", "DQ(s8)·DQ(s8) → Conv", "Convolution", "i8|u8",
                 {"op": "conv", "act": "int8", "bias": "float"}),
    OpenVinoFact("conv_int32_bias", "DQ(u8)·DQ(s8) → Conv(DQ(int32 bias)) → Q", "Convolution", "u8",
                 {"op": "conv", "bias": "int32", "output_q": True}),
    OpenVinoFact("conv_int4_weight", "DQ(u8)·DQ(int4) → Conv → Q: fp32", "Convolution", "f32",
                 {"op": "conv", "weight": "int4", "output_q": True}),
    OpenVinoFact("conv_int4_cast_int8", "DQ(u8)·DQ(Cast(int4 → int8)) → Conv → Q", "Convolution", "u8",
                 {"op": "conv", "weight": "int4_cast", "bias": "float", "output_q": True}),
    OpenVinoFact("conv_u16_activations", "DQ(u16)·DQ(s8) → Conv → Q(u16): fp32", "Convolution", "f32",
                 {"op": "conv", "act": "uint16", "output_q": True}),
    OpenVinoFact("conv_u4_activations", "DQ(u4)·DQ(int4) → Conv → Q(u4): fp32", "Convolution", "f32",
                 {"op": "conv", "act": "uint4", "weight": "int4", "output_q": True}),
    OpenVinoFact("matmul_weight_u8", "DQ(u8)·DQ(s8 per-channel) → MatMul", "FullyConnected", "u8",
                 {"op": "matmul"}),
    OpenVinoFact("matmul_weight_s8", "DQ(s8)·DQ(s8 per-channel) → MatMul", "FullyConnected", "i8",
                 {"op": "matmul", "act": "int8"}),
    OpenVinoFact("matmul_weight_bias", "DQ(u8)·DQ(s8) → MatMul → Add(bias), dynamic shapes", "FullyConnected", "u8",
                 {"op": "matmul", "bias": "float", "static": False}),
    OpenVinoFact("matmul_activations_u8", "DQ(u8)·Transpose(DQ(u8)) → MatMul (Q·Kᵀ, asymmetric): fp32", "MatMul",
                 "f32", {"op": "matmul_act"}),
    OpenVinoFact("matmul_activations_s8", "DQ(s8)·Transpose(DQ(s8)) → MatMul (Q·Kᵀ, symmetric)", "MatMul", "i8",
                 {"op": "matmul_act", "act": "int8"}),
    OpenVinoFact("matmul_int4_cast_int8", "DQ(u8)·DQ(Cast(int4 → int8)) → MatMul", "FullyConnected", "u8",
                 {"op": "matmul", "weight": "int4_cast"}),
    OpenVinoFact("matmul_int4_weight_only", "float x · DQ(int4, per channel) → MatMul: compressed weights",
                 "FullyConnected", "i4", {"op": "matmul", "act": None, "weight": "int4"}),
)


def probe_layers(model: onnx.ModelProto) -> list[RuntimeLayer]:
    """The layers OpenVINO CPU runs for a probe model (fp32 float layers, 1 thread)."""
    return runtime_layers(compile_onnx(model.SerializeToString(), "cpu", threads=1))


def compute_layer(layers: list[RuntimeLayer]) -> RuntimeLayer | None:
    """The one compute layer of a probe's runtime graph (None when there is none)."""
    return next((layer for layer in layers if layer.layer_type in COMPUTE_LAYERS), None)


def layer_counts(path: str | os.PathLike, threads: int | None = 1) -> dict[str, int]:
    """How many layers of each "type/precision" OpenVINO CPU runs for the model at ``path``."""
    counts: dict[str, int] = {}
    for layer in runtime_layers(compile_onnx(path, "cpu", threads=threads)):
        counts[layer.kernel] = counts.get(layer.kernel, 0) + 1
    return counts


#: The kernel of a compute node OpenVINO computed at load time (its inputs are constants) and does not run.
FOLDED = "folded"


def executed_layers(path: str | os.PathLike, threads: int | None = 1) -> dict[str, str]:
    """{ONNX node name: "layer type/precision"} of the layer OpenVINO CPU runs each node of ``path`` in, a node
    fused into a compute layer mapping to that layer; Conv / MatMul / Gemm nodes in no layer map to
    :data:`FOLDED`."""
    kernels: dict[str, str] = {}
    layers = runtime_layers(compile_onnx(path, "cpu", threads=threads))
    ordered = sorted(layers, key=lambda layer: layer.layer_type not in COMPUTE_LAYERS)
    for layer in ordered:
        for original in layer.originals:
            kernels.setdefault(_node_name(original), layer.kernel)
    for node in onnx.load(os.fspath(path), load_external_data=False).graph.node:
        if node.op_type in COMPUTE_OPS and node.name:
            kernels.setdefault(node.name, FOLDED)
    return kernels


#: Suffixes OpenVINO gives the parts of an ONNX node it splits (a Conv's bias, a MatMul's dequantization).
_PART_SUFFIXES = ("/WithoutBiases", "/DequantizationMultiply", "/DequantizationSubtract", "/bias", "_original")


def _node_name(original: str) -> str:
    for suffix in _PART_SUFFIXES:
        if original.endswith(suffix):
            return runtime_name(original[: -len(suffix)])
    return runtime_name(original)
