"""The ``tensorrt`` target: files that follow TensorRT's explicit-quantization rules, checked structurally by
walking the ONNX graph here (independently of :mod:`fxq.backends.tensorrt_rules`), the rule checker catching
each broken rule with the node's name, and the file's numerics run by ORT CPU against the fake-quant graph.

Parity (measured on COCO fixture images resized to 160–256 px, random weights, ORT 1.32 CPU level "all"): max /
mean |Δ logits| 0.022 / 0.0053 (detr_tiny W8A8), 0.023 / 0.0054 (W4A8), 0.067 / 0.0092 (deformable_detr_tiny
W8A8, |logits| ≤ 6); boxes ≤ 1.2e-3. Same cause as for ort-cpu (int32 accumulation and float requantization flip
a few roundings); the bounds leave about 2× margin.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DATA
from onnx import TensorProto, helper, numpy_helper

import fxq
from fxq.backends import LoweringError, OrtSession, lower_for_runtime
from fxq.backends.fusion_probes import probe_model
from fxq.backends.session import _check_tensorrt_placement
from fxq.backends.tensorrt_rules import RULES, check_tensorrt, tensorrt_violations
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.ptq import float_graph, quantize_ptq

BOUNDS = {("detr_tiny", "W8A8"): (0.05, 0.011), ("detr_tiny", "W4A8"): (0.05, 0.011),
          ("deformable_detr_tiny", "W8A8"): (0.14, 0.02)}
BOX_BOUND = 2.5e-3
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MOVEMENT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Split",
            "Concat", "MaxPool")


@pytest.fixture(scope="module")
def batches():
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 256))
    it = iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate))
    return [next(it)[0], next(it)[0]]


@pytest.fixture(scope="module", params=list(BOUNDS), ids=lambda p: "-".join(p))
def lowered(request, batches, tmp_path_factory):
    name, policy = request.param
    torch.manual_seed(0)
    fgm = float_graph(fxq.models.build(name, pretrained=False), (160, 160))
    gm = quantize_ptq(fgm, [batches[0]], policy, progress=False, target="tensorrt")
    path = tmp_path_factory.mktemp(name) / f"{name}-{policy}.onnx"
    report = lower_for_runtime(gm, torch.randn(1, 3, 160, 160), path, "tensorrt")
    return name, policy, gm, path, report


class Graph:
    def __init__(self, path) -> None:
        self.model = onnx.load(path)
        self.nodes = list(self.model.graph.node)
        self.inits = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        self.types = {t.name: t.data_type for t in self.model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.users = {}
        for n in self.nodes:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def of(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op]


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def test_every_qdq_is_signed_symmetric_int8(lowered):
    *_, path, _ = lowered
    g = Graph(path)
    qdq = g.of("QuantizeLinear") + g.of("DequantizeLinear")
    assert qdq
    for node in qdq:
        assert g.types[node.input[2]] == TensorProto.INT8, node.name
        assert not g.inits[node.input[2]].any(), node.name
        assert g.inits[node.input[1]].dtype == np.float32 and (g.inits[node.input[1]] > 0).all(), node.name
    assert not any(g.types[n.input[0]] == TensorProto.INT32 for n in g.of("DequantizeLinear") if n.input[0] in g.types)
    assert not g.of("Cast") or all(n.output[0] not in {d.input[0] for d in g.of("DequantizeLinear")}
                                   for n in g.of("Cast"))


def test_activations_per_tensor_and_weights_per_output_channel(lowered):
    *_, path, _ = lowered
    g = Graph(path)
    for q in g.of("QuantizeLinear"):
        assert g.inits[q.input[1]].size == 1, q.name
        assert {u.op_type for u in g.users[q.output[0]]} == {"DequantizeLinear"}, q.name
    weights = [d for d in g.of("DequantizeLinear") if d.input[0] in g.inits]
    assert weights
    for dq in weights:
        values = g.inits[dq.input[0]]
        (reader,) = g.users[dq.output[0]]
        assert g.types[dq.input[0]] == TensorProto.INT8 and not any(a.name == "block_size" for a in dq.attribute)
        out_axis = 0 if reader.op_type == "Conv" else values.ndim - 1  # Conv [O, I, kh, kw]; MatMul [K, N]
        assert _axis(dq) % values.ndim == out_axis, (dq.name, reader.op_type)
        assert g.inits[dq.input[1]].size == values.shape[out_axis]
        assert np.abs(values).max() <= 127  # symmetric: -128 never used


def test_qdq_feeds_only_weighted_ops_and_they_read_only_qdq(lowered):
    *_, path, report = lowered
    g = Graph(path)

    def readers(tensor):
        for user in g.users.get(tensor, []):
            if user.op_type in MOVEMENT:
                yield from readers(user.output[0])
            else:
                yield user

    for dq in g.of("DequantizeLinear"):
        assert {u.op_type for u in readers(dq.output[0])} <= set(WEIGHTED), dq.name
    quantized = {row.node for row in report.nodes}
    for node in [n for n in g.nodes if n.name in quantized]:
        assert node.op_type in WEIGHTED
        for tensor in node.input[:2]:
            assert g.producer[tensor].op_type == "DequantizeLinear", (node.name, tensor)  # directly, not moved
    assert all(row.integer and row.kernel in WEIGHTED for row in report.nodes)


def test_the_file_passes_the_rule_checker(lowered):
    *_, path, _ = lowered
    assert tensorrt_violations(path) == []


def test_tensorrt_file_matches_the_fake_quant_graph_in_ort_cpu(lowered, batches):
    name, policy, gm, path, _ = lowered
    with torch.no_grad():
        ref = gm(batches[1])
    got = OrtSession(path, threads=1).run(batches[1])  # level "all": the file loads with every ORT fusion on
    max_bound, mean_bound = BOUNDS[(name, policy)]
    diff = (got["pred_logits"] - ref["pred_logits"]).abs()
    assert diff.max() <= max_bound and diff.mean() <= mean_bound
    assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max() <= BOX_BOUND


def test_static_shape_file_runs_in_ort_cpu(lowered, batches, tmp_path):
    """Static shapes make ORT fuse MatMul + Add into Gemm with new Q/DQ that its s8→u8 rewrite breaks; the session
    leaves that rewrite out (backends/session.py, S8_TO_U8_REWRITE) and computes the same."""
    name, policy, gm, path, _ = lowered
    if (name, policy) != ("detr_tiny", "W8A8"):
        pytest.skip("one model is enough")
    images = batches[1][:1]
    lower_for_runtime(gm, images, tmp_path / "static.onnx", "tensorrt", dynamic=False)
    got = OrtSession(tmp_path / "static.onnx", threads=1).run(images)
    ref = OrtSession(path, threads=1).run(images)
    assert (got["pred_logits"] - ref["pred_logits"]).abs().max() <= BOUNDS[(name, policy)][0]


def test_four_bit_weights_are_stored_int8_with_their_four_bit_integers(lowered):
    name, policy, gm, path, report = lowered
    if not policy.startswith("W4"):
        pytest.skip("8-bit weights")
    g = Graph(path)
    weights = [g.inits[d.input[0]] for d in g.of("DequantizeLinear") if d.input[0] in g.inits]
    assert weights and sum(np.abs(w).max() <= 8 for w in weights) >= len(weights) - 2  # stem / heads may be 8-bit
    assert any("stored in 8-bit types" in note for note in report.activation_changes)


# -- the rule checker on files that break one rule each -------------------------------------------------------


def _set_zero_point(model: onnx.ModelProto, name: str, data_type: int, value: int) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(helper.make_tensor(name, data_type, [], [value]))
    return model


def _weight_axis(model: onnx.ModelProto, axis: int) -> onnx.ModelProto:
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_q")
    del dq.attribute[:]
    dq.attribute.append(helper.make_attribute("axis", axis))
    return model


def _last_op(model: onnx.ModelProto, op: str) -> onnx.ModelProto:
    model.graph.node[-1].op_type = op  # the probe's final Identity now reads the dequantized output as float
    return model


def _s8_conv() -> onnx.ModelProto:
    return probe_model("conv", act="int8", bias="float")


BROKEN = {
    "uint8_activation": (lambda: probe_model("conv", act="uint8", bias="float"), "int8_symmetric", "x/QuantizeLinear"),
    "nonzero_zero_point": (lambda: _set_zero_point(_s8_conv(), "x_z", TensorProto.INT8, 3), "int8_symmetric",
                           "x/QuantizeLinear"),
    "int32_bias": (lambda: probe_model("conv", act="int8", bias="int32"), "int8_symmetric", "b_dq"),
    "int4_cast_weight": (lambda: probe_model("conv", act="int8", weight="int4_cast"), "weights_per_output_channel",
                         "w_dq"),
    "matmul_weight_on_input_axis": (lambda: _weight_axis(probe_model("matmul", act="int8"), 0),
                                    "weights_per_output_channel", "w_dq"),
    "weight_only": (lambda: probe_model("matmul", act=None), "all_inputs_quantized", "y"),
    "qdq_into_sigmoid": (lambda: _last_op(probe_model("conv", act="int8", output_q=True), "Sigmoid"),
                         "qdq_only_into_weighted_ops", "y_dq"),
}


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        if not node.name:
            node.name = node.output[0] if node.op_type not in ("QuantizeLinear",) else f"{node.input[0]}/{node.op_type}"
    return model


@pytest.mark.parametrize("case", list(BROKEN))
def test_checker_names_the_node_and_the_rule(case):
    build, rule, node = BROKEN[case]
    model = _named(build())
    with pytest.raises(LoweringError, match=rf"{rule}") as err:
        check_tensorrt(model)
    assert node in str(err.value) and RULES[rule] in str(err.value) and "\n" not in str(err.value)
    assert any(v.rule == rule for v in tensorrt_violations(model))


def test_a_clean_probe_passes():
    assert tensorrt_violations(_named(probe_model("conv", act="int8", bias="float", output_q=False))) == []


def test_the_ort_cpu_file_breaks_tensorrt_rules(lowered, batches, tmp_path):
    name, policy, gm, *_ = lowered
    if (name, policy) != ("detr_tiny", "W8A8"):
        pytest.skip("one model is enough")
    fgm = float_graph(fxq.models.build(name, pretrained=False), (160, 160))
    ort_gm = quantize_ptq(fgm, [batches[0]], policy, progress=False, target="ort-cpu")
    lower_for_runtime(ort_gm, torch.randn(1, 3, 160, 160), tmp_path / "ort.onnx", "ort-cpu", verify=False)
    rules = {v.rule for v in tensorrt_violations(tmp_path / "ort.onnx")}
    assert {"int8_symmetric", "weights_per_output_channel"} <= rules  # u8 activations, int32 biases, int4 casts
    with pytest.raises(fxq.InputError, match=r"cannot run under TensorRT: node '.*' \(.*\) breaks TensorRT rule "
                                             r"int8_symmetric.*--runtime tensorrt") as err:
        _check_tensorrt_placement(tmp_path / "ort.onnx")  # what OrtSession(provider="tensorrt") raises first
    assert "\n" not in str(err.value)


def test_cli_export_for_tensorrt(tmp_path, capsys):
    from fxq.cli import main

    out = tmp_path / "detr.onnx"
    code = main(["export", "detr_tiny", "--policy", "W8A8", "--calib", str(DATA / "coco-val2017-fixture"),
                 "--out", str(out), "--size", "64", "96", "--calib-batches", "1", "--runtime", "tensorrt"])
    assert code == 0, capsys.readouterr().err
    assert "runtime tensorrt" in capsys.readouterr().out
    assert tensorrt_violations(out) == []
