"""What each runtime offers here: execution providers by short name, the runtimes installed, and the QDQ
patterns ORT CPU's optimizer turns into integer kernels (the facts behind the ``ort-cpu`` profile).

The runtimes and their flags are the plain-data profiles of :data:`fxq.targets.TARGETS`;
:func:`runtime_capabilities` returns a runtime's profile once its execution provider is known to be installed.

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
  DETR-R50 (docs/METHODS.md, "Runtime facts").

CUDA and TensorRT runtimes are available only when their execution provider is installed; their profiles are
not verified here (no GPU build of onnxruntime in this environment). The ``tensorrt`` target is lowered without
TensorRT: its file is checked against TensorRT's placement rules (:mod:`fxq.backends.tensorrt_rules`). The
``openvino`` target needs the openvino package (:mod:`fxq.backends.openvino_facts` holds its facts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from fxq.errors import InputError
from fxq.targets import TARGETS, TargetProfile

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


def runtime_capabilities(name: str) -> TargetProfile:
    """The profile of runtime ``name`` (:data:`fxq.targets.TARGETS`: "ort-cpu", "ort-cuda", "ort-tensorrt",
    "openvino", "tensorrt"), checked to be lowerable and verifiable here: an onnxruntime target's execution
    provider is installed, OpenVINO is importable for "openvino"; "tensorrt" needs nothing (structural check).

    InputError for an unknown runtime, or one that is not installed (naming those that are, or the pip package).
    """
    if name not in TARGETS:
        raise InputError(f"runtime {name!r} is unknown; use one of {', '.join(TARGETS)} "
                         f"(installed here: {', '.join(available_runtimes())})")
    profile = TARGETS[name]
    if profile.engine == "onnxruntime":
        resolve_provider(profile.provider)
    elif profile.engine == "openvino":
        from fxq.backends.openvino_session import require_openvino

        require_openvino()
    return profile


def available_runtimes() -> list[str]:
    """The runtimes of :data:`fxq.targets.TARGETS` that can be lowered for and verified here."""
    return [name for name in TARGETS if _installed(TARGETS[name])]


def _installed(profile: TargetProfile) -> bool:
    if profile.engine == "onnxruntime":
        return profile.provider in ort.get_available_providers()
    if profile.engine == "openvino":
        from fxq.backends.openvino_session import openvino_version

        return openvino_version() is not None
    return True


def runtime_of_provider(provider: str) -> str:
    """The runtime of :data:`fxq.targets.TARGETS` that runs on execution provider ``provider`` (a short or
    full name, or "openvino"); InputError when the provider is not installed or no runtime runs on it."""
    if isinstance(provider, str) and provider.lower() == "openvino":
        return runtime_capabilities("openvino").name
    full = resolve_provider(provider)
    for name, profile in TARGETS.items():
        if profile.provider == full and profile.engine == "onnxruntime":
            return name
    raise InputError(f"no runtime target of fxq runs on {full}; use a provider of {', '.join(TARGETS)}")
