"""The int8 sampling core of multi-scale deformable attention (fxq/models/ms_deform_attn_int8.py) and its wiring
(fxq/passes/sampling_values.py).

The core is checked against a float64 evaluation of its definition written here (dequantized value, corner
weights rounded per (query, head) row), against the float core within the rounding bound its docstring states,
brute force for the footprint table, and onnxruntime for its export; the wiring on deformable_detr_tiny: which
nodes change, PyTorch vs ORT on real images (trained weights), and a QAT graph's learnable value scale.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from conftest import DATA
from deform_reference import bilinear_reference, random_inputs
from test_runtime_lowering import TRAINED_BOUNDS

import fxq
import fxq.models.ms_deform_attn as msda
from fxq.backends import OrtSession, lower_for_runtime
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.models import ms_deform_attn_fast as fast
from fxq.models import ms_deform_attn_int8 as int8
from fxq.passes.policy import DEFAULT_OVERRIDES
from fxq.passes.prepare_qat import prepare_qat
from fxq.ptq import float_graph, quantize_ptq
from fxq.roles import quantizers

CASES = [  # batch, levels (H, W), heads, head_dim, points, queries
    (1, [(8, 8), (4, 4), (2, 2), (1, 1)], 8, 4, 4, 30),
    (2, [(7, 9), (4, 5), (2, 3)], 3, 5, 2, 11),
    (1, [(20, 20), (10, 10), (5, 5)], 4, 32, 4, 50),
]
IDS = ["n1-L4", "n2-L3", "n1-L3-d32"]


def dequantized(value: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """float64 s · (clamp(round(v / s) + z, 0, 255) − z)."""
    q = (torch.round(value.double() / scale) + zero_point).clamp(0, 255)
    return (q - zero_point) * scale


def rounded_reference(value: torch.Tensor, shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The definition in float64 for locations in [0, 1]: every corner weight c = (1 − |x − xi|)(1 − |y − yi|)·a
    rounded to s = (the query-head row's largest c) / 255, neighbours outside the map read 0."""
    batch, _, heads, dim = value.shape
    queries = locations.shape[1]
    n = torch.arange(batch)[:, None, None, None]
    m = torch.arange(heads)[None, None, :, None]
    maps = value.double().split([h * w for h, w in shapes], dim=1)
    corners = []  # (weight [N, Lq, M, P], sample [N, Lq, M, P, D]) per level and corner
    for level, (h, w) in enumerate(shapes):
        grid = maps[level].reshape(batch, h, w, heads, dim)
        x = locations[:, :, :, level, :, 0].double() * w - 0.5
        y = locations[:, :, :, level, :, 1].double() * h - 0.5
        for xi in (x.floor(), x.floor() + 1):
            for yi in (y.floor(), y.floor() + 1):
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                c = (1 - (x - xi).abs()) * (1 - (y - yi).abs()) * weights[:, :, :, level].double()
                sample = grid[n, yi.clamp(0, h - 1).long(), xi.clamp(0, w - 1).long(), m] * inside[..., None]
                corners.append((c, sample))
    row_max = torch.stack([c.amax(-1) for c, _ in corners], -1).amax(-1)[..., None]
    scale = row_max / 255
    out = sum(((torch.round(c / scale) * scale)[..., None] * sample).sum(3) for c, sample in corners)
    return out.reshape(batch, queries, heads * dim)


def _inside(case, seed=0):
    value, locations, weights = random_inputs(*case, seed=seed)
    return value, locations.clamp(0, 1), weights


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_int8_core_equals_its_definition(case):
    """float32 rounding only, but a corner weight at a .5 tie may round the other way in float32 than in
    float64 (the bilinear fractions differ by float32 rounding): each such flip moves an output by at most
    s_w·max|v̂|, and only a few outputs in a hundred see one."""
    value, locations, weights = _inside(case)
    scale, zero_point = int8.value_qparams(value)
    got = int8.ms_deform_attn_core_int8(value, case[1], locations, weights, scale, zero_point)
    v_hat = dequantized(value, scale, zero_point)
    expected = rounded_reference(v_hat, case[1], locations, weights)
    err = (got.double() - expected).abs()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (err > 1e-5).double().mean() <= 0.01
    assert err.max() <= 1e-5 + weights.max() / 255 * v_hat.abs().max()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_int8_core_is_the_float_core_within_the_rounding_bound(case):
    """Value rounding ≤ s_v/2 per sample (attention weights sum to 1 per query and head), plus the corner
    weights' ≤ s_w/2 each on |v| ≤ max|v̂|; locations anywhere (off-map samples read the zero-point padding)."""
    value, locations, weights = random_inputs(*case, seed=1)
    scale, zero_point = int8.value_qparams(value)
    got = int8.ms_deform_attn_core_int8(value, case[1], locations, weights, scale, zero_point)
    expected = bilinear_reference(value, case[1], locations, weights)
    corner_terms = 4 * len(case[1]) * case[4]
    bound = scale / 2 + corner_terms * (weights.max() / 255 / 2) * dequantized(value, scale, zero_point).abs().max()
    assert (got.double() - expected).abs().max() <= bound
    rms = (got.double() - expected).pow(2).mean().sqrt()
    assert rms <= scale  # far below the worst case: the rounding errors do not add up


def test_off_map_samples_read_zero_with_a_nonzero_zero_point():
    shapes = [(4, 6), (2, 3)]
    value, locations, weights = random_inputs(1, shapes, 2, 3, 2, 5, seed=2)
    value = value.abs() + 1  # all positive: zero-point 0 ...
    value[0, 0, 0, 0] = -2.0  # ... but for this one, so z > 0 and the padding must hold z, not 0
    scale, zero_point = int8.value_qparams(value)
    assert zero_point > 0
    outside = torch.where(torch.rand(locations.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -2.0, 3.0)
    assert int8.ms_deform_attn_core_int8(value, shapes, outside, weights, scale, zero_point).abs().max() == 0


def test_footprint_table_rows_are_the_four_padded_neighbours():
    shapes = [(3, 4), (2, 2)]
    g = torch.Generator().manual_seed(5)
    value_q = torch.randint(0, 256, (2, 16, 3, 2), generator=g, dtype=torch.uint8)
    table = int8.footprint_table(value_q, shapes, 7)
    rows, start = [], 0
    for image in range(2):
        for head in range(3):
            start = 0
            for h, w in shapes:
                grid = torch.full((h + 3, w + 3, 2), 7, dtype=torch.uint8)  # padded: 1 before, 2 after
                grid[1:h + 1, 1:w + 1] = value_q[image, start:start + h * w, head].reshape(h, w, 2)
                for y in range(h + 2):
                    for x in range(w + 2):
                        rows.append(torch.cat([grid[y, x], grid[y, x + 1], grid[y + 1, x], grid[y + 1, x + 1]]))
                start += h * w
    assert torch.equal(table, torch.stack(rows))


def test_fake_quantized_rows_round_each_row_and_pass_gradients():
    w = torch.rand(3, 5, 16, dtype=torch.float64, requires_grad=True)
    got = int8.fake_quantized_rows(w)
    scale = w.detach().amax(-1, keepdim=True) / 255
    assert torch.allclose(got, torch.round(w.detach() / scale) * scale, rtol=0, atol=1e-15)
    assert torch.allclose(got.detach().amax(-1), w.detach().amax(-1), rtol=1e-15, atol=0)  # the row max: 255 steps
    got.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


class _Core(torch.nn.Module):
    def __init__(self, shapes, scale, zero_point):
        super().__init__()
        self.shapes, self.scale, self.zero_point = shapes, scale, zero_point

    def forward(self, value, locations, weights):
        return int8.ms_deform_attn_core_int8(value, self.shapes, locations, weights, self.scale, self.zero_point)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_exported_int8_core_runs_in_onnxruntime_as_in_torch(case):
    value, locations, weights = random_inputs(*case, seed=3)
    scale, zero_point = int8.value_qparams(value)
    module = _Core(case[1], scale, zero_point)
    buffer = io.BytesIO()
    torch.onnx.export(module, (value, locations, weights), buffer, dynamo=False, opset_version=17,
                      input_names=["value", "locations", "weights"])
    model = onnx.load_from_string(buffer.getvalue())
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulInteger" in ops and "GridSample" not in ops and "MatMul" not in ops
    import onnxruntime as ort

    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"value": value.numpy(), "locations": locations.numpy(), "weights": weights.numpy()})
    assert np.abs(got - module(value, locations, weights).numpy()).max() <= 1e-5


# --- wired into deformable_detr_tiny ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 160))
    batch, _, targets = next(iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)))
    return batch, torch.stack([t["orig_size"] for t in targets])


@pytest.fixture(scope="module")
def float_gm():
    torch.manual_seed(0)
    return float_graph(fxq.models.build("deformable_detr_tiny"), (160, 160))  # embedded trained weights


def _cores(gm) -> list:
    return [n for n in gm.graph.nodes if n.target in (fast.sampling_core, int8.quantized_sampling_core)]


def test_only_the_ort_target_gets_the_int8_core(float_gm, images):
    calib = [images[0][:2]]
    for target in (None, "openvino", "tensorrt"):  # OpenVINO measured slower with it; TensorRT has no such kernel
        plain = quantize_ptq(float_gm, calib, "W8A8", progress=False, target=target)
        assert {n.target for n in _cores(plain)} == {fast.sampling_core}, target
    gm = quantize_ptq(float_gm, calib, "W8A8", progress=False, target="ort-cpu")
    cores = _cores(gm)
    assert len(cores) == 5 and {n.target for n in cores} == {int8.quantized_sampling_core}  # 2 encoder + 3 decoder
    qs = quantizers(gm)
    for core in cores:
        q = qs[core.args[0].name]
        assert core.args[0].meta["fxq.quantizer"]["kind"] == "attention"
        assert q.bits == 8 and q.uint8_qparams() is not None
        assert gm.get_submodule(core.args[4].target) is q
    float_values = {"*.value_proj": None, **DEFAULT_OVERRIDES}
    floated = quantize_ptq(float_gm, calib, "W8A8", progress=False, target="ort-cpu", overrides=float_values)
    assert {n.target for n in _cores(floated)} == {fast.sampling_core}


def test_int8_core_graph_matches_onnxruntime_on_real_images(float_gm, images, tmp_path):
    """PyTorch fake-quant graph vs ORT's integer kernels, W8A8 for ORT CPU, trained weights: within the bounds the
    graph without the int8 core meets (tests/test_runtime_lowering.py; measured with the int8 core: logits max /
    mean 0.081 / 0.011, boxes 0.0049 / 6.5e-4; without it 0.073 / 0.0099, 0.0042 / 5.4e-4)."""
    batch, sizes = images
    gm = quantize_ptq(float_gm, [batch[:2]], "W8A8", progress=False, target="ort-cpu")
    path = tmp_path / "int8.onnx"
    lower_for_runtime(gm, batch[:1], path, "ort-cpu", verify=False)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulInteger") == 5 and "GridSample" not in ops
    with torch.no_grad():
        ref = gm(batch)
    got = OrtSession(path, threads=1).run(batch)
    bounds = TRAINED_BOUNDS["deformable_detr_tiny"]
    for key, (max_bound, mean_bound) in zip(("pred_logits", "pred_boxes"), bounds, strict=True):
        diff = (got[key] - ref[key]).abs()
        assert diff.max() <= max_bound and diff.mean() <= mean_bound, key


def test_int8_core_in_torch_is_the_float_core_on_the_rounded_operands(float_gm, images):
    """The graph's node computes the Gather form on the quantizer's value and row-rounded corner weights: equal to
    the grid_sample core on the same value within float noise plus the corner weights' rounding."""
    gm = quantize_ptq(float_gm, [images[0][:2]], "W8A8", progress=False, target="ort-cpu")
    case = (1, [(20, 20), (10, 10), (5, 5), (3, 3)], 8, 32, 4, 40)
    value, locations, weights = random_inputs(*case)
    q = quantizers(gm)[_cores(gm)[0].args[0].name]
    v_hat = q(value)
    got = int8.quantized_sampling_core(v_hat, case[1], locations, weights, q)
    float_core = msda.ms_deform_attn_core(v_hat, case[1], locations, weights)
    bound = 4 * 4 * 4 * (weights.max() / 255 / 2) * v_hat.abs().max() + 1e-5
    assert (got - float_core).abs().max() <= bound
    assert not torch.equal(got, float_core)
    q.disable()
    assert torch.equal(int8.quantized_sampling_core(value, case[1], locations, weights, q), fast.sampling_core(
        value, case[1], locations, weights))


def test_qat_learns_the_value_scale_through_the_int8_core(float_gm, images):
    gm = prepare_qat(float_gm, [images[0][:2]], "W8A8", target="ort-cpu").gm
    core = _cores(gm)[0]
    assert core.target is int8.quantized_sampling_core
    q = quantizers(gm)[core.args[0].name]
    assert q.scale.requires_grad
    gm.train()
    out = gm(images[0][:2])
    (out["pred_logits"].square().mean() + out["pred_boxes"].sum()).backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
