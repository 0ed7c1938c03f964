"""The Gather + MatMul sampling core of multi-scale deformable attention (fxq/models/ms_deform_attn_fast.py).

Checked against a float64 evaluation of the definition written here (bilinear sampling, zero padding,
align_corners=False), against the model's own grid_sample core, and inside deformable_detr_tiny (embedded trained
weights): eager, FX-traced, exported to ONNX and run by onnxruntime, float and W8A8.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from deform_reference import bilinear_reference, random_inputs

import fxq
import fxq.models.ms_deform_attn as msda
from fxq.backends import OrtSession, lower_for_runtime, lower_to_onnx
from fxq.models import ms_deform_attn_fast as fast
from fxq.ptq import float_graph, quantize_ptq

#: Stated tolerance of the fast core (module docstring): unit-normal values, attention weights summing to 1.
CORE_ATOL = 1e-5

CASES = [  # batch, levels (H, W), heads, head_dim, points, queries
    (1, [(8, 8), (4, 4), (2, 2), (1, 1)], 8, 4, 4, 30),
    (2, [(7, 9), (4, 5), (2, 3)], 3, 5, 2, 11),
    (3, [(1, 6), (5, 1)], 2, 3, 3, 7),
    (1, [(20, 20), (10, 10), (5, 5)], 4, 32, 4, 50),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-L{len(c[1])}-m{c[2]}-d{c[3]}-p{c[4]}")
def test_fast_core_equals_definition_and_model_core(case):
    batch, shapes, heads, dim, points, queries = case
    value, locations, weights = random_inputs(*case)
    expected = bilinear_reference(value, shapes, locations, weights)
    got = fast.ms_deform_attn_core_fast(value, shapes, locations, weights)
    model_core = msda.ms_deform_attn_core(value, shapes, locations, weights)
    assert got.shape == model_core.shape == (batch, queries, heads * dim)
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max() <= CORE_ATOL
    assert (model_core.double() - expected).abs().max() <= CORE_ATOL
    assert (got - model_core).abs().max() <= CORE_ATOL


@pytest.mark.parametrize("case", CASES[:3], ids=["n1-L4", "n2-L3", "n3-L2"])
def test_fast_core_in_float64_is_the_definition(case):
    """No rounding left: the form itself (corners, clamping, padding ring) is exact."""
    _, shapes, *_ = case
    value, locations, weights = (t.double() for t in random_inputs(*case, seed=1))
    got = fast.ms_deform_attn_core_fast(value, shapes, locations, weights)
    assert (got - bilinear_reference(value, shapes, locations, weights)).abs().max() <= 1e-12


def test_fast_core_gradients_equal_the_model_core():
    """float64, locations in [-0.3, 1.3] (partly off the map, away from the clamp's corners): the same gradients
    for value, locations and weights, so the form can also be trained through."""
    shapes = [(5, 6), (3, 2)]
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 36, 3, 4, generator=g, dtype=torch.float64),
              torch.rand(2, 7, 3, 2, 3, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3,
              torch.rand(2, 7, 3, 2, 3, generator=g, dtype=torch.float64)]
    probe = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    grads = []
    for core in (fast.ms_deform_attn_core_fast, msda.ms_deform_attn_core):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (core(leaves[0], shapes, leaves[1], leaves[2]) * probe).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads, strict=True):
        assert (got - expected).abs().max() <= 1e-10


def test_far_outside_reads_zeros_and_unnormalised_weights_scale():
    value, locations, weights = random_inputs(1, [(4, 6), (2, 3)], 2, 3, 2, 5, seed=2)
    outside = torch.where(torch.rand(locations.shape) < 0.5, -2.0, 3.0)
    assert fast.ms_deform_attn_core_fast(value, [(4, 6), (2, 3)], outside, weights).abs().max() == 0
    scaled = fast.ms_deform_attn_core_fast(value, [(4, 6), (2, 3)], locations, 3 * weights)
    assert torch.allclose(scaled, 3 * fast.ms_deform_attn_core_fast(value, [(4, 6), (2, 3)], locations, weights),
                          atol=3e-6)


def test_sampling_core_dispatches_reference_in_torch():
    case = CASES[1]
    value, locations, weights = random_inputs(*case)
    assert torch.equal(fast.sampling_core(value, case[1], locations, weights),
                       msda.ms_deform_attn_core(value, case[1], locations, weights))


@pytest.mark.parametrize("ref_levels", [3, 1])
def test_fast_locations_are_bit_identical(ref_levels):
    g = torch.Generator().manual_seed(3)
    shapes = [(20, 20), (10, 13), (5, 7)]
    reference = torch.rand(2, 9, ref_levels, 2, generator=g)
    offsets = torch.randn(2, 9, 4, 3, 4, 2, generator=g) * 5
    assert torch.equal(fast.sampling_locations_from_points_fast(reference, offsets, shapes),
                       msda.sampling_locations_from_points(reference, offsets, shapes))


# --- inside deformable_detr_tiny -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return fxq.models.build("deformable_detr_tiny"), torch.randn(2, 3, 160, 160)


def _max_diff(a: dict, b: dict, key: str) -> float:
    return (a[key] - b[key]).abs().max().item()


def _ort(path, images) -> dict[str, torch.Tensor]:
    return OrtSession(path, threads=1).run(images)


def test_export_form_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="grid_sample"), fast.export_form("bilinear"):
        pass


def test_traced_graph_keeps_one_core_per_layer(tiny):
    model, _ = tiny
    targets = [n.target for n in float_graph(model, (160, 160)).graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.grid_sample not in targets
    assert targets.count(fast.sampling_core) == 5  # 2 encoder + 3 decoder layers


@pytest.mark.parametrize("form", fast.EXPORT_FORMS)
def test_exported_tiny_model_matches_torch(tiny, form, tmp_path):
    """Eager model, traced graph and ONNX file (both export forms; shape-dynamic) compute the same detections."""
    model, images = tiny
    gm = float_graph(model, (160, 160))
    with fast.export_form(form):
        lower_to_onnx(gm, images[:1], tmp_path / "tiny.onnx", opset=17)
    ops = {n.op_type for n in onnx.load(tmp_path / "tiny.onnx").graph.node}
    assert ("GridSample" in ops) == (form == "grid_sample")
    if form == "gather":
        assert {"Gather", "MatMul"} <= ops
    with torch.no_grad():
        eager = model(images)
        for size in ((160, 160), (128, 192)):
            x = images if size == (160, 160) else torch.randn(1, 3, *size)
            traced, ort = gm(x), _ort(tmp_path / "tiny.onnx", x)
            if size == (160, 160):  # batch norm is folded in the traced graph
                assert _max_diff(traced, eager, "pred_logits") <= 1e-4
            assert _max_diff(ort, traced, "pred_logits") <= 1e-4
            assert _max_diff(ort, traced, "pred_boxes") <= 1e-5


@pytest.mark.parametrize("runtime", [None, "openvino"], ids=["plain-qdq", "openvino-placement"])
def test_w8a8_export_parity_no_worse_than_grid_sample(tiny, runtime, tmp_path):
    """ORT vs the fake-quant graph, W8A8 min-max, plain QDQ lowering and the runtime-aware one of a target that
    keeps the float core (ORT CPU's gets the int8 core: tests/test_ms_deform_attn_int8.py): the Gather form adds at
    most float noise to the GridSample form's gap."""
    model, images = tiny
    calib = [torch.randn(1, 3, 160, 160) for _ in range(2)]
    gm = quantize_ptq(float_graph(model, (160, 160)), calib, "W8A8", progress=False, target=runtime)
    with torch.no_grad():
        traced = gm(images)
    gaps = {}
    for form in fast.EXPORT_FORMS:
        path = tmp_path / f"{form}.onnx"
        with fast.export_form(form):
            if runtime is None:
                lower_to_onnx(gm, images[:1], path)
            else:
                lower_for_runtime(gm, images[:1], path, runtime)
        gaps[form] = {k: _max_diff(_ort(path, images), traced, k) for k in ("pred_logits", "pred_boxes")}
    for key, floor in (("pred_logits", 1e-3), ("pred_boxes", 1e-4)):
        assert gaps["gather"][key] <= max(2 * gaps["grid_sample"][key], floor), gaps


def test_openvino_runs_the_export_as_onnxruntime_does(tiny, tmp_path):
    """OpenVINO (when installed) computes the exported Gather form as onnxruntime does (a 7-D broadcast Mul in an
    earlier version of the form came out wrong in OpenVINO 2026.4 while onnxruntime was right)."""
    ov = pytest.importorskip("openvino")
    model, images = tiny
    lower_to_onnx(float_graph(model, (160, 160)), images[:1], tmp_path / "tiny.onnx", opset=17)
    compiled = ov.Core().compile_model(str(tmp_path / "tiny.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled.create_infer_request().infer({"images": images.numpy()})
    by_name = {name: torch.from_numpy(value) for port, value in got.items() for name in port.get_names()}
    expected = _ort(tmp_path / "tiny.onnx", images)
    assert _max_diff(by_name, expected, "pred_logits") <= 1e-4
    assert _max_diff(by_name, expected, "pred_boxes") <= 1e-5
