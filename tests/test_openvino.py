"""The OpenVINO runtime: its capability facts checked on the installed OpenVINO, the ``openvino`` profile against them,
a session behind OrtSession's interface with parity against onnxruntime and the fake-quant graph, the lowering
report's executed layers, and the errors (OpenVINO missing, device absent, file rejected).

Parity (measured on COCO fixture images resized to 160–256 px, random weights, OpenVINO 2026.4 CPU with fp32 float
layers vs ORT 1.32 CPU level "all", files lowered for ``openvino``): max / mean |Δ logits| OpenVINO vs fake-quant
0.022 / 0.0049 (detr_tiny W8A8), 0.029 / 0.0050 (W4A8); OpenVINO vs onnxruntime 0.023 / 0.0050 and 0.022 / 0.0049;
boxes ≤ 9e-4 (onnxruntime vs fake-quant on the same files: 0.021 / 0.0048). Both runtimes accumulate in int32 and
requantize in float, so a few roundings differ by one step and propagate, as between ORT and PyTorch. The bounds
leave about 2× margin; top-10 detections must agree. (deformable_detr_tiny is further off on OpenVINO: 0.12 / 0.016
against the fake-quant graph where onnxruntime is at 0.038 / 0.0062; not covered here.)
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DATA
from detections import TOP_K, assert_same_detections

import fxq
from fxq.backends import OrtSession, lower_for_runtime
from fxq.backends.fusion_probes import probe_model
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.evaluation import postprocess
from fxq.ptq import float_graph, quantize_ptq
from fxq.targets import TARGETS

ov = pytest.importorskip("openvino")

from fxq.backends.openvino_facts import OPENVINO_FACTS, compute_layer, executed_layers, probe_layers  # noqa: E402
from fxq.backends.openvino_session import OpenVinoSession  # noqa: E402
from fxq.backends.runtime_session import open_session  # noqa: E402

OPENVINO = TARGETS["openvino"]
#: max / mean |Δ logits| bounds: (OpenVINO vs fake-quant, OpenVINO vs onnxruntime).
LOGIT_BOUND = {"W8A8": ((0.05, 0.01), (0.05, 0.01)), "W4A8": ((0.06, 0.01), (0.05, 0.01))}
BOX_BOUND = 2e-3


# -- the capability facts, on the live OpenVINO ---------------------------------------------------------------


@pytest.mark.parametrize("fact", OPENVINO_FACTS, ids=lambda f: f.name)
def test_openvino_fact_holds_on_this_openvino(fact):
    layer = compute_layer(probe_layers(probe_model(**fact.probe)))
    assert layer is not None and layer.layer_type == fact.layer and layer.precision in fact.precisions, (
        f"{fact.pattern}: expected {fact.layer}/{fact.precision}, OpenVINO {ov.__version__} ran {layer}")


def test_openvino_profile_agrees_with_its_facts():
    facts = {f.name: f for f in OPENVINO_FACTS}
    assert OPENVINO.verified and OPENVINO.engine == "openvino"
    # u8 activations: convs and linears run int8 (the full range after a ReLU); attention matmuls would need s8
    assert OPENVINO.activation_symmetric is None and not facts["matmul_activations_u8"].fused
    assert facts["conv_u8_without_output_q"].fused and facts["matmul_weight_u8"].fused
    assert facts["conv_int32_bias"].fused == OPENVINO.int32_conv_bias
    assert OPENVINO.cast_narrow_weights == (facts["conv_int4_cast_int8"].fused and not facts["conv_int4_weight"].fused)
    assert OPENVINO.activation_storage_bits == 8 and not facts["conv_u4_activations"].fused
    assert not OPENVINO.weight_only_nbits  # weight-only int4 runs compressed as it is: no blocking needed
    for fact in OPENVINO_FACTS:
        listed = all(f"{fact.layer}/{p}" in OPENVINO.integer_kernels for p in fact.precisions)
        assert listed == (fact.fused or fact.precision == "i4")


# -- the session: parity with onnxruntime and the fake-quant graph --------------------------------------------


@pytest.fixture(scope="module")
def batches():
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 256))
    it = iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate))
    return [(images, torch.stack([t["orig_size"] for t in targets])) for images, _, targets in (next(it), next(it))]


@pytest.fixture(scope="module", params=["W8A8", "W4A8"])
def lowered(request, batches, tmp_path_factory):
    torch.manual_seed(0)
    fgm = float_graph(fxq.models.build("detr_tiny", pretrained=False), (160, 160))
    gm = quantize_ptq(fgm, [batches[0][0]], request.param, progress=False, target="openvino")
    path = tmp_path_factory.mktemp("ov") / f"detr_tiny-{request.param}.onnx"
    report = lower_for_runtime(gm, torch.randn(1, 3, 160, 160), path, "openvino")
    return request.param, gm, path, report


def test_openvino_matches_onnxruntime_and_the_fake_quant_graph(lowered, batches):
    policy, gm, path, _ = lowered
    images, sizes = batches[1]
    with torch.no_grad():
        ref = gm(images)
    got = OpenVinoSession(path, threads=1).run(images)
    ort = OrtSession(path, threads=1).run(images)
    assert set(got) == {"pred_logits", "pred_boxes"}
    for other, (max_bound, mean_bound) in zip((ref, ort), LOGIT_BOUND[policy], strict=True):
        diff = (got["pred_logits"] - other["pred_logits"]).abs()
        assert diff.max() <= max_bound and diff.mean() <= mean_bound
        assert (got["pred_boxes"] - other["pred_boxes"]).abs().max() <= BOX_BOUND
    for r, g in zip(postprocess(ref, sizes, gm.head, TOP_K), postprocess(got, sizes, gm.head, TOP_K), strict=True):
        assert_same_detections(r, g)


def test_float_export_matches_onnxruntime_closely(lowered, batches, tmp_path):
    from fxq.backends import lower_to_onnx

    torch.manual_seed(0)
    fgm = float_graph(fxq.models.build("detr_tiny", pretrained=False), (160, 160))
    lower_to_onnx(fgm, torch.randn(1, 3, 160, 160), tmp_path / "fp32.onnx", opset=17)
    images = batches[1][0]
    got = open_session(tmp_path / "fp32.onnx", "openvino", threads=1).run(images)
    ref = open_session(tmp_path / "fp32.onnx", "cpu", threads=1).run(images)
    assert (got["pred_logits"] - ref["pred_logits"]).abs().max() <= 1e-4  # f32 float layers: reassociation only


def test_every_quantized_node_runs_an_int8_layer_but_attention(lowered):
    policy, gm, path, report = lowered
    by_role = {}
    for row in report.nodes:
        by_role.setdefault(row.role, set()).add(row.kernel)
    assert by_role["conv"] == {"Convolution/u8"}
    assert by_role["linear"] <= {"FullyConnected/u8", "folded"}
    # u8 attention inputs: OpenVINO fuses MatMul + Softmax + MatMul into one fp32 Subgraph, and the report says so
    assert by_role["attn_qk"] == by_role["attn_av"] == {"Subgraph/f32"}
    assert set(report.float_nodes) == {row.node for row in report.nodes if row.role in ("attn_qk", "attn_av")}
    # decoder layer 0's self-attention reads the all-zero target only: OpenVINO computes its out_proj at load time
    assert [row.node for row in report.nodes if row.kernel == "folded"] == [
        "transformer_decoder_layers_0_self_attn_out_proj"]
    assert {row.executed for row in report.nodes if row.role in ("conv", "linear")} <= {
        "int8", "int4→int8", "constant-folded by the runtime"}
    kernels = executed_layers(path)
    assert all(kernels[row.node] == row.kernel for row in report.nodes)


# -- errors ---------------------------------------------------------------------------------------------------


def test_missing_openvino_names_the_pip_package(monkeypatch, tmp_path):
    from fxq.backends.capabilities import runtime_capabilities
    from fxq.bench.suite import check_rows

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    for call in (lambda: OpenVinoSession(tmp_path / "m.onnx"), lambda: open_session(tmp_path / "m.onnx", "openvino"),
                 lambda: runtime_capabilities("openvino"), lambda: check_rows(["ort-fp32", "openvino-fp32"])):
        with pytest.raises(fxq.InputError, match="pip install openvino") as err:
            call()
        assert "\n" not in str(err.value)


def test_cli_export_without_openvino_is_one_line(monkeypatch, tmp_path, capsys):
    from fxq.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)
    code = main(["export", "detr_tiny", "--calib", str(DATA / "coco-val2017-fixture"), "--out",
                 str(tmp_path / "m.onnx"), "--size", "64", "64", "--runtime", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install openvino" in err


def test_absent_device_and_rejected_file(lowered, tmp_path):
    _, _, path, _ = lowered
    with pytest.raises(fxq.InputError, match="device 'GPU' is not present"):
        OpenVinoSession(path, "GPU")
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a protobuf")
    with pytest.raises(fxq.InputError, match="OpenVINO .* cannot load") as err:
        OpenVinoSession(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(fxq.InputError, match="does not exist"):
        OpenVinoSession(tmp_path / "nothing.onnx")


def test_run_needs_a_batched_image_tensor(lowered):
    import numpy as np

    session = OpenVinoSession(lowered[2], threads=1)
    with pytest.raises(fxq.InputError, match=r"\[B, 3, H, W\]"):
        session.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(fxq.InputError, match="could not run"):
        session.run(torch.zeros(1, 4, 64, 64))
