"""ONNX QDQ lowering: placement, integer storage, int4 packing, ORT parity on small graphs, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import fxq
from fxq.backends import LoweringError, OrtSession, lower_for_runtime, lower_to_onnx
from fxq.models import attention
from fxq.passes.calibrate import calibrate
from fxq.passes.insert_quant import insert_quantizers, quantizers
from fxq.passes.policy import annotate_policy
from fxq.quant import FakeQuantizer, QSpec, parse_policy

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-val2017-fixture"
if not FIXTURE.is_dir():
    FIXTURE = Path("/work/shared/data/coco-val2017-fixture")


class TinyNet(nn.Module):
    """conv -> relu -> tokens -> linear -> Q·Kᵀ -> softmax -> A·V -> linear: every quantizable role."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = F.relu(self.conv(images)).flatten(2).transpose(1, 2)
        t = self.proj(tokens)
        attn = attention.attention_scores(t * 0.25, t).softmax(-1)
        return self.head(attention.attention_mix(attn, t))


def _add_output_quantizer(gm: torch.fx.GraphModule, bits: int, symmetric: bool = False) -> str:
    """Quantize the graph's output too, so that ORT and the reference can be compared in its steps."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0]
    gm.add_submodule("fxq_q.output_q", FakeQuantizer(bits, symmetric=symmetric))
    with gm.graph.inserting_after(src):
        node = gm.graph.call_module("fxq_q.output_q", (src,))
    node.meta.update({"fxq.role": "quantize", "fxq.module": "", "fxq.quantizer": {"kind": "activation",
                                                                                   "of": src.name, "param": None}})
    out.replace_input_with(src, node)
    gm.recompile()
    return node.name


def quantized_tiny(policy: str | QSpec, seed: int = 0) -> tuple[torch.fx.GraphModule, str, torch.Tensor]:
    """A calibrated TinyNet graph, its output quantizer's node name, and a test batch."""
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 16, 16)
    gm = fxq.trace(TinyNet().eval(), images[:1])
    annotate_policy(gm, policy)
    insert_quantizers(gm)
    spec = policy if isinstance(policy, QSpec) else parse_policy(policy)
    out_name = _add_output_quantizer(gm, spec.a_bits)
    calibrate(gm, [torch.randn(2, 3, 16, 16) for _ in range(3)] + [images], progress=False)
    return gm, out_name, images


def ort_run(path, images: torch.Tensor, optimization: str = "disable") -> torch.Tensor:
    return OrtSession(path, threads=1, optimization=optimization).run(images)["output"]


def output_step(gm: torch.fx.GraphModule, name: str) -> float:
    return float(quantizers(gm)[name].scale)


def assert_within_one_step(got: torch.Tensor, ref: torch.Tensor, step: float, what: object = "") -> None:
    """|got − ref| ≤ one output step (plus float32 rounding of the dequantized values)."""
    bound = step + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= bound, what


class _Pass(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * 1.0


@pytest.mark.parametrize("scale", [0.125, 0.0371])
@pytest.mark.parametrize("bits, signed", [(2, False), (3, True), (4, False), (4, True), (5, False), (8, False),
                                          (8, True), (16, False), (16, True)])
def test_activation_qdq_is_bit_exact(tmp_path, bits, signed, scale):
    """One quantizer alone: ORT's QuantizeLinear→DequantizeLinear equals the fake quantizer bit for bit,
    ties (k + 0.5)·scale and out-of-range values included."""
    images = torch.randn(1, 3, 8, 8)
    gm = fxq.trace(_Pass().eval(), images)
    name = _add_output_quantizer(gm, bits, symmetric=signed)
    q = quantizers(gm)[name]
    q.set_qparams(scale, None if signed else (q.qrange.qmax + 1) // 3)
    lower_to_onnx(gm, images, tmp_path / "q.onnx")
    ties = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * scale
    x = torch.cat([torch.randn(2 * 3 * 8 * 8 - ties.numel()) * scale * 2 ** (bits - 1), ties]).reshape(2, 3, 8, 8)
    with torch.no_grad():
        ref = gm(x)
    for optimization in ("disable", "all"):
        assert torch.equal(ort_run(tmp_path / "q.onnx", x, optimization), ref)


POLICIES = [f"W{b}A{b}" for b in range(2, 9)] + ["4-4-8", "W8A16", "W2A8", "W8A3"]


@pytest.mark.parametrize("policy", POLICIES)
def test_small_graph_matches_fake_quant_within_one_output_step(tmp_path, policy):
    """Bound: |ORT − PyTorch fake-quant| ≤ 1 step (scale) of the output quantizer, element-wise."""
    gm, out_name, images = quantized_tiny(policy)
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    step = output_step(gm, out_name)
    with torch.no_grad():
        ref = gm(images)
    for optimization in ("disable", "all"):
        assert_within_one_step(ort_run(tmp_path / "tiny.onnx", images, optimization), ref, step, optimization)


@pytest.mark.parametrize("fields", [{"a_symmetric": True}, {"w_granularity": "per_tensor"}],
                         ids=["signed-activations", "per-tensor-weights"])
@pytest.mark.parametrize("policy", ["W8A8", "W4A4", "W3A3"])
def test_other_quantizer_settings_match(tmp_path, policy, fields):
    spec = parse_policy(policy, **fields)
    gm, out_name, images = quantized_tiny(spec)
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    with torch.no_grad():
        ref = gm(images)
    assert_within_one_step(ort_run(tmp_path / "tiny.onnx", images), ref, output_step(gm, out_name))


def _by_type(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


@pytest.mark.parametrize("policy, weight_type, act_type", [("W8A8", TensorProto.INT8, TensorProto.UINT8),
                                                           ("W4A4", TensorProto.INT4, TensorProto.UINT4),
                                                           ("W2A3", TensorProto.INT4, TensorProto.UINT4)])
def test_qdq_placed_exactly_where_the_quantizers_are(tmp_path, policy, weight_type, act_type):
    gm, _, images = quantized_tiny(policy)
    report = lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    model = onnx.load(tmp_path / "tiny.onnx")
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    qs = quantizers(gm)
    kinds = {n.name: n.meta["fxq.quantizer"]["kind"] for n in gm.graph.nodes if n.name in qs}
    activations = sorted(n for n, k in kinds.items() if k != "weight")
    weights = sorted(n for n, k in kinds.items() if k == "weight")
    assert sorted(n.name.rsplit("/", 1)[0] for n in _by_type(model, "QuantizeLinear")) == activations
    weight_dq = [n for n in _by_type(model, "DequantizeLinear") if n.input[0] in inits]
    assert sorted(n.name.rsplit("/", 1)[0] for n in weight_dq) == weights
    for dq in weight_dq:  # integer initializer -> DQ, per-channel on the output channels
        assert inits[dq.input[0]].data_type == weight_type
        assert helper.get_attribute_value(dq.attribute[0]) in (0, 1)
    for q in _by_type(model, "QuantizeLinear"):
        assert inits[q.input[2]].data_type == act_type
    float_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims and
                     np.prod(t.dims) >= 8 * 3 * 9]
    assert not float_weights, "quantized layers must not keep their float weights"
    assert not any(n.domain == "fxq" for n in model.graph.node)
    bits = parse_policy(policy).a_bits
    assert report.qdq_pairs == {bits: len(activations)}
    assert sum(report.weights.values()) == len(weights)
    assert report.clips == (len(activations) if bits in (2, 3, 5, 6, 7) else 0)


def test_linear_weight_transpose_is_folded_into_the_initializer(tmp_path):
    gm, _, images = quantized_tiny("W8A8")
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    model = onnx.load(tmp_path / "tiny.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_dq = [n for n in _by_type(model, "DequantizeLinear") if n.input[0] in inits]
    for dq in weight_dq:
        assert {n.op_type for n in model.graph.node if dq.output[0] in n.input} <= {"Conv", "MatMul", "Gemm"}
    proj = next(n for n in weight_dq if "proj" in n.name)
    assert inits[proj.input[0]].shape == (8, 16)  # [in, out]: MatMul's layout, channel axis 1
    assert helper.get_attribute_value(proj.attribute[0]) == 1


def test_weights_dequantize_to_the_fake_quantized_weights(tmp_path):
    gm, _, images = quantized_tiny("W4A8")
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    model = onnx.load(tmp_path / "tiny.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_q = quantizers(gm)["fxq_q_conv_weight_wq4"]
    expected = conv_q(gm.conv.weight.detach()).numpy()
    q = inits["fxq_q_conv_weight_wq4/quantized"].astype(np.float32)
    scale = inits["fxq_q_conv_weight_wq4/scale"].reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(q * scale, expected)


def test_dynamic_batch_and_image_size(tmp_path):
    gm, _, images = quantized_tiny("W8A8")
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    other = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        ref = gm(other)
    got = ort_run(tmp_path / "tiny.onnx", other)
    assert got.shape == ref.shape


def test_static_export_has_fixed_shapes(tmp_path):
    gm, _, images = quantized_tiny("W8A8")
    report = lower_to_onnx(gm, images, tmp_path / "tiny.onnx", dynamic=False)
    dims = onnx.load(tmp_path / "tiny.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 16, 16] and not report.dynamic


def test_report_counts_and_sizes(tmp_path):
    gm, _, images = quantized_tiny("4-4-8")
    report = lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    # 4-bit: inputs of conv, proj, head and the output; 8-bit: q, k (= v, one shared quantizer), attention map
    assert report.qdq_pairs == {4: 4, 8: 3}
    assert report.weights == {"int4": 3}
    assert report.file_bytes == (tmp_path / "tiny.onnx").stat().st_size
    assert report.float_bytes > 0
    assert report.outputs == ["output"] and report.inputs == ["images"]
    text = str(report)
    assert "4-bit" in text and "int4" in text and "bytes" in text
    assert report.to_dict()["qdq_pairs"] == {"4": 4, "8": 3}


def test_external_data_above_threshold(tmp_path):
    gm, out_name, images = quantized_tiny("W8A8")
    report = lower_to_onnx(gm, images, tmp_path / "tiny.onnx", external_data_threshold=0)
    assert report.external_data == str(tmp_path / "tiny.onnx.data")
    assert (tmp_path / "tiny.onnx.data").stat().st_size > 0
    with torch.no_grad():
        ref = gm(images)
    assert_within_one_step(ort_run(tmp_path / "tiny.onnx", images), ref, output_step(gm, out_name))


def test_lowering_leaves_the_graph_unchanged(tmp_path):
    gm, _, images = quantized_tiny("W8A8")
    with torch.no_grad():
        before = gm(images)
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    assert all(isinstance(q, FakeQuantizer) for q in quantizers(gm).values())
    with torch.no_grad():
        assert torch.equal(gm(images), before)


def test_disabled_quantizer_emits_nothing(tmp_path):
    gm, out_name, images = quantized_tiny("W8A8")
    quantizers(gm)[out_name].disable()
    report = lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    assert report.disabled == 1 and report.qdq_pairs == {8: 6}
    with torch.no_grad():
        ref = gm(images)
    assert (ort_run(tmp_path / "tiny.onnx", images) - ref).abs().max() < 1e-4


# -- bad input -------------------------------------------------------------------------------------------


def test_uncalibrated_graph_names_the_first_quantizer(tmp_path):
    images = torch.randn(1, 3, 16, 16)
    gm = fxq.trace(TinyNet().eval(), images)
    annotate_policy(gm, "W8A8")
    insert_quantizers(gm)
    first = next(n.name for n in gm.graph.nodes if n.meta.get("fxq.role") == "quantize")
    with pytest.raises(fxq.InputError, match=f"'{first}' is not calibrated.*calibrate") as err:
        lower_to_onnx(gm, images, tmp_path / "tiny.onnx")
    assert str(err.value).count("quantizer node") == 1
    assert not (tmp_path / "tiny.onnx").exists()


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(self.conv(images)))


def test_unmappable_op_names_the_fx_node(tmp_path, capfd):
    images = torch.randn(1, 3, 16, 16)
    gm = fxq.trace(_Unexportable().eval(), images)
    annotate_policy(gm, "W8A8")
    insert_quantizers(gm)
    calibrate(gm, [images], progress=False)
    with pytest.raises(LoweringError, match="FX node 'erfinv'.*erfinv"):
        lower_to_onnx(gm, images, tmp_path / "bad.onnx")


@pytest.mark.parametrize("kwargs, message", [({"opset": 12}, "opset=12"), ({"opset": 17}, "needs opset 21")])
def test_bad_opset(tmp_path, kwargs, message):
    gm, _, images = quantized_tiny("W4A8")
    with pytest.raises(fxq.InputError, match=message):
        lower_to_onnx(gm, images, tmp_path / "tiny.onnx", **kwargs)


def test_int8_model_at_opset_17(tmp_path):
    gm, out_name, images = quantized_tiny("W8A8")
    lower_to_onnx(gm, images, tmp_path / "tiny.onnx", opset=17)
    model = onnx.load(tmp_path / "tiny.onnx")
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    with torch.no_grad():
        ref = gm(images)
    assert_within_one_step(ort_run(tmp_path / "tiny.onnx", images), ref, output_step(gm, out_name))


def test_bad_images(tmp_path):
    gm, _, _ = quantized_tiny("W8A8")
    with pytest.raises(fxq.InputError, match="rank 4"):
        lower_to_onnx(gm, torch.randn(3, 16, 16), tmp_path / "tiny.onnx")


def test_runtime_lowering_stores_narrow_activations_in_eight_bits(tmp_path):
    """ort-cpu's choice (no 4-bit activation kernel) reaches the storage: 4-bit activations get 8-bit
    zero-points and a Clip before QuantizeLinear, 4-bit weights stay int4; the plain lowering keeps uint4."""
    gm, _, images = quantized_tiny("W4A4")
    lower_to_onnx(gm, images, tmp_path / "plain.onnx")
    lower_for_runtime(gm, images, tmp_path / "ort.onnx", verify=False)
    own = {f"{name}/QuantizeLinear" for name in quantizers(gm)}  # not the stem's space-to-depth re-quantization
    for path, zero_point_type in (("plain.onnx", TensorProto.UINT4), ("ort.onnx", TensorProto.UINT8)):
        model = onnx.load(tmp_path / path)
        inits = {t.name: t for t in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert quantize and {inits[n.input[2]].data_type for n in quantize} == {zero_point_type}
        clipped = [producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Clip" for n in quantize
                   if n.name in own]
        assert len(clipped) >= 5
        assert all(clipped) if zero_point_type == TensorProto.UINT8 else not any(clipped)
        weights = [t for name, t in inits.items() if name.endswith("/quantized")]
        assert weights and {t.data_type for t in weights} == {TensorProto.INT4}


def test_cli_export(tmp_path, capsys):
    from fxq.cli import main

    out = tmp_path / "detr.onnx"
    code = main(["export", "detr_tiny", "--policy", "W4A8", "--calib", str(FIXTURE), "--out", str(out),
                 "--size", "64", "96", "--calib-batches", "1", "--json", str(tmp_path / "report.json")])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "int4" in printed and "8-bit" in printed
    session = OrtSession(out, threads=1)
    assert session.run(torch.randn(1, 3, 64, 64))["pred_boxes"].shape[-1] == 4
