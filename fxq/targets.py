"""Runtime targets as plain data: what each runtime's integer kernels need from a quantized graph.

A :class:`TargetProfile` says how a runtime executes quantized models — which activation symmetry its kernels
read, whether a conv is fused only with an output quantizer (and of how many bits), whether it adds a conv's
bias in int32, which bit-widths it executes natively, and how the lowering stores what it cannot run natively.
:data:`TARGETS` is the one list of runtimes fxq knows. Nothing here imports a runtime: the graph passes
(:mod:`fxq.passes.runtime_prep`) and the PTQ recipe (:func:`fxq.ptq.quantize_ptq`) read the profiles as they
are, and :mod:`fxq.backends.capabilities` adds what needs the runtime (is it installed, which fusion facts hold
on it). The ORT CPU entries were measured on onnxruntime 1.32 (see that module), the OpenVINO entries on
OpenVINO 2026.4 (:mod:`fxq.backends.openvino_facts`); the TensorRT entries follow NVIDIA's explicit-quantization
rules (:mod:`fxq.backends.tensorrt_rules`, which cites them and checks a file against them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fxq.errors import InputError


@dataclass(frozen=True)
class TargetProfile:
    """How one runtime executes quantized models.

    ``provider``: the onnxruntime execution provider it runs on (a name; nothing is imported), or for
    ``engine="openvino"`` the OpenVINO device; ``engine``: what runs the file ("onnxruntime", "openvino", or
    "tensorrt": TensorRT's own parser, whose placement rules the lowering checks structurally, so that a file
    for it is written and checked without TensorRT installed);
    ``activation_symmetric``: the activation symmetry its integer kernels need (True: signed, zero-point 0;
    None: either fuses, the policy decides); ``conv_needs_output_q``: a conv is fused into an integer kernel
    only when its output is quantized (:func:`fxq.passes.runtime_prep.insert_output_quantizers` gives it one,
    of ``output_quantizer_bits``); ``int32_conv_bias``: a fused conv adds its bias in int32 with scale s_x·s_w
    (:func:`fxq.passes.runtime_prep.quantize_biases` makes the graph add the same);
    ``native_bits``: the bit-widths its integer kernels execute as such (narrower values are stored wider or
    cast); ``cast_narrow_weights``: 2–4-bit weights read with quantized activations are stored int4 and cast
    to int8 for the int8 kernels; ``weight_only_nbits``: weight-only int4 MatMul weights are blocked for
    MatMulNBits; ``activation_storage_bits``: narrower activations are stored at this width (a Clip keeping
    their range) so that the integer kernels run them; ``weight_storage_bits``: narrower weights are stored at
    this width (same integers) for a runtime whose 4-bit weights are weight-only; ``space_to_depth_convs``:
    strided convs on few channels (the stem) run as space-to-depth + a stride-1 conv; ``qdq_on_weighted_inputs``:
    activation Q/DQ sit directly on the weighted op's input (moved below Transpose / Reshape);
    ``int8_sampling_core``: Deformable DETR's sampling core runs on a uint8 value table with MatMulInteger
    (:func:`fxq.passes.sampling_values.quantize_sampling_values`); ``fused_matmul_bias``: a quantized linear with an
    unquantized output is written as com.microsoft MatMulIntegerToFloat with its bias as input 6
    (:mod:`fxq.backends.matmul_bias`; onnxruntime leaves that Add unfused); ``integer_kernels``: the
    op types that are integer kernels on this runtime (the lowering report's and ``fxq bench``'s "integer"
    column); ``verified``: whether the tests check this profile's facts on this machine.
    """

    name: str
    provider: str
    description: str
    engine: str = "onnxruntime"
    activation_symmetric: bool | None = None
    conv_needs_output_q: bool = False
    output_quantizer_bits: int = 8
    int32_conv_bias: bool = False
    native_bits: tuple[int, ...] = ()
    cast_narrow_weights: bool = False
    weight_only_nbits: bool = False
    activation_storage_bits: int | None = None
    weight_storage_bits: int | None = None
    space_to_depth_convs: bool = False
    qdq_on_weighted_inputs: bool = False
    int8_sampling_core: bool = False
    fused_matmul_bias: bool = False
    integer_kernels: tuple[str, ...] = ()
    verified: bool = False

    @property
    def prepares_graph(self) -> bool:
        """Whether the quantized graph must change for this runtime (output quantizers or int32 biases)."""
        return self.conv_needs_output_q or self.int32_conv_bias or self.int8_sampling_core


#: Op types ORT CPU runs as integer kernels (QDQ fusions and ``quantize_static``'s QOperator output).
_ORT_CPU_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
                    "MatMulNBits", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
                    "QLinearConcat", "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearAveragePool",
                    "QLinearLeakyRelu")

_ORT_CPU = TargetProfile(
    "ort-cpu", "CPUExecutionProvider", "onnxruntime CPU: u8 activations × s8 weights through QLinearConv, "
    "QLinearMatMul and MatMulIntegerToFloat; int4 only through MatMulNBits (weight-only) or as storage",
    conv_needs_output_q=True, output_quantizer_bits=8, int32_conv_bias=True, native_bits=(8,),
    cast_narrow_weights=True, weight_only_nbits=True, activation_storage_bits=8, space_to_depth_convs=True,
    int8_sampling_core=True, fused_matmul_bias=True, integer_kernels=_ORT_CPU_KERNELS, verified=True)

#: OpenVINO CPU layers ("layer type/runtime precision" of its runtime model) that compute in int8 (a Subgraph is
#: a fused kernel, e.g. attention's MatMul + Softmax + MatMul), and its compressed-weight FullyConnected.
_OPENVINO_KERNELS = tuple(f"{layer}/{precision}" for layer in ("Convolution", "GroupConvolution", "FullyConnected",
                                                               "MatMul", "Subgraph") for precision in ("u8", "i8")) + (
    "FullyConnected/i4",)

#: TensorRT explicit quantization (:mod:`fxq.backends.tensorrt_rules`): int8 Q/DQ, zero-points 0, per-tensor
#: activations, per-channel weights on the output axis, float biases, no conv output quantizer required.
_TENSORRT = TargetProfile(
    "tensorrt", "TensorrtExecutionProvider", "TensorRT explicit quantization: signed symmetric int8 activations "
    "(per-tensor), symmetric int8 weights per output channel, Q/DQ on the inputs of Conv / MatMul / Gemm only; "
    "4-bit weights stored int8 (TensorRT's int4 is weight-only)", engine="tensorrt", activation_symmetric=True,
    native_bits=(8,), activation_storage_bits=8, weight_storage_bits=8, qdq_on_weighted_inputs=True,
    integer_kernels=("Conv", "MatMul", "Gemm"))

TARGETS: dict[str, TargetProfile] = {
    "ort-cpu": _ORT_CPU,
    "ort-cuda": TargetProfile(
        "ort-cuda", "CUDAExecutionProvider", "onnxruntime CUDA: QDQ nodes run as such (few integer kernels); "
        "int4 MatMul weights through MatMulNBits", weight_only_nbits=True,
        integer_kernels=("MatMulNBits", "QOrderedMatMul")),
    "ort-tensorrt": dataclasses.replace(
        _TENSORRT, name="ort-tensorrt", description="TensorRT through onnxruntime's TensorRT execution provider: the "
        "file of the tensorrt target, lowered only where that provider is installed", engine="onnxruntime"),
    "openvino": dataclasses.replace(
        _ORT_CPU, name="openvino", provider="CPU", engine="openvino", weight_only_nbits=False,
        int8_sampling_core=False,  # measured: OpenVINO 2026.4 ran Deformable DETR-R50 slower than fp32 with it
        fused_matmul_bias=False,  # a com.microsoft op: onnxruntime only
        integer_kernels=_OPENVINO_KERNELS, description="OpenVINO CPU: the ort-cpu placement (measured fastest there "
        "too: output-quantized convs and residual adds keep the backbone int8 layer to layer); u8 × s8 Convolution "
        "and FullyConnected in int8, attention matmuls in fp32 (OpenVINO runs them in int8 only with signed "
        "inputs, which measured no faster)"),
    "tensorrt": _TENSORRT,
}


def target_profile(target: str | TargetProfile) -> TargetProfile:
    """The profile of ``target`` (a name of :data:`TARGETS`, or a profile, returned as is).

    InputError naming the known targets for an unknown name.
    """
    if isinstance(target, TargetProfile):
        return target
    if target not in TARGETS:
        raise InputError(f"runtime target {target!r} is unknown; use one of {', '.join(TARGETS)}")
    return TARGETS[target]
