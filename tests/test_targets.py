"""Runtime target profiles (fxq.targets) and the one PTQ recipe that reads them (fxq.ptq.quantize_ptq).

The ort-cpu profile is checked against the fusion facts that tests/test_runtime_lowering.py verifies on the
live onnxruntime; the recipe is checked against the passes run by hand, and each of the profile's flags
against what it must (and must not) change in the graph.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fxq
from fxq.backends.capabilities import ORT_CPU_FACTS
from fxq.passes.calibrate import calibrate
from fxq.passes.insert_quant import insert_quantizers, quantizers
from fxq.passes.policy import annotate_policy
from fxq.passes.runtime_prep import insert_output_quantizers, quantize_biases
from fxq.ptq import float_graph, quantize_ptq
from fxq.quant import QSpec
from fxq.targets import TARGETS, TargetProfile, target_profile

SIZE = (64, 64)
ORT_CPU = TARGETS["ort-cpu"]


@pytest.fixture(scope="module")
def fgm():
    torch.manual_seed(0)
    return float_graph(fxq.models.build("detr_tiny", pretrained=False), SIZE)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, *SIZE, generator=g) for _ in range(3)]


def _outputs(gm, x):
    with torch.no_grad():
        return gm(x)


def _assert_same_graph(a, b, x):
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = _outputs(a, x), _outputs(b, x)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def _roles(gm) -> set[str]:
    return {n.meta.get("fxq.role") for n in gm.graph.nodes}


def _output_quantizers(gm) -> dict[str, torch.nn.Module]:
    return {k: q for k, q in quantizers(gm).items() if k in {n.meta.get("fxq.output_quantizer")
                                                              for n in gm.graph.nodes}}


# -- the profiles ----------------------------------------------------------------------------------------


def test_ort_cpu_profile_agrees_with_its_verified_fusion_facts():
    facts = {f.name: f for f in ORT_CPU_FACTS}
    assert ORT_CPU.verified and ORT_CPU.provider == "CPUExecutionProvider"
    assert ORT_CPU.conv_needs_output_q == (facts["conv_u8s8_output_q"].fused
                                           and not facts["conv_without_output_q"].fused)
    assert ORT_CPU.int32_conv_bias == facts["conv_int32_bias"].fused
    assert ORT_CPU.cast_narrow_weights == (facts["conv_int4_cast_int8"].fused and not facts["conv_int4_weight"].fused)
    assert ORT_CPU.weight_only_nbits == facts["matmul_int4_blocked_weight_only"].fused
    assert ORT_CPU.activation_storage_bits == 8 and not facts["conv_u4_activations"].fused
    for fact in ORT_CPU_FACTS:
        assert (fact.kernel in ORT_CPU.integer_kernels) == fact.fused, fact.name


def test_every_profile_is_plain_and_named_by_its_key():
    for name, profile in TARGETS.items():
        assert profile.name == name and profile.engine in ("onnxruntime", "openvino", "tensorrt")
        assert profile.provider.endswith("ExecutionProvider") or profile.engine == "openvino"
        assert all(8 <= b <= 16 for b in profile.native_bits)
        assert profile.output_quantizer_bits in (8, 16)
        assert profile.prepares_graph == (profile.conv_needs_output_q or profile.int32_conv_bias
                                          or profile.int8_sampling_core)
    assert [n for n, p in TARGETS.items() if p.prepares_graph] == ["ort-cpu", "openvino"]


def test_tensorrt_profiles_are_one_placement():
    """tensorrt (lowered anywhere, rules checked structurally) and ort-tensorrt (through onnxruntime's TensorRT
    provider) write the same file: signed symmetric activations, no graph preparation, 4-bit weights as int8."""
    trt, ort_trt = TARGETS["tensorrt"], TARGETS["ort-tensorrt"]
    assert dataclasses.replace(ort_trt, name="tensorrt", description=trt.description, engine="tensorrt") == trt
    assert trt.activation_symmetric and not trt.prepares_graph and trt.weight_storage_bits == 8


def test_openvino_reuses_the_ort_cpu_placement():
    """OpenVINO measured fastest with ort-cpu's placement (benchmarks/RESULTS.md, "OpenVINO and TensorRT
    runtimes"): the two profiles differ only in what runs the file, how its kernels are named, and the int8 sampling
    core of Deformable DETR (OpenVINO ran Deformable DETR-R50 slower with it: RESULTS.md, "int8 sampling core") and
    the bias folded into com.microsoft MatMulIntegerToFloat (an onnxruntime op)."""
    openvino = TARGETS["openvino"]
    same = dataclasses.replace(openvino, name="ort-cpu", provider=ORT_CPU.provider, engine="onnxruntime",
                               description=ORT_CPU.description, integer_kernels=ORT_CPU.integer_kernels,
                               weight_only_nbits=ORT_CPU.weight_only_nbits, int8_sampling_core=True,
                               fused_matmul_bias=True)
    assert same == ORT_CPU and not openvino.int8_sampling_core and not openvino.fused_matmul_bias


def test_target_profile_lookup():
    assert target_profile("ort-cpu") is ORT_CPU
    custom = dataclasses.replace(ORT_CPU, name="mine")
    assert target_profile(custom) is custom
    with pytest.raises(fxq.InputError, match="'tflite' is unknown.*ort-cpu, ort-cuda, ort-tensorrt") as err:
        target_profile("tflite")
    assert "\n" not in str(err.value)


# -- the recipe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, method", [("W4A8", "minmax"), ("W8A8", "mse")])
def test_recipe_for_ort_cpu_is_the_passes_in_order(fgm, calib, policy, method):
    got = quantize_ptq(fgm, calib, policy, method, progress=False, target="ort-cpu", num_batches=2)
    ref = copy.deepcopy(fgm)
    observers = {"a_observer": method, "w_observer": "minmax" if method == "minmax" else method}
    annotate_policy(ref, policy, **observers)
    insert_quantizers(ref)
    insert_output_quantizers(ref, "ort-cpu")
    calibrate(ref, calib, num_batches=2, progress=False)
    quantize_biases(ref, "ort-cpu")
    _assert_same_graph(got, ref, calib[0])


def test_recipe_without_target_is_the_plain_recipe(fgm, calib):
    plain = quantize_ptq(fgm, calib, "W8A8", progress=False)
    assert not {"bias_quantize"} & _roles(plain) and not _output_quantizers(plain)
    inert = dataclasses.replace(ORT_CPU, name="inert", conv_needs_output_q=False, int32_conv_bias=False)
    _assert_same_graph(quantize_ptq(fgm, calib, "W8A8", progress=False, target=inert), plain, calib[0])
    prepared = quantize_ptq(fgm, calib, "W8A8", progress=False, target="ort-cpu")
    assert "bias_quantize" in _roles(prepared) and _output_quantizers(prepared)
    assert set(plain.state_dict()) < set(prepared.state_dict())


def test_each_flag_adds_only_its_own_nodes(fgm, calib):
    bias_only = dataclasses.replace(ORT_CPU, name="bias-only", conv_needs_output_q=False)
    gm = quantize_ptq(fgm, calib, "W8A8", progress=False, target=bias_only)
    assert "bias_quantize" in _roles(gm) and not _output_quantizers(gm)
    outputs_only = dataclasses.replace(ORT_CPU, name="outputs-only", int32_conv_bias=False)
    gm = quantize_ptq(fgm, calib, "W8A8", progress=False, target=outputs_only)
    assert "bias_quantize" not in _roles(gm) and _output_quantizers(gm)


@pytest.mark.parametrize("bits", [8, 16])
def test_output_quantizer_bits_come_from_the_profile(fgm, calib, bits):
    target = dataclasses.replace(ORT_CPU, name=f"out{bits}", output_quantizer_bits=bits)
    gm = quantize_ptq(fgm, calib, "W8A8", progress=False, target=target)
    convs = [n for n in gm.graph.nodes if n.meta.get("fxq.role") == "conv" and "fxq.qspec" in n.meta]
    qs = quantizers(gm)
    assert convs and all(qs[c.meta["fxq.output_quantizer"]].qrange.bits == bits for c in convs)
    inserted = [c for c in convs if c.meta["fxq.output_quantizer_action"] == "inserted"]
    assert inserted and all(c.meta["fxq.output_quantizer"].endswith(f"_oq{bits}") for c in inserted)


@pytest.mark.parametrize("policy", ["W8A8", QSpec(w_bits=8, a_bits=8)])
def test_a_symmetric_target_gets_signed_activations(fgm, calib, policy):
    def activation_signs(gm):
        kinds = {n.name: n.meta["fxq.quantizer"]["kind"] for n in gm.graph.nodes if "fxq.quantizer" in n.meta}
        return {q.qrange.signed for name, q in quantizers(gm).items() if kinds[name] != "weight"}

    assert False in activation_signs(quantize_ptq(fgm, calib, policy, progress=False))
    symmetric = TargetProfile("sym", "CPUExecutionProvider", "symmetric activations", activation_symmetric=True)
    gm = quantize_ptq(fgm, calib, policy, progress=False, target=symmetric)
    assert activation_signs(gm) == {True}
    assert all(n.meta["fxq.qspec"].a_symmetric for n in gm.graph.nodes if "fxq.qspec" in n.meta)


def test_preparation_passes_refuse_a_target_that_needs_none(fgm):
    gm = copy.deepcopy(fgm)
    annotate_policy(gm, "W8A8")
    insert_quantizers(gm)
    with pytest.raises(fxq.InputError, match="'ort-cuda' needs no such.*conv_needs_output_q.*ort-cpu"):
        insert_output_quantizers(gm, "ort-cuda")
    with pytest.raises(fxq.InputError, match="'ort-tensorrt' needs no such.*int32_conv_bias"):
        quantize_biases(gm, "ort-tensorrt")
    with pytest.raises(fxq.InputError, match="unknown"):
        quantize_ptq(fgm, [], "W8A8", target="ort-npu")
