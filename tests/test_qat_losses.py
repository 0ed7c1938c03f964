"""QAT losses: the Fisher-trace regularizer (double backprop), distillation from the float teacher, QATLoss."""

from __future__ import annotations

import copy

import pytest
import torch
from box_reference import giou
from test_qat import fixture_loader, tiny_float_graph
from torch import nn

import fxq
from fxq.errors import InputError
from fxq.objectives import (
    CriticalObjective,
    Distillation,
    FisherTraceRegularizer,
    QATLoss,
    build_criterion,
    fisher_trace,
)
from fxq.passes import prepare_qat, quantized_weights, quantizers
from fxq.ptq import float_graph
from fxq.quant import QSpec

# -- the regularizer -------------------------------------------------------------------------------------


class SmoothNet(nn.Module):
    """A float64 two-layer tanh net with a smooth loss: tr(Î_F) is smooth in its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.b(torch.tanh(self.a(x))) - y).square().mean()


def _trace_value(net: SmoothNet, x, y) -> float:
    """tr(Î_F) = Σ_θ (∂L/∂θ)² over the two weights, from first-order gradients only."""
    grads = torch.autograd.grad(net.loss(x, y), [net.a.weight, net.b.weight])
    return sum(g.square().sum() for g in grads).item()


def test_regularizer_gradient_equals_a_finite_difference_of_the_trace():
    torch.manual_seed(0)
    net = SmoothNet()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    reg = FisherTraceRegularizer({"a": net.a.weight, "b": net.b.weight}, weight=1.0)
    terms = reg(net.loss(x, y))
    assert terms["fisher_trace"].item() == pytest.approx(_trace_value(net, x, y), rel=1e-12)
    grads = torch.autograd.grad(terms["loss_fisher"], [net.a.weight, net.b.weight])
    h = 1e-6
    for param, grad in zip([net.a.weight, net.b.weight], grads, strict=True):
        for index in [(0, 0), (1, 2), (param.shape[0] - 1, param.shape[1] - 1)]:
            with torch.no_grad():
                param[index] += h
            up = _trace_value(net, x, y)
            with torch.no_grad():
                param[index] -= 2 * h
            down = _trace_value(net, x, y)
            with torch.no_grad():
                param[index] += h
            assert grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9)


def _float_twin(float_gm, quantized):
    """A float64 copy of the float graph whose weights are the quantized graph's fake-quantized weights."""
    twin = copy.deepcopy(float_gm).double()
    qs = quantizers(quantized)
    for node in quantized.graph.nodes:
        record = node.meta.get("fxq.quantized_inputs")
        if record and record["weight"]:
            weight = node.args[1].args[0].target  # the weight quantizer reads the get_attr parameter
            with torch.no_grad():
                twin.get_parameter(weight).copy_(qs[record["weight"]](quantized.get_parameter(weight)))
    return twin


def _smooth_loss(out):
    return (out["pred_boxes"] - 0.3).square().sum() + out["pred_logits"].tanh().square().sum()


def test_regularizer_flows_through_the_straight_through_quantizers():
    """On a weight-quantized graph (no weight clipped: min-max scales), ∂R/∂W through the STE equals the
    float graph's ∂R/∂V at V = Q(W): the STE Jacobian is the identity and the Hessian is the float one."""
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    fgm = tiny_float_graph()
    qat = prepare_qat(fgm, [images.float()], QSpec(w_bits=4, a_bits=None, attn_bits=None), init="minmax",
                      overrides={}).gm.double()
    weights = quantized_weights(qat)
    assert set(weights) == {"conv.weight", "hidden.weight", "class_embed.weight", "bbox_embed.weight"}
    reg = FisherTraceRegularizer(weights, weight=1.0)
    grads = torch.autograd.grad(reg(_smooth_loss(qat(images)))["loss_fisher"], list(weights.values()))
    twin = _float_twin(fgm, qat)
    twin_weights = [twin.get_parameter(name) for name in weights]
    twin_trace = fisher_trace(_smooth_loss(twin(images)), twin_weights)
    expected = torch.autograd.grad(twin_trace, twin_weights)
    for name, got, want in zip(weights, grads, expected, strict=True):
        assert got.abs().max() > 0, name
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), name
    scale = next(iter(quantizers(qat).values())).scale  # the trace depends on the scales too
    (scale_grad,) = torch.autograd.grad(fisher_trace(_smooth_loss(qat(images)), list(weights.values())), scale)
    assert scale_grad.abs().max() > 0


def _grads_of(gm, images, lam, detach=False):
    weights = quantized_weights(gm)
    loss = _smooth_loss(gm(images))
    if detach:  # the public reimplementation's bug: the inner gradient detached
        inner = torch.autograd.grad(loss, list(weights.values()), retain_graph=True)
        penalty = lam * sum(g.detach().square().sum() for g in inner)
    else:
        penalty = FisherTraceRegularizer(weights, lam)(loss)["loss_fisher"]
    return torch.autograd.grad(loss + penalty, list(weights.values()))


def test_regularizer_changes_the_weights_update_and_a_detached_one_does_not():
    images = torch.rand(3, 3, 8, 8)
    gm = prepare_qat(tiny_float_graph(), [images], "W4A8", init="minmax", overrides={}).gm
    plain = _grads_of(gm, images, 0.0)
    regularized = _grads_of(gm, images, 0.1)
    detached = _grads_of(gm, images, 0.1, detach=True)
    assert any((a - b).abs().max() > 1e-4 * a.abs().max() for a, b in zip(plain, regularized, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, detached, strict=True))


def test_a_few_steps_with_lambda_lower_the_trace():
    images = torch.rand(4, 3, 8, 8)
    start = prepare_qat(tiny_float_graph(), [images], "W4A8", init="minmax", overrides={}).gm
    traces = {}
    for lam in (0.0, 1.0):
        gm = copy.deepcopy(start)
        weights = quantized_weights(gm)
        reg = FisherTraceRegularizer(weights, lam)
        opt = torch.optim.SGD(weights.values(), lr=0.005)  # small steps: λ·|∇R|² decides (8 seeds: ratio ≤ 0.65)
        for _ in range(5):
            loss = _smooth_loss(gm(images))
            opt.zero_grad()
            (loss + reg(loss)["loss_fisher"]).backward()
            opt.step()
        traces[lam] = fisher_trace(_smooth_loss(gm(images)), weights.values()).item()
    assert traces[1.0] < 0.8 * traces[0.0], traces


def test_regularizer_weight_warmup_and_bad_input():
    p = nn.Parameter(torch.ones(2))
    reg = FisherTraceRegularizer([p], weight=4e-3, warmup_steps=100)
    assert [reg.weight_at(s) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 2e-3, 4e-3, 4e-3])
    terms = reg((p * p).sum(), step=0)  # λ_t = 0: logged, no second-order graph
    assert terms["fisher_trace"].item() == pytest.approx(8.0) and not terms["fisher_trace"].requires_grad
    with pytest.raises(InputError, match="λ=-0.001 must be a finite number >= 0"):
        FisherTraceRegularizer([p], weight=-1e-3)
    with pytest.raises(InputError, match="warmup_steps"):
        FisherTraceRegularizer([p], weight=1e-3, warmup_steps=-1)
    with pytest.raises(InputError, match="empty parameter set"):
        FisherTraceRegularizer([], weight=1e-3)
    with pytest.raises(InputError, match="does not depend on any parameter"):
        fisher_trace(torch.tensor(1.0), [p])
    with pytest.raises(InputError, match="does not reach"):
        fisher_trace((nn.Parameter(torch.ones(1)) * 2).sum(), [p])


def test_lazy_regularizer_runs_every_k_steps_at_k_times_the_weight():
    """every=K: no term (and no extra gradient) between regularized steps; at a multiple of K the value is K·λ·R
    (R from first-order gradients) and the gradient K times the every-step regularizer's."""
    torch.manual_seed(0)
    net = SmoothNet()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    weights = [net.a.weight, net.b.weight]
    lazy, eager = FisherTraceRegularizer(weights, 0.5, every=3), FisherTraceRegularizer(weights, 0.5)
    assert lazy.config()["every"] == 3 and "every" not in eager.config()  # older runs' fingerprints unchanged
    for step in (1, 2, 4, 5):
        assert lazy(net.loss(x, y), step) == {}
        loss = QATLoss(lambda out, targets: {"loss": net.loss(x, y)}, None, lazy)(None, [], step=step)
        assert set(loss) == {"loss", "loss_det"} and loss["loss"].item() == net.loss(x, y).item()
    for step in (0, 3, 6):
        terms = lazy(net.loss(x, y), step)
        assert terms["fisher_lambda"].item() == 1.5
        assert terms["loss_fisher"].item() == pytest.approx(1.5 * _trace_value(net, x, y), rel=1e-12)
        got = torch.autograd.grad(terms["loss_fisher"], weights)
        want = torch.autograd.grad(eager(net.loss(x, y), step)["loss_fisher"], weights)
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, 3 * w, rtol=1e-12, atol=0)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InputError, match="every="):
            FisherTraceRegularizer(weights, 0.5, every=bad)


# -- distillation ----------------------------------------------------------------------------------------


def _direct(student, teacher, head, foreground=False):
    """The three distillation terms, per query in float64 from their definitions; with ``foreground`` the box
    terms weighted by the teacher's probability that the query is an object."""
    zs, zt = student["pred_logits"].double().flatten(0, 1), teacher["pred_logits"].double().flatten(0, 1)
    bs, bt = student["pred_boxes"].double().flatten(0, 1), teacher["pred_boxes"].double().flatten(0, 1)
    cls, l1, gious, weights = [], [], [], []
    for i in range(zs.shape[0]):
        if head == "softmax":
            ps, pt = zs[i].exp() / zs[i].exp().sum(), zt[i].exp() / zt[i].exp().sum()
            cls.append((pt * (pt / ps).log()).sum().item())
            weights.append(1 - pt[-1].item() if foreground else 1.0)
        else:
            ps, pt = 1 / (1 + (-zs[i]).exp()), 1 / (1 + (-zt[i]).exp())
            cls.append((pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()).sum().item())
            weights.append(pt.max().item() if foreground else 1.0)
        l1.append((bs[i] - bt[i]).abs().sum().item())
        gious.append(1 - giou(bs[i].tolist(), bt[i].tolist()))
    def weighted(values):
        return sum(w * d for w, d in zip(weights, values, strict=True)) / sum(weights)

    return {"kd.class": sum(cls) / len(cls), "kd.bbox": weighted(l1), "kd.giou": weighted(gious)}


def _outputs(batch, queries, logits, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, queries, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=gen) * 0.3 + 0.05
    return {"pred_logits": torch.randn(batch, queries, logits, generator=gen) * 2,
            "pred_boxes": torch.cat([centres, sizes], -1)}


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_distillation_terms_equal_direct_computations(head):
    student, teacher = _outputs(2, 5, 7, 0), _outputs(2, 5, 7, 1)
    student = {k: v.requires_grad_() for k, v in student.items()}
    teacher = {k: v.requires_grad_() for k, v in teacher.items()}
    terms = Distillation(head, weights={"giou": 0.0}, boxes="all")(student, teacher)
    for key, value in _direct(student, teacher, head).items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
    assert terms["loss_kd"].item() == pytest.approx(terms["kd.class"].item() + 5 * terms["kd.bbox"].item(), rel=1e-6)
    terms["loss_kd"].backward()
    assert student["pred_logits"].grad.abs().sum() > 0 and teacher["pred_logits"].grad is None
    same = Distillation(head)(teacher, teacher)
    assert all(abs(same[k].item()) < 1e-6 for k in ("kd.class", "kd.bbox", "kd.giou"))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_foreground_weighted_box_distillation_equals_direct_computation(head):
    student, teacher = _outputs(2, 5, 7, 2), _outputs(2, 5, 7, 3)
    terms = Distillation(head, boxes="foreground")(student, teacher)
    for key, value in _direct(student, teacher, head, foreground=True).items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
    # a query the teacher is sure is background does not pull the student's box
    background = -30.0 * torch.ones(7)
    if head == "softmax":
        background[-1] = 30.0
    teacher["pred_logits"][0, 0] = background
    moved = {**student, "pred_boxes": student["pred_boxes"].clone()}
    moved["pred_boxes"][0, 0] = torch.tensor([0.9, 0.1, 0.05, 0.05])
    before = Distillation(head, boxes="foreground")(student, teacher)
    after = Distillation(head, boxes="foreground")(moved, teacher)
    for key in ("kd.bbox", "kd.giou"):
        assert after[key].item() == pytest.approx(before[key].item(), abs=1e-9), key
    uniform = Distillation(head, boxes="all")
    assert uniform(moved, teacher)["kd.bbox"] != uniform(student, teacher)["kd.bbox"]


def test_distillation_bad_input():
    with pytest.raises(InputError, match="weighting 'queries' is unknown"):
        Distillation("sigmoid", boxes="queries")
    with pytest.raises(InputError, match="unknown distillation terms"):
        Distillation("sigmoid", weights={"feature": 1.0})
    with pytest.raises(InputError, match="distillation weight of 'bbox'"):
        Distillation("sigmoid", weights={"bbox": -1.0})
    with pytest.raises(InputError, match="differ"):
        Distillation("sigmoid")(_outputs(1, 5, 7, 0), _outputs(1, 4, 7, 0))


# -- QATLoss on the embedded detr_tiny -------------------------------------------------------------------


def test_qat_loss_on_detr_tiny_sums_its_terms_and_regularizes_through_the_quantizers():
    fgm, calib = float_graph(fxq.models.build("detr_tiny"), (160, 160)), fixture_loader()
    gm = prepare_qat(fgm, calib, "W4A8", init="minmax").gm
    images, _, targets = next(iter(calib))
    targets = [{**t, "labels": t["labels"] % fgm.num_classes} for t in targets]  # COCO ids → the tiny classes
    critical = CriticalObjective(build_criterion(fgm.head, aux=False), [1, 2], num_classes=fgm.num_classes)
    weights = quantized_weights(gm)
    loss = QATLoss(critical, Distillation(fgm.head), FisherTraceRegularizer(weights, 1e-3))
    with torch.no_grad():
        teacher = fgm(images)
    terms = loss(gm(images), targets, teacher)
    assert terms["loss"].item() == pytest.approx(
        (terms["loss_det"] + terms["loss_kd"] + terms["loss_fisher"]).item(), rel=1e-6)
    outputs = gm(images)
    inner = critical(outputs, targets)["loss_critical"]  # the regularizer's loss is L_F
    assert terms["fisher_trace"].item() == pytest.approx(fisher_trace(inner, weights.values()).item(), rel=1e-4)
    penalty = torch.autograd.grad(terms["loss_fisher"], list(weights.values()), allow_unused=True)
    assert sum(g.abs().sum() for g in penalty if g is not None) > 0
    with pytest.raises(InputError, match="pass teacher_outputs"):
        loss(outputs, targets)
