"""Runtime-aware lowering for ORT CPU: the capability table's fusion facts checked on the installed onnxruntime,
the preparation passes, kernel placement and parity with the PyTorch fake-quant graph on real images.

Parity bound (measured on COCO fixture images resized to 160–256 px, random weights, ORT 1.32 CPU, level
"all"): every quantizer is exact per element, but ORT's integer kernels accumulate in int32 and requantize
with a float multiplier, so a few rounding decisions differ by one step and propagate: max |Δ logits| 0.021
(detr_tiny W8A8, |logits| ≤ 1.7), 0.021 (W4A8), 1e-6 (W4A4: its coarse steps flip no decision here), 0.046
(deformable_detr_tiny W4A8, |logits| ≤ 6.6); boxes ≤ 8.6e-4. The bounds below leave about 2× margin; the
top-10 post-processed detections must agree (same labels, boxes within 1.5 px, scores within 3e-3; only
near-ties at the top-10 boundary may swap). Those bounds hold for random weights (the fixtures pin
``pretrained=False``); trained weights give larger logits (|logits| ≤ 12) and larger differences — also between
the plain QDQ lowering run by ORT without optimizations and PyTorch (0.089 on deformable_detr_tiny) — so for them the
trained-weight test below has its own measured bounds.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DATA
from detections import TOP_K, assert_same_detections

import fxq
from fxq.backends import OrtSession, lower_for_runtime, lower_to_onnx, runtime_capabilities
from fxq.backends.capabilities import ORT_CPU_FACTS, available_providers
from fxq.backends.fusion_probes import optimized_model, optimized_ops, probe_model
from fxq.backends.qtensor import storage_bits
from fxq.backends.session import session_options
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.evaluation import postprocess
from fxq.passes.calibrate import calibrate
from fxq.passes.insert_quant import insert_quantizers, quantizers
from fxq.passes.policy import annotate_policy
from fxq.passes.runtime_prep import BiasQuantizer, insert_output_quantizers, quantize_biases
from fxq.ptq import float_graph

#: max / mean |Δ logits| between PyTorch's fake-quant graph and ORT's integer kernels (random weights). Measured on
#: an AVX2 EPYC without VNNI (exact int8 on): W8A8 0.031 / 0.0047, W4A8 0.020 / 0.0047, W4A4 0.287 / 0.019,
#: deformable W4A8 0.040 / 0.0075. At 4-bit activations one rounding flip from float reassociation (one element of
#: 30720 in layer4, one step) cascades through the 4-bit transformer, so only the mean is tight there.
LOGIT_BOUND = {("detr_tiny", "W8A8"): (0.06, 0.01), ("detr_tiny", "W4A8"): (0.06, 0.01),
               ("detr_tiny", "W4A4"): (0.6, 0.04), ("deformable_detr_tiny", "W4A8"): (0.1, 0.015)}
BOX_BOUND = 2e-3


# -- the capability table, checked on the live onnxruntime -------------------------------------------------


@pytest.mark.parametrize("fact", ORT_CPU_FACTS, ids=lambda f: f.name)
def test_fusion_fact_holds_on_this_onnxruntime(fact):
    ops = optimized_ops(probe_model(**fact.probe))
    assert ops[fact.kernel] > 0, f"{fact.pattern}: expected {fact.kernel}, onnxruntime {ort.__version__} ran {ops}"
    assert not any(ops[op] for op in fact.absent), f"{fact.pattern}: {ops}"


def _run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = session_options()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("fused, reference", [
    ({"op": "conv", "weight": "int4_cast", "output_q": True}, {"op": "conv", "weight": "int4", "output_q": True}),
    ({"op": "matmul", "act": None, "weight": "int4_blocked"}, {"op": "matmul", "act": None, "weight": "int4"}),
], ids=["int4-cast-to-int8-conv", "int4-blocked-matmulnbits"])
def test_storage_changes_keep_the_numerics(fused, reference):
    """The int8 kernel on int4 values cast to int8, and MatMulNBits on blocked int4, compute what the plain
    int4 DequantizeLinear graph computes without optimizations (up to one output step / float rounding)."""
    shape = [1, 8, 12, 12] if fused["op"] == "conv" else [20, 1, 64]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = _run(probe_model(**fused), x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    ref = _run(probe_model(**reference), x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    step = 0.05 if fused.get("output_q") else 0.0
    np.testing.assert_allclose(got, ref, atol=step + 1e-4, rtol=1e-5)


def test_capabilities_of_missing_runtimes_name_the_available_providers():
    assert runtime_capabilities("ort-cpu").verified
    with pytest.raises(fxq.InputError, match="unknown.*ort-cpu"):
        runtime_capabilities("tflite")
    if "cuda" not in available_providers():
        with pytest.raises(fxq.InputError, match=r"not available.*available: cpu"):
            runtime_capabilities("ort-cuda")


# -- the preparation passes --------------------------------------------------------------------------------


def _batches():
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 256))
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    it = iter(loader)
    return [(images, torch.stack([t["orig_size"] for t in targets])) for images, _, targets in (next(it), next(it))]


@pytest.fixture(scope="module")
def batches():
    return _batches()


@pytest.fixture(scope="module")
def float_graphs():
    torch.manual_seed(0)
    return {name: float_graph(fxq.models.build(name, pretrained=False), (160, 160))
            for name in ("detr_tiny", "deformable_detr_tiny")}


def _prepared(fgm, policy: str, calib: torch.Tensor, prepare: bool = True):
    gm = copy.deepcopy(fgm)
    annotate_policy(gm, policy)
    insert_quantizers(gm)
    if prepare:
        insert_output_quantizers(gm)
    calibrate(gm, [calib], progress=False)
    if prepare:
        quantize_biases(gm)
    return gm


def test_every_quantized_conv_ends_in_one_eight_bit_quantizer(float_graphs, batches):
    gm = _prepared(float_graphs["detr_tiny"], "W4A4", batches[0][0])
    qs = quantizers(gm)
    convs = [n for n in gm.graph.nodes if n.meta.get("fxq.role") == "conv" and "fxq.qspec" in n.meta]
    assert convs
    for conv in convs:
        terminal = conv
        if len(conv.users) == 1 and next(iter(conv.users)).meta.get("fxq.role") == "relu":
            terminal = next(iter(conv.users))
        (reader,) = terminal.users
        assert reader.name == conv.meta["fxq.output_quantizer"]
        assert storage_bits(qs[reader.name].qrange) == 8
        bias = conv.args[2]
        assert bias.meta["fxq.role"] == "bias_quantize"
        module = gm.get_submodule(bias.target)
        assert isinstance(module, BiasQuantizer)
        with torch.no_grad():
            quantized = module(gm.get_submodule(bias.args[0].target.rsplit(".", 1)[0]).bias)
            assert torch.equal(module(quantized), quantized)  # on the int32 grid of s_x·s_w: idempotent
            assert ((quantized / module.scale()) - (quantized / module.scale()).round()).abs().max() < 1e-3


def test_preparation_keeps_the_state_dict_keys_of_the_model(float_graphs, batches):
    gm = _prepared(float_graphs["detr_tiny"], "W8A8", batches[0][0])
    keys = {k for k in gm.state_dict() if not k.startswith("fxq_q.")}
    assert keys == set(float_graphs["detr_tiny"].state_dict())


def test_bias_quantization_needs_calibration(float_graphs):
    gm = copy.deepcopy(float_graphs["detr_tiny"])
    annotate_policy(gm, "W8A8")
    insert_quantizers(gm)
    with pytest.raises(fxq.InputError, match="calibrate"):
        quantize_biases(gm)


# -- runtime-aware lowering ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[("detr_tiny", "W8A8"), ("detr_tiny", "W4A8"), ("detr_tiny", "W4A4"),
                                        ("deformable_detr_tiny", "W4A8")], ids=lambda p: "-".join(p))
def lowered(request, float_graphs, batches, tmp_path_factory):
    name, policy = request.param
    gm = _prepared(float_graphs[name], policy, batches[0][0])
    path = tmp_path_factory.mktemp(name) / f"{name}-{policy}.onnx"
    report = lower_for_runtime(gm, torch.randn(1, 3, 160, 160), path, "ort-cpu")
    return name, policy, gm, path, report


def test_runtime_lowering_matches_the_fake_quant_graph(lowered, batches):
    name, policy, gm, path, _ = lowered
    images, sizes = batches[1]
    with torch.no_grad():
        ref = gm(images)
    got = OrtSession(path, threads=1).run(images)
    max_bound, mean_bound = LOGIT_BOUND[(name, policy)]
    diff = (got["pred_logits"] - ref["pred_logits"]).abs()
    assert diff.max() <= max_bound and diff.mean() <= mean_bound
    if policy.endswith("A4"):  # flips cascade at 4-bit activations: ORT's own unfused QDQ graph is the reference
        ref = OrtSession(path, threads=1, optimization="disable").run(images)
    assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max() <= BOX_BOUND
    head = gm.head
    for r, g in zip(postprocess(ref, sizes, head, TOP_K), postprocess(got, sizes, head, TOP_K), strict=True):
        assert_same_detections(r, g)


def test_every_quantized_node_runs_an_integer_kernel(lowered):
    name, policy, gm, path, report = lowered
    assert report.float_nodes == []
    by_role = {}
    for row in report.nodes:
        by_role.setdefault(row.role, set()).add(row.kernel)
    assert by_role["conv"] == {"QLinearConv"}
    (stem,) = [row for row in report.nodes if row.module == "backbone.0.body.conv1"]
    assert any("space-to-depth(2) + 4×4/1 conv on 12 channels" in c for c in stem.changes)
    assert by_role["linear"] <= {"MatMulIntegerToFloat", "QLinearMatMul"}
    assert by_role.get("attn_qk", {"MatMulIntegerToFloat"}) <= {"MatMulIntegerToFloat", "QLinearMatMul"}
    fx_names = {n.name for n in gm.graph.nodes}
    onnx_names = {n.name for n in onnx.load(path).graph.node}
    assert {row.node for row in report.nodes} <= fx_names & onnx_names  # compute nodes carry FX names



def test_linear_biases_fold_into_matmulintegertofloat_with_the_same_outputs(lowered, batches, tmp_path):
    """Against the same graph lowered without the rewrite (standard DQ → MatMul → Add, fused by onnxruntime
    itself): the same outputs, and one float Add fewer per fused linear in onnxruntime's optimized graph."""
    import dataclasses

    name, policy, gm, path, report = lowered
    fused = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert fused and all(n.domain == "com.microsoft" and len(n.input) == 7 for n in fused)
    assert {n.name for n in fused} <= {row.node for row in report.nodes if row.kernel == "MatMulIntegerToFloat"}
    plain_caps = dataclasses.replace(runtime_capabilities("ort-cpu"), fused_matmul_bias=False)
    lower_for_runtime(gm, torch.randn(1, 3, 160, 160), tmp_path / "plain.onnx", plain_caps, verify=False)
    images = batches[1][0]
    got, ref = OrtSession(path, threads=1).run(images), OrtSession(tmp_path / "plain.onnx", threads=1).run(images)
    for key in ("pred_logits", "pred_boxes"):
        assert (got[key] - ref[key]).abs().max() <= 1e-5, key
    plain = tmp_path / "plain.onnx"
    adds = {f: Counter(n.op_type for n in optimized_model(f).graph.node)["Add"] for f in (path, plain)}
    assert adds[plain] - adds[path] == len(fused)

def test_residual_adds_run_as_qlinearadd(lowered):
    name, policy, gm, path, report = lowered
    if name != "detr_tiny":
        pytest.skip("one ResNet is enough")
    residual = [n for n in gm.graph.nodes if n.meta.get("fxq.role") == "add"
                and n.meta["fxq.module"].startswith("backbone.0.body")]
    assert residual and all(all(a.meta.get("fxq.role") == "quantize" for a in n.args[:2]) for n in residual)
    optimized = optimized_model(path).graph.node
    assert Counter(n.op_type for n in optimized)["QLinearAdd"] == len(residual)
    if policy.endswith("A4"):
        return  # 4-bit activations: a Clip in float keeps their range before each QuantizeLinear
    # u8 from the image's quantizer to the backbone's end: only the last stage's output is dequantized there
    assert [n.name for n in optimized if n.op_type == "DequantizeLinear" and "backbone" in n.name] == [
        "fxq_q_backbone_0_body_layer4_1_relu_1_aq8/DequantizeLinear"]


def test_four_bit_weights_stay_int4_in_the_file(lowered):
    name, policy, gm, path, report = lowered
    if not policy.startswith("W4"):
        pytest.skip("8-bit weights")
    assert report.weights["int4"] > report.weights.get("int8", 0)
    w4 = [row for row in report.nodes if row.weight_storage == "int4"]
    assert w4 and all(row.executed == "int4→int8" for row in w4)
    assert all(any("cast to int8" in c for c in row.changes) for row in w4)
    casts = [n for n in onnx.load(path).graph.node if n.op_type == "Cast" and n.name.startswith("fxq_q_")]
    assert len(casts) == len(w4)


def test_narrow_activations_are_stored_in_eight_bits(lowered):
    name, policy, gm, path, report = lowered
    if policy != "W4A4":
        pytest.skip("8-bit activations")
    model = onnx.load(path)
    zero_points = {t.name: t for t in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(zero_points[q.input[2]].data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for q in qs)
    assert any("8-bit types" in line for line in report.activation_changes)


#: Trained weights (fxq's embedded tiny models), W8A8: max / mean |Δ| (logits; boxes), about ×2 the larger of the
#: two machines' measurements (docstring below; AVX2 EPYC: detr 0.281 / 0.025, 0.011 / 0.0016; deformable 0.064 /
#: 0.0098, 0.0070 / 5.6e-4).
TRAINED_BOUNDS = {"detr_tiny": ((0.45, 0.05), (0.025, 0.0033)),
                  "deformable_detr_tiny": ((0.13, 0.02), (0.014, 0.0011))}


@pytest.mark.parametrize("name", ["detr_tiny", "deformable_detr_tiny"])
def test_parity_on_trained_weights(name, batches, tmp_path):
    """Measured: detr_tiny max / mean |Δ logits| 0.216 / 0.025 (|logits| ≤ 10.0), |Δ boxes| 0.012 / 0.0016;
    deformable_detr_tiny 0.060 / 0.0065 (|logits| ≤ 8.3), 0.003 / 2.5e-4. For comparison, the plain QDQ lowering
    of deformable_detr_tiny without the runtime preparation, run by ORT without any fusion, is 0.089 / 0.004 from
    PyTorch: float reassociation alone flips rounding decisions that trained weights amplify."""
    gm = _prepared(float_graph(fxq.models.build(name), (160, 160)), "W8A8", batches[0][0])
    lower_for_runtime(gm, torch.randn(1, 3, 160, 160), tmp_path / "runtime.onnx", verify=False)
    images = batches[1][0]
    with torch.no_grad():
        ref = gm(images)
    got = OrtSession(tmp_path / "runtime.onnx", threads=1).run(images)
    for key, (max_bound, mean_bound) in zip(("pred_logits", "pred_boxes"), TRAINED_BOUNDS[name], strict=True):
        diff = (got[key] - ref[key]).abs()
        assert diff.max() <= max_bound and diff.mean() <= mean_bound, key


def test_plain_lowering_of_an_unprepared_graph_reports_float_convs(float_graphs, batches, tmp_path):
    gm = _prepared(float_graphs["detr_tiny"], "W8A8", batches[0][0], prepare=False)
    report = lower_for_runtime(gm, torch.randn(1, 3, 160, 160), tmp_path / "m.onnx")
    floats = [row for row in report.nodes if row.integer is False]
    assert floats and all(row.role == "conv" and row.kernel in ("Conv", "FusedConv") for row in floats)
    assert all(any("insert_output_quantizers" in c for c in row.changes) for row in floats)
    assert "run by float kernels" in str(report)
    # the same graph through the plain lowering: close outputs (only the int32 rounding of the conv biases differs)
    lower_to_onnx(gm, torch.randn(1, 3, 160, 160), tmp_path / "plain.onnx")
    x = batches[1][0]
    a = OrtSession(tmp_path / "m.onnx", threads=1, optimization="disable").run(x)
    b = OrtSession(tmp_path / "plain.onnx", threads=1, optimization="disable").run(x)
    assert (a["pred_logits"] - b["pred_logits"]).abs().max() <= LOGIT_BOUND[("detr_tiny", "W8A8")][0]


def test_weight_only_linear_runs_matmulnbits(float_graphs, batches, tmp_path):
    gm = copy.deepcopy(float_graphs["detr_tiny"])
    annotate_policy(gm, "W4A32", {"backbone*": None, "input_proj*": None, "class_embed*": None, "bbox_embed*": None})
    insert_quantizers(gm)
    calibrate(gm, [batches[0][0]], progress=False)
    report = lower_for_runtime(gm, torch.randn(1, 3, 160, 160), tmp_path / "w4.onnx")
    linear = [row for row in report.nodes if row.role == "linear"]
    assert linear and {row.kernel for row in linear} == {"MatMulNBits"}
    with torch.no_grad():
        ref = gm(batches[1][0])
    got = OrtSession(tmp_path / "w4.onnx", threads=1).run(batches[1][0])
    assert (got["pred_logits"] - ref["pred_logits"]).abs().max() < 1e-3  # weight-only: float reassociation only


def test_cli_export_for_the_runtime(tmp_path, capsys):
    from fxq.cli import main

    out = tmp_path / "detr.onnx"
    code = main(["export", "detr_tiny", "--policy", "W4A8", "--calib", str(DATA / "coco-val2017-fixture"),
                 "--out", str(out), "--size", "64", "96", "--calib-batches", "1", "--runtime", "ort-cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "runtime ort-cpu" in printed and "QLinearConv" in printed and "cast to int8" in printed


def test_cli_export_unknown_runtime(tmp_path, capsys):
    from fxq.cli import main

    code = main(["export", "detr_tiny", "--calib", str(DATA / "coco-val2017-fixture"), "--out",
                 str(tmp_path / "m.onnx"), "--size", "64", "64", "--runtime", "ort-npu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ort-npu" in err and "ort-cpu" in err
