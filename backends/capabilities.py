"""What each runtime offers: execution providers by short name, and per runtime the QDQ patterns its
optimizer turns into integer kernels (the capability table the runtime-aware lowering follows).

ORT CPU facts were measured on onnxruntime 1.32 (x86-64, AVX-512 VNNI) by building one-operator QDQ models
(:mod:`fxq.backends.fusion_probes`) and reading the graph onnxruntime runs; ``tests/test_runtime_lowering.py``
checks every :class:`FusionFact` on the installed onnxruntime. In short:

- Conv with dequantized u8/s8 input and int8 weight (per-channel or per-tensor) → QLinearConv, **only with an
  output QuantizeLinear** (a Relu in between is dropped when the zero-point is the range's minimum); the bias
  may be float (onnxruntime quantizes it to int32 with scale s_x·s_w) or int32. Without output Q it stays a
  float Conv that dequantizes its weight on every run.
- MatMul with dequantized inputs (constant int8 weight, or two activations as in Q·Kᵀ, a Transpose allowed)
  → MatMulIntegerToFloat, or QLinearMatMul with an output Q. A bias Add stays a float Add with dynamic shapes;
  with static shapes MatMul+Add first become a float Gemm (MatMulAddFusion), so the lowering keeps shapes
  dynamic.
- int4 / uint4 weights are never fused with quantized activations; stored int4 and Cast to int8 before the
  DequantizeLinear they are (onnxruntime folds the Cast at load). Weight-only int4 MatMul weights in blocks
  (DequantizeLinear ``block_size``) → MatMulNBits.
- uint16 and uint4 activations are not fused (float kernels on dequantized values).
- u8 activations with s8 weights are the fast path (VNNI); s8 activations fuse but ran 2.4× slower on
  DETR-R50 (DESIGN.md §4).

CUDA and TensorRT entries are listed only when their execution provider is installed; their facts are not
verified here (no GPU build of onnxruntime in this environment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from fxq.errors import InputError

#: Short provider names and the onnxruntime execution providers they select.
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers: known short names first, then full names."""
    installed = ort.get_available_providers()
    known = [name for name, provider in PROVIDERS.items() if provider in installed]
    return known + [p for p in installed if p not in PROVIDERS.values()]


def resolve_provider(name: str) -> str:
    """The onnxruntime provider for ``name`` ("cpu", "cuda", "tensorrt" or a full provider name).

    InputError naming the available providers when it is not installed.
    """
    provider = PROVIDERS.get(name.lower(), name) if isinstance(name, str) else name
    if provider not in ort.get_available_providers():
        raise InputError(
            f"execution provider {name!r} ({provider}) is not available in this onnxruntime "
            f"({ort.__version__}); available: {', '.join(available_providers())}. Install the matching "
            f"onnxruntime build (e.g. onnxruntime-gpu for cuda/tensorrt) or use provider='cpu'"
        )
    return provider


@dataclass(frozen=True)
class FusionFact:
    """One QDQ pattern and what the runtime's optimizer makes of it.

    ``probe``: keyword arguments of :func:`fxq.backends.fusion_probes.probe_model`; ``kernel``: the op type
    the optimized graph must contain; ``absent``: op types it must not contain (e.g. the float op).
    """

    name: str
    pattern: str
    kernel: str
    probe: dict[str, Any]
    absent: tuple[str, ...] = ()
    fused: bool = True


_INTEGER_CONV = ("Conv",)
_INTEGER_MATMUL = ("MatMul", "Gemm")

ORT_CPU_FACTS: tuple[FusionFact, ...] = (
    FusionFact("conv_u8s8_output_q", "DQ(u8)·DQ(s8 per-channel) → Conv(float bias) → Q", "QLinearConv",
               {"op": "conv", "bias": "float", "output_q": True}, _INTEGER_CONV),
    FusionFact("conv_int32_bias", "DQ(u8)·DQ(s8) → Conv(DQ(int32 bias, s_x·s_w)) → Q", "QLinearConv",
               {"op": "conv", "bias": "int32", "output_q": True}, _INTEGER_CONV),
    FusionFact("conv_relu_output_q", "DQ(u8)·DQ(s8) → Conv → Relu → Q(zero-point 0)", "QLinearConv",
               {"op": "conv", "bias": "float", "relu": True, "output_q": True}, ("Conv", "Relu")),
    FusionFact("conv_s8s8_output_q", "DQ(s8)·DQ(s8) → Conv → Q (fused, slower than u8s8 on x86)", "QLinearConv",
               {"op": "conv", "act": "int8", "bias": "float", "output_q": True}, _INTEGER_CONV),
    FusionFact("conv_without_output_q", "DQ(u8)·DQ(s8) → Conv (no output Q): float Conv", "Conv",
               {"op": "conv", "bias": "float"}, ("QLinearConv", "ConvInteger"), fused=False),
    FusionFact("conv_int4_weight", "DQ(u8)·DQ(int4) → Conv → Q: float Conv", "Conv",
               {"op": "conv", "weight": "int4", "output_q": True}, ("QLinearConv",), fused=False),
    FusionFact("conv_int4_cast_int8", "DQ(u8)·DQ(Cast(int4 → int8)) → Conv → Q", "QLinearConv",
               {"op": "conv", "weight": "int4_cast", "bias": "float", "output_q": True}, _INTEGER_CONV),
    FusionFact("conv_u16_activations", "DQ(u16)·DQ(s8) → Conv → Q(u16): float Conv", "Conv",
               {"op": "conv", "act": "uint16", "output_q": True}, ("QLinearConv",), fused=False),
    FusionFact("conv_u4_activations", "DQ(u4)·DQ(int4) → Conv → Q(u4): float Conv", "Conv",
               {"op": "conv", "act": "uint4", "weight": "int4", "output_q": True}, ("QLinearConv",), fused=False),
    FusionFact("matmul_weight", "DQ(u8)·DQ(s8 per-channel) → MatMul", "MatMulIntegerToFloat",
               {"op": "matmul"}, _INTEGER_MATMUL),
    FusionFact("matmul_weight_output_q", "DQ(u8)·DQ(s8) → MatMul → Q", "QLinearMatMul",
               {"op": "matmul", "output_q": True}, _INTEGER_MATMUL),
    FusionFact("matmul_weight_bias_dynamic", "DQ(u8)·DQ(s8) → MatMul → Add(bias), dynamic shapes",
               "MatMulIntegerToFloat", {"op": "matmul", "bias": "float", "static": False}, _INTEGER_MATMUL),
    FusionFact("matmul_weight_bias_static", "DQ(u8)·DQ(s8) → MatMul → Add(bias), static shapes: float Gemm",
               "Gemm", {"op": "matmul", "bias": "float"}, ("MatMulIntegerToFloat",), fused=False),
    FusionFact("matmul_activations", "DQ(u8)·Transpose(DQ(u8)) → MatMul (Q·Kᵀ)", "MatMulIntegerToFloat",
               {"op": "matmul_act"}, _INTEGER_MATMUL),
    FusionFact("matmul_activations_output_q", "DQ(u8)·DQ(u8) → MatMul → Q", "QLinearMatMul",
               {"op": "matmul_act", "output_q": True}, _INTEGER_MATMUL),
    FusionFact("matmul_int4_weight", "DQ(u8)·DQ(int4) → MatMul: float MatMul", "MatMul",
               {"op": "matmul", "weight": "int4"}, ("MatMulIntegerToFloat", "MatMulNBits"), fused=False),
    FusionFact("matmul_int4_cast_int8", "DQ(u8)·DQ(Cast(int4 → int8)) → MatMul", "MatMulIntegerToFloat",
               {"op": "matmul", "weight": "int4_cast"}, _INTEGER_MATMUL),
    FusionFact("matmul_int4_blocked_weight_only", "float x · DQ(int4, blocks along K) → MatMul", "MatMulNBits",
               {"op": "matmul", "act": None, "weight": "int4_blocked"}, ("MatMul", "DequantizeLinear")),
)


@dataclass(frozen=True)
class RuntimeCapabilities:
    """How the runtime-aware lowering places precision on one runtime.

    ``cast_narrow_weights``: 2–4-bit weights read with quantized activations are stored int4 and cast to
    int8 for the int8 kernels; ``weight_only_nbits``: weight-only int4 MatMul weights are blocked for
    MatMulNBits; ``int32_conv_bias``: a fused Conv's bias is stored int32 (s_x·s_w);
    ``conv_needs_output_q``: a Conv is fused only with an output quantizer (see
    :func:`fxq.passes.runtime_prep.insert_output_quantizers`); ``activation_storage_bits``: narrower
    activations are stored at this width (with a Clip keeping their range) so that the int8 kernels run them;
    ``space_to_depth_convs``: strided convs on few channels (the stem) run as space-to-depth + stride-1 conv
    (:mod:`fxq.backends.space_to_depth`);
    ``verified``: whether ``facts`` are checked by the tests on this machine.
    """

    name: str
    provider: str
    description: str
    cast_narrow_weights: bool = False
    weight_only_nbits: bool = False
    int32_conv_bias: bool = False
    conv_needs_output_q: bool = False
    activation_storage_bits: int | None = None
    space_to_depth_convs: bool = False
    integer_kernels: tuple[str, ...] = ()
    facts: tuple[FusionFact, ...] = field(default=())
    verified: bool = False


RUNTIMES: dict[str, RuntimeCapabilities] = {
    "ort-cpu": RuntimeCapabilities(
        "ort-cpu", "CPUExecutionProvider", "onnxruntime CPU: u8 activations × s8 weights through QLinearConv, "
        "QLinearMatMul and MatMulIntegerToFloat; int4 only through MatMulNBits (weight-only) or as storage",
        cast_narrow_weights=True, weight_only_nbits=True, int32_conv_bias=True, conv_needs_output_q=True,
        activation_storage_bits=8, space_to_depth_convs=True,
        integer_kernels=("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
                         "QGemm", "MatMulNBits", "DynamicQuantizeMatMul", "QLinearAdd"),
        facts=ORT_CPU_FACTS, verified=True),
    "ort-cuda": RuntimeCapabilities(
        "ort-cuda", "CUDAExecutionProvider", "onnxruntime CUDA: QDQ nodes run as such (few integer kernels); "
        "int4 MatMul weights through MatMulNBits", weight_only_nbits=True,
        integer_kernels=("MatMulNBits", "QOrderedMatMul")),
    "ort-tensorrt": RuntimeCapabilities(
        "ort-tensorrt", "TensorrtExecutionProvider", "TensorRT explicit quantization: consumes Q/DQ itself "
        "(symmetric s8 activations and weights)", integer_kernels=("TRTKernel",)),
}


def runtime_capabilities(name: str) -> RuntimeCapabilities:
    """The capability table of runtime ``name`` ("ort-cpu", "ort-cuda", "ort-tensorrt").

    InputError for an unknown runtime, or one whose execution provider is not installed (naming those that are).
    """
    if name not in RUNTIMES:
        raise InputError(f"runtime {name!r} is unknown; use one of {', '.join(RUNTIMES)} "
                         f"(installed here: {', '.join(available_runtimes())})")
    caps = RUNTIMES[name]
    resolve_provider(caps.provider)
    return caps


def available_runtimes() -> list[str]:
    """The runtimes of :data:`RUNTIMES` whose execution provider this onnxruntime has."""
    installed = ort.get_available_providers()
    return [name for name, caps in RUNTIMES.items() if caps.provider in installed]
