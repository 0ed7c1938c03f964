"""QAT core: LSQ / LSQ+ gradients, second-order flow through quantizers, scale projection, prepare_qat."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DATA
from torch import nn
from torch.utils.data import DataLoader, Subset

import fxq
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.errors import InputError
from fxq.passes import annotate_policy, calibrate, insert_quantizers, quantizers
from fxq.passes.analysis_io import save_analysis
from fxq.passes.policy import quantizable_nodes
from fxq.passes.prepare_qat import default_init, keep_qparams_valid, prepare_qat, qat_structure
from fxq.passes.weights import weight_of
from fxq.ptq import float_graph, quantize_ptq
from fxq.quant import FakeQuantizer
from fxq.quant.fake_quant import MIN_LEARNABLE_SCALE

# -- LSQ / LSQ+ gradients of one quantizer ---------------------------------------------------------------


def _inputs(scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, n: int, gen: torch.Generator):
    """float64 values x = (k + u)·s per channel with integer codes k + z away from the clamp edges
    (k + z ∉ {qmin−1, qmin, qmax, qmax+1}) and |u| ≤ 0.4 (away from rounding boundaries)."""
    rows = []
    for s, z in zip(scale.tolist(), zp.tolist(), strict=True):
        codes = [c for c in range(qmin - 4, qmax + 5) if c not in (qmin - 1, qmin, qmax, qmax + 1)]
        k = torch.tensor(codes, dtype=torch.float64)[torch.randint(len(codes), (n,), generator=gen)] - z
        u = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.8
        rows.append((k + u) * s)
    return torch.stack(rows)


def _lsq_reference(x, v, s, z, qmin, qmax, g):
    """dL/ds and dL/dz of L = Σ v·x̂ per channel, LSQ / LSQ+ formulas in float64, written out here."""
    r = torch.round(x / s[:, None])
    code = r + z[:, None]
    below, above = code < qmin, code > qmax
    inside = ~(below | above)
    ds = torch.where(inside, r - x / s[:, None], torch.where(below, qmin - z[:, None], qmax - z[:, None]))
    dz = torch.where(inside, torch.zeros_like(x), -s[:, None].expand_as(x))
    return g * (v * ds).sum(1), g * (v * dz).sum(1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradients_equal_the_formulas_and_finite_differences(symmetric):
    gen = torch.Generator().manual_seed(1)
    bits, channels, n = 4, 3, 200
    fq = FakeQuantizer(bits, symmetric=symmetric, axis=0, learnable=True)
    qmin, qmax = fq.qrange.qmin, fq.qrange.qmax
    scale = torch.tensor([0.05, 0.3, 1.7])
    zp = torch.zeros(channels) if symmetric else torch.tensor([3.0, 8.0, 12.0])
    fq.set_qparams(scale, zp)
    x = _inputs(scale, zp, qmin, qmax, n, gen)
    v = torch.randn(channels, n, generator=gen, dtype=torch.float64)
    (v * fq(x)).sum().backward()
    g = 1.0 / math.sqrt(n * qmax)  # per channel: the n elements of one channel share a scale
    ds, dz = _lsq_reference(x, v, scale.double(), zp.double(), qmin, qmax, g)
    assert torch.allclose(fq.scale.grad.double(), ds, rtol=1e-5, atol=1e-7)
    if not symmetric:
        assert torch.allclose(fq.zero_point.grad.double(), dz, rtol=1e-5, atol=1e-7)
        assert (dz != 0).all(), "some values must be clamped for the zero-point test to mean anything"

    def loss_at(s, z):
        probe = FakeQuantizer(bits, symmetric=symmetric, axis=0)
        probe.set_qparams(s, z)
        return (v * probe(x)).sum(1), probe.scale.double()

    # Central differences of the forward, the backward's gradient scale g applied by hand. Away from rounding
    # boundaries the forward's derivative in s is round(x/s) inside the range (and the clamped codes outside);
    # the straight-through estimator adds −x/s inside the range, which the difference cannot see.
    code = torch.round(x / scale.double()[:, None]) + zp.double()[:, None]
    inside = (code >= qmin) & (code <= qmax)
    ste = -(v * torch.where(inside, x / scale.double()[:, None], torch.zeros_like(x))).sum(1)
    for c in range(channels):
        up, down = scale.clone(), scale.clone()
        up[c], down[c] = scale[c] * (1 + 1e-4), scale[c] * (1 - 1e-4)
        (f_up, s_up), (f_down, s_down) = loss_at(up, zp), loss_at(down, zp)
        fd = (f_up[c] - f_down[c]) / (s_up[c] - s_down[c])
        assert fq.scale.grad[c].item() == pytest.approx(g * (fd + ste[c]).item(), rel=1e-6, abs=1e-9)
        if not symmetric:  # the forward rounds z: a central difference of one integer step
            zu, zd = zp.clone(), zp.clone()
            zu[c], zd[c] = zp[c] + 1, zp[c] - 1
            fd_z = (loss_at(scale, zu)[0][c] - loss_at(scale, zd)[0][c]) / 2
            assert fq.zero_point.grad[c].item() == pytest.approx(g * fd_z.item(), rel=1e-5, abs=1e-7)


def test_grad_scale_numel_sets_lsq_n_for_activations():
    x = torch.randn(4, 50, dtype=torch.float64) * 2  # a batch of 4 "images" of 50 features
    grads = []
    for numel in (None, 50):
        fq = FakeQuantizer(4, symmetric=False, learnable=True)
        fq.set_qparams(0.3, 7.0)
        fq.grad_scale_numel = numel
        fq(x).square().sum().backward()
        grads.append(fq.scale.grad.item())
    assert grads[1] == pytest.approx(grads[0] * math.sqrt(200 / 50), rel=1e-6)


def test_second_order_gradients_flow_through_round_and_grad_scale():
    """Autograd's d²L/ds² of L = Σ v·x̂² is 2·g²·Σ v·(∂x̂/∂s)²: the straight-through ∂x̂/∂s (round(x/s) − x/s
    inside the range, a constant outside) has zero derivative in s, so only the product rule's first term is
    left, and the double backward must apply the gradient scale g on both of its paths."""
    gen = torch.Generator().manual_seed(2)
    fq = FakeQuantizer(4, symmetric=False, learnable=True)
    s, z = 0.2, 6.0
    fq.set_qparams(s, z)
    x = _inputs(torch.tensor([s]), torch.tensor([z]), 0, 15, 300, gen)[0]
    v = torch.rand(300, generator=gen, dtype=torch.float64)
    (grad_s,) = torch.autograd.grad((v * fq(x).square()).sum(), fq.scale, create_graph=True)
    (second,) = torch.autograd.grad(grad_s, fq.scale)
    g = 1.0 / math.sqrt(300 * 15)
    r = torch.round(x / s)
    code = r + z
    dxs = torch.where(code > 15, 15 - z, torch.where(code < 0, -z, r - x / s))
    assert second.item() == pytest.approx((2 * g * g * (v * dxs.square()).sum()).item(), rel=1e-5)


class TinyDetector(nn.Module):
    """A conv → pool → linear "detector" with fxq's traced interface, small enough for many optimiser steps."""

    head, num_classes, num_queries = "sigmoid", 3, 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.hidden = nn.Linear(6, 8)
        self.class_embed = nn.Linear(8, self.num_queries * self.num_classes)
        self.bbox_embed = nn.Linear(8, self.num_queries * 4)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(images)).mean(dim=(2, 3))
        h = torch.tanh(self.hidden(h))
        logits = self.class_embed(h).reshape(-1, self.num_queries, self.num_classes)
        return {"pred_logits": logits, "pred_boxes": self.bbox_embed(h).reshape(-1, self.num_queries, 4).sigmoid()}


def tiny_float_graph(seed: int = 0) -> fxq.tracing.DetectorGraph:
    torch.manual_seed(seed)
    return fxq.trace(TinyDetector(), torch.zeros(1, 3, 8, 8))


def test_keep_qparams_valid_keeps_scales_positive_under_a_huge_learning_rate():
    images = torch.rand(4, 3, 8, 8) * 4
    gms = [prepare_qat(tiny_float_graph(), [images], "W4A4", init="minmax", overrides={}).gm for _ in range(2)]
    for hooked, gm in zip((False, True), gms, strict=True):
        opt = torch.optim.SGD([p for n, p in gm.named_parameters() if "fxq_q" in n], lr=1e6)
        if hooked:
            keep_qparams_valid(gm, opt)
        for _ in range(3):
            opt.zero_grad()
            out = gm(images)
            (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
            opt.step()
        scales = torch.cat([q.scale.detach().flatten() for q in quantizers(gm).values()])
        if not hooked:
            assert (scales <= 0).any(), "the step must be large enough to break the scales without the hook"
            continue
        assert (scales >= MIN_LEARNABLE_SCALE).all() and torch.isfinite(scales).all()
        for q in quantizers(gm).values():
            assert ((q.zero_point >= q.qrange.qmin) & (q.zero_point <= q.qrange.qmax)).all()
        assert all(torch.isfinite(v).all() for v in gm(images).values())


# -- prepare_qat on the embedded tiny models -----------------------------------------------------------------


def fixture_loader() -> DataLoader:
    """Four real COCO images (160 px) in batches of two, for calibration."""
    ds = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 160))
    return DataLoader(Subset(ds, range(4)), batch_size=2, collate_fn=collate)


@pytest.fixture(scope="module")
def calib():
    return fixture_loader()


@pytest.fixture(scope="module")
def float_graphs():
    return {name: float_graph(fxq.models.build(name), (160, 160)) for name in ("detr_tiny", "deformable_detr_tiny")}


def _outputs(gm, loader):
    images = next(iter(loader))[0]
    with torch.no_grad():
        return gm(images)


def _check_learnable(gm, method):
    qs = quantizers(gm)
    assert qs
    shapes = {n.name: n.meta["fxq.shape"] for n in gm.graph.nodes if n.name in qs}
    batch = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["fxq.shape"][0]
    for node in gm.graph.nodes:
        if node.name not in qs:
            continue
        q = qs[node.name]
        assert isinstance(q.scale, nn.Parameter) and q.mode == "quantize" and not q.observer.has_data
        assert isinstance(q.zero_point, nn.Parameter) == (not q.symmetric)
        if node.meta["fxq.quantizer"]["kind"] == "weight":
            assert q.grad_scale_numel is None
        else:
            assert q.grad_scale_numel == math.prod(shapes[node.name]) // batch
        assert node.meta["fxq.qat"]["init"] == method


@pytest.mark.parametrize(("name", "policy", "method"), [("detr_tiny", "W4A8", "percentile"),
                                                        ("deformable_detr_tiny", "4-4-8", "minmax")])
def test_prepare_qat_starts_from_the_ptq_graph_exactly(float_graphs, calib, name, policy, method):
    fgm = float_graphs[name]
    result = prepare_qat(fgm, calib, policy, init=method)
    assert result.info["init"] == method
    _check_learnable(result.gm, method)
    ptq = quantize_ptq(fgm, calib, policy, method, progress=False)
    ours, reference = _outputs(result.gm, calib), _outputs(ptq, calib)
    assert torch.equal(ours["pred_logits"], reference["pred_logits"])
    assert torch.equal(ours["pred_boxes"], reference["pred_boxes"])
    kinds = {n.meta["fxq.quantizer"]["kind"] for n in result.gm.graph.nodes if "fxq.quantizer" in n.meta}
    assert kinds == {"weight", "activation", "attention"}
    assert all("fxq.qspec" not in n.meta for n in fgm.graph.nodes), "the float graph (teacher) stays float"


@pytest.mark.parametrize("source", ["policy", "allocation"])
def test_prepare_qat_for_a_target_equals_ptq_for_it(float_graphs, calib, tmp_path, source):
    fgm = float_graphs["detr_tiny"]
    if source == "policy":
        gm = prepare_qat(fgm, calib, "W4A8", init="minmax", target="ort-cpu").gm
    else:
        uniform = copy.deepcopy(fgm)
        annotate_policy(uniform, "W4A8")
        save_analysis(uniform, tmp_path / "uniform.json")
        gm = prepare_qat(fgm, calib, allocation=tmp_path / "uniform.json", init="minmax", target="ort-cpu").gm
    ptq = quantize_ptq(fgm, calib, "W4A8", "minmax", progress=False, target="ort-cpu")
    assert [n.name for n in gm.graph.nodes] == [n.name for n in ptq.graph.nodes]
    ours, reference = _outputs(gm, calib), _outputs(ptq, calib)
    assert torch.equal(ours["pred_logits"], reference["pred_logits"])
    assert torch.equal(ours["pred_boxes"], reference["pred_boxes"])


def test_qat_structure_rebuilds_a_trained_graph_without_data(float_graphs, calib):
    fgm = float_graphs["deformable_detr_tiny"]
    trained = prepare_qat(fgm, calib, "4-4-8", init="minmax", target="ort-cpu").gm
    with torch.no_grad():  # stand-in for training: move every weight, scale and zero-point
        for name, p in trained.named_parameters():
            p.add_(0.01 * torch.randn_like(p) * (p.abs().mean() if "zero_point" not in name else 100))
        for q in quantizers(trained).values():
            q.project_()
    rebuilt = qat_structure(fgm, trained.state_dict(), "4-4-8", init="lp:3", target="ort-cpu")
    assert torch.equal(_outputs(rebuilt, calib)["pred_boxes"], _outputs(trained, calib)["pred_boxes"])
    _check_learnable(rebuilt, "lp:3")
    with pytest.raises(RuntimeError, match="Missing key"):
        qat_structure(fgm, {k: v for k, v in trained.state_dict().items() if "fxq_q" not in k}, "4-4-8")


def test_prepare_qat_from_a_saved_allocation(float_graphs, calib, tmp_path):
    fgm = float_graphs["detr_tiny"]
    uniform = copy.deepcopy(fgm)
    annotate_policy(uniform, "W4A8")
    save_analysis(uniform, tmp_path / "uniform.json")
    from_file = prepare_qat(fgm, calib, allocation=tmp_path / "uniform.json", init="minmax").gm
    ptq = quantize_ptq(fgm, calib, "W4A8", "minmax", progress=False)
    assert torch.equal(_outputs(from_file, calib)["pred_logits"], _outputs(ptq, calib)["pred_logits"])

    mixed = copy.deepcopy(uniform)  # a hand-made mixed allocation: alternate 3 / 8 weight bits
    weights = [n for n in quantizable_nodes(mixed) if "fxq.qspec" in n.meta and n.meta["fxq.role"] == "conv"]
    for i, node in enumerate(weights):
        node.meta["fxq.qspec"] = node.meta["fxq.qspec"].replace(w_bits=(3, 8)[i % 2])
    save_analysis(mixed, tmp_path / "mixed.json")
    gm = prepare_qat(fgm, calib, allocation=tmp_path / "mixed.json", init="minmax").gm
    _check_learnable(gm, "minmax")
    weight_qs = _weight_quantizers(gm)
    assert [weight_qs[n.name].bits for n in weights] == [(3, 8)[i % 2] for i in range(len(weights))]
    insert_quantizers(mixed)  # the reference: the benchmark's own insert + calibrate on the annotated graph
    calibrate(mixed, calib, progress=False)
    assert torch.equal(_outputs(gm, calib)["pred_boxes"], _outputs(mixed, calib)["pred_boxes"])


def _weight_quantizers(gm) -> dict[str, FakeQuantizer]:
    """The weight quantizer of every quantized conv/linear node, by the node's name."""
    qs = quantizers(gm)
    return {n.name: qs[n.meta["fxq.quantized_inputs"]["weight"]] for n in gm.graph.nodes
            if (n.meta.get("fxq.quantized_inputs") or {}).get("weight")}


def test_lsq_initialisation(float_graphs, calib):
    fgm = float_graphs["detr_tiny"]
    gm = prepare_qat(fgm, calib, "W4A8", init="lsq").gm
    weight_qs = _weight_quantizers(gm)
    for name, q in weight_qs.items():  # LSQ: 2·mean|w|/sqrt(Qp) per output channel of the (folded) weight
        w = weight_of(gm, next(n for n in gm.graph.nodes if n.name == name)).double()
        expected = 2 * w.abs().flatten(1).mean(1) / math.sqrt(q.qrange.qmax)
        assert torch.allclose(q.scale.detach().double(), expected, rtol=1e-6)
    reference = quantizers(quantize_ptq(fgm, calib, "W4A8", "minmax", progress=False))
    inputs = [n for n in gm.graph.nodes if n.meta.get("fxq.quantizer", {}).get("kind") in ("activation", "attention")]
    assert inputs
    for node in inputs:  # LSQ+ for affine activations: s = (max − min)/(Qp − Qn), zero-point at min
        q = gm.get_submodule(node.target)
        assert torch.equal(q.scale.detach(), reference[node.name].scale.detach())
        assert torch.equal(q.zero_point.detach(), reference[node.name].zero_point.detach())


def test_default_init_follows_the_fewest_bits(float_graphs):
    for policy, expected in (("W8A8", "mse"), ("W8A16", "mse"), ("W4A8", "lp:3"), ("W2A4-Att8", "lp:3")):
        gm = copy.deepcopy(float_graphs["detr_tiny"])
        annotate_policy(gm, policy)
        assert default_init(gm) == expected, policy
    images = torch.rand(2, 3, 8, 8)  # prepare_qat uses it (on a tiny graph: the Lp search is slow on detr_tiny)
    for policy, expected in (("W8A8", "mse"), ("W4A8", "lp:3")):
        result = prepare_qat(tiny_float_graph(), [images], policy, overrides={})
        reference = quantize_ptq(tiny_float_graph(), [images], policy, expected, overrides={}, progress=False)
        assert result.info["init"] == expected
        assert torch.equal(result.gm(images)["pred_boxes"], reference(images)["pred_boxes"])


def test_prepare_qat_bad_input(float_graphs, calib, tmp_path):
    fgm = float_graphs["detr_tiny"]
    with pytest.raises(InputError, match="initialisation 'lsqq' is unknown"):
        prepare_qat(fgm, calib, "W4A8", init="lsqq")
    with pytest.raises(InputError, match="no node an fxq.qspec"):
        prepare_qat(fgm, calib)
    with pytest.raises(InputError, match="either a uniform policy or an allocation"):
        prepare_qat(fgm, calib, "W4A8", allocation=tmp_path / "x.json")
    other = copy.deepcopy(float_graphs["deformable_detr_tiny"])
    annotate_policy(other, "W4A8")
    save_analysis(other, tmp_path / "deformable.json")
    mine = {n.name: n.meta["fxq.role"] for n in fgm.graph.nodes}
    first = next(n.name for n in other.graph.nodes
                 if "fxq.qspec" in n.meta and mine.get(n.name) not in ("conv", "linear", "attn_qk", "attn_av"))
    with pytest.raises(InputError, match=f"node '{first}' (does not exist|is a)"):
        prepare_qat(fgm, calib, allocation=tmp_path / "deformable.json")
