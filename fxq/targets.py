"""Runtime targets as plain data: what each runtime's integer kernels need from a quantized graph.

A :class:`TargetProfile` says how a runtime executes quantized models — which activation symmetry its kernels
read, whether a conv is fused only with an output quantizer (and of how many bits), whether it adds a conv's
bias in int32, which bit-widths it executes natively, and how the lowering stores what it cannot run natively.
:data:`TARGETS` is the one list of runtimes fxq knows. Nothing here imports a runtime: the graph passes
(:mod:`fxq.passes.runtime_prep`) and the PTQ recipe (:func:`fxq.ptq.quantize_ptq`) read the profiles as they
are, and :mod:`fxq.backends.capabilities` adds what needs onnxruntime (is the execution provider installed,
which fusion facts hold on it). The ORT CPU entries were measured on onnxruntime 1.32 (see that module).
"""

from __future__ import annotations

from dataclasses import dataclass

from fxq.errors import InputError


@dataclass(frozen=True)
class TargetProfile:
    """How one runtime executes quantized models.

    ``provider``: the onnxruntime execution provider it runs on (a name; nothing is imported);
    ``activation_symmetric``: the activation symmetry its integer kernels need (True: signed, zero-point 0;
    None: either fuses, the policy decides); ``conv_needs_output_q``: a conv is fused into an integer kernel
    only when its output is quantized (:func:`fxq.passes.runtime_prep.insert_output_quantizers` gives it one,
    of ``output_quantizer_bits``); ``int32_conv_bias``: a fused conv adds its bias in int32 with scale s_x·s_w
    (:func:`fxq.passes.runtime_prep.quantize_biases` makes the graph add the same);
    ``native_bits``: the bit-widths its integer kernels execute as such (narrower values are stored wider or
    cast); ``cast_narrow_weights``: 2–4-bit weights read with quantized activations are stored int4 and cast
    to int8 for the int8 kernels; ``weight_only_nbits``: weight-only int4 MatMul weights are blocked for
    MatMulNBits; ``activation_storage_bits``: narrower activations are stored at this width (a Clip keeping
    their range) so that the integer kernels run them; ``space_to_depth_convs``: strided convs on few channels
    (the stem) run as space-to-depth + a stride-1 conv; ``integer_kernels``: the op types that are integer
    kernels on this runtime (the lowering report's and ``fxq bench``'s "integer" column); ``verified``:
    whether the tests check this profile's facts on this machine.
    """

    name: str
    provider: str
    description: str
    activation_symmetric: bool | None = None
    conv_needs_output_q: bool = False
    output_quantizer_bits: int = 8
    int32_conv_bias: bool = False
    native_bits: tuple[int, ...] = ()
    cast_narrow_weights: bool = False
    weight_only_nbits: bool = False
    activation_storage_bits: int | None = None
    space_to_depth_convs: bool = False
    integer_kernels: tuple[str, ...] = ()
    verified: bool = False

    @property
    def prepares_graph(self) -> bool:
        """Whether the quantized graph must change for this runtime (output quantizers or int32 biases)."""
        return self.conv_needs_output_q or self.int32_conv_bias


#: Op types ORT CPU runs as integer kernels (QDQ fusions and ``quantize_static``'s QOperator output).
_ORT_CPU_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
                    "MatMulNBits", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
                    "QLinearConcat", "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearAveragePool",
                    "QLinearLeakyRelu")

TARGETS: dict[str, TargetProfile] = {
    "ort-cpu": TargetProfile(
        "ort-cpu", "CPUExecutionProvider", "onnxruntime CPU: u8 activations × s8 weights through QLinearConv, "
        "QLinearMatMul and MatMulIntegerToFloat; int4 only through MatMulNBits (weight-only) or as storage",
        conv_needs_output_q=True, output_quantizer_bits=8, int32_conv_bias=True, native_bits=(8,),
        cast_narrow_weights=True, weight_only_nbits=True, activation_storage_bits=8, space_to_depth_convs=True,
        integer_kernels=_ORT_CPU_KERNELS, verified=True),
    "ort-cuda": TargetProfile(
        "ort-cuda", "CUDAExecutionProvider", "onnxruntime CUDA: QDQ nodes run as such (few integer kernels); "
        "int4 MatMul weights through MatMulNBits", weight_only_nbits=True,
        integer_kernels=("MatMulNBits", "QOrderedMatMul")),
    "ort-tensorrt": TargetProfile(
        "ort-tensorrt", "TensorrtExecutionProvider", "TensorRT explicit quantization: consumes Q/DQ itself "
        "(symmetric s8 activations and weights)", activation_symmetric=True, native_bits=(8,),
        integer_kernels=("TRTKernel",)),
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
