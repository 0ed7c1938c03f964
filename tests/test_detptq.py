"""DetPTQ: per-layer choice of p by ODOL against the float graph's pseudo targets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fxq
from fxq.passes.detptq import detptq, pseudo_targets
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import annotate_policy
from fxq.passes.remove_dropout import remove_dropout
from fxq.quant import IntRange, fake_quantize, lp_error, search_clip_qparams
from fxq.quant.calibration import candidate_qparams
from fxq.quant.calibration_output import Operand, fit_output_qparams
from fxq.roles import quantizers


def _graphs(observer: str = "lp:2"):
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build("detr_tiny"), torch.randn(1, 3, 64, 64))
    remove_dropout(gm)
    fold_batchnorm(gm)
    reference = copy.deepcopy(gm)
    annotate_policy(gm, "W4A4", a_observer=observer, w_observer=observer)
    insert_quantizers(gm)
    return gm, reference


def test_pseudo_targets_keep_confident_queries_only():
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])  # 2 classes + no-object
    boxes = torch.rand(1, 2, 4)
    (t,) = pseudo_targets({"pred_logits": logits, "pred_boxes": boxes}, "softmax", 0.5)
    assert t["labels"].tolist() == [0] and torch.equal(t["boxes"], boxes[0, :1])
    (s,) = pseudo_targets({"pred_logits": logits, "pred_boxes": boxes}, "sigmoid", 0.9)
    assert s["labels"].tolist() == [0, 2]


def test_detptq_never_worse_than_best_uniform_p():
    gm, reference = _graphs()
    batches = [(torch.randn(2, 3, 64, 64), None, [])]
    info = detptq(gm, batches, reference, candidates=(1.0, 4.0), num_batches=1, score_threshold=0.02,
                  num_clip_ratios=10, progress=False).info
    assert info["final_odol"] <= min(info["uniform_odol"].values()) + 1e-6
    layers = [n for n in gm.graph.nodes if "fxq.detptq" in n.meta]
    assert len(layers) == info["layers"] > 50
    assert all(n.meta["fxq.detptq"]["p"] in (1.0, 4.0) for n in layers)
    methods = {n.meta["fxq.calib"]["method"] for n in gm.graph.nodes if "fxq.calib" in n.meta}
    assert info["fit"] == "output" and methods <= {"lp:1.0:output", "lp:4.0:output"}


def test_detptq_needs_lp_observers():
    gm, reference = _graphs(observer="minmax")
    with pytest.raises(fxq.InputError, match='a_observer="lp:2"'):
        detptq(gm, [torch.randn(1, 3, 64, 64)], reference, progress=False)


def test_detptq_refuses_an_unknown_fit():
    gm, reference = _graphs()
    with pytest.raises(fxq.InputError, match="fit 'outputs' is unknown"):
        detptq(gm, [torch.randn(1, 3, 64, 64)], reference, fit="outputs", progress=False)


# -- the output fit on one layer ----------------------------------------------------------------------------

W4, A4 = IntRange.of(4, True), IntRange.of(4, False)


def _linear_case(p: float):
    """A linear layer with heavy-tailed inputs: two cached batches, its per-channel weight and u4 input operands
    at their input-fitted (Lp on the operand itself) qparams."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 16, generator=g) ** 3 for _ in range(2)]
    w, b = torch.randn(6, 16, generator=g), torch.randn(6, generator=g)
    x_all = torch.cat(xs)
    w_lo, w_hi = w.amin(1), w.amax(1)
    x_lo, x_hi = x_all.min().reshape(1), x_all.max().reshape(1)
    w_start = search_clip_qparams(w, w_lo, w_hi, W4, True, lp_error(p), 20)
    x_start = search_clip_qparams(x_all.reshape(1, -1), x_lo, x_hi, A4, False, lp_error(p), 20)
    weight = Operand([w], W4, True, 0, w_lo, w_hi, w_start, channel_dim=-1)
    inp = Operand(xs, A4, False, None, x_lo, x_hi, (x_start[0].reshape(()), x_start[1].reshape(())))

    def layer(batch: int, operands: list[torch.Tensor]) -> torch.Tensor:
        return F.linear(operands[1], operands[0], b)

    reference = [F.linear(x, w, b) for x in xs]
    return layer, reference, weight, inp, (xs, w, b)


def _error64(data, wq: tuple, xq: tuple, p: float) -> torch.Tensor:
    """Per output channel Σ|O − Ô|^p over both batches, everything after the rounding in float64."""
    xs, w, b = data
    w_hat = fake_quantize(w, wq[0], wq[1], W4, axis=0).double()
    total = torch.zeros(w.shape[0], dtype=torch.float64)
    for x in xs:
        x_hat = fake_quantize(x, xq[0], xq[1], A4).double()
        diff = F.linear(x_hat, w_hat, b.double()) - F.linear(x.double(), w.double(), b.double())
        total += diff.abs().pow(p).sum(0)
    return total


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_output_fit_of_the_weight_equals_a_brute_force_search_per_channel(p):
    layer, reference, weight, inp, data = _linear_case(p)
    inp.search = False
    wq, xq = fit_output_qparams(layer, reference, [weight, inp], p, num_candidates=20)
    assert torch.equal(xq[0], inp.start[0])  # held, not searched
    scales, zps = candidate_qparams(weight.lo, weight.hi, W4, True, 20)
    scales, zps = torch.cat([weight.start[0][None], scales]), torch.cat([weight.start[1][None], zps])
    brute = torch.stack([_error64(data, (scales[k], zps[k]), xq, p) for k in range(len(scales))]).amin(0)
    torch.testing.assert_close(_error64(data, wq, xq, p), brute, rtol=1e-6, atol=0)
    assert not torch.equal(wq[0], weight.start[0])  # the output fit moved some channel's scale


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_output_fit_of_the_input_equals_a_brute_force_search(p):
    layer, reference, weight, inp, data = _linear_case(p)
    weight.search = False
    _, xq = fit_output_qparams(layer, reference, [weight, inp], p, num_candidates=20)
    scales, zps = candidate_qparams(inp.lo, inp.hi, A4, False, 20)
    scales, zps = torch.cat([inp.start[0].reshape(1, 1), scales]), torch.cat([inp.start[1].reshape(1, 1), zps])
    brute = min(_error64(data, weight.start, (scales[k, 0], zps[k, 0]), p).sum() for k in range(len(scales)))
    torch.testing.assert_close(_error64(data, weight.start, xq, p).sum(), brute, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0])
def test_output_fit_never_loses_to_the_input_fit_on_the_output(p):
    layer, reference, weight, inp, data = _linear_case(p)
    wq, xq = fit_output_qparams(layer, reference, [weight, inp], p, num_candidates=20, rounds=2)
    fitted, start = _error64(data, wq, xq, p).sum(), _error64(data, weight.start, inp.start, p).sum()
    assert fitted < start * (1 - 1e-3)  # strictly better here, not only by construction


def _layer_output_error(gm, reference, node_name: str, x: torch.Tensor, p: float) -> float:
    """Σ|O − Ô|^p of one layer: the float graph's input to it, only that layer's quantizers on."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    record = node.meta["fxq.quantized_inputs"]
    own = {n for n in [record["weight"], *record["inputs"]] if n is not None}
    outputs = {}
    for name, q in quantizers(gm).items():
        q.enable() if name in own else q.disable()
    for graph, key in ((gm, "quant"), (reference, "float")):
        hook = _OutputOf(graph, node_name)
        with torch.no_grad():
            hook.run(x)
        outputs[key] = hook.value
    return float((outputs["quant"] - outputs["float"]).abs().pow(p).sum(dtype=torch.float64))


class _OutputOf(torch.fx.Interpreter):
    def __init__(self, gm, name):
        super().__init__(gm)
        self.name, self.value = name, None

    def run_node(self, n):
        value = super().run_node(n)
        if n.name == self.name:
            self.value = value
        return value


def test_detptq_output_fit_lowers_each_layers_output_error_against_the_input_fit():
    x = torch.randn(2, 3, 64, 64)
    fitted = {}
    for fit in ("input", "output"):
        gm, reference = _graphs()
        info = detptq(gm, [(x, None, [])], reference, candidates=(2.0,), score_threshold=0.02, num_clip_ratios=10,
                      progress=False, fit=fit, fit_ratios=10).info
        assert info["fit"] == fit
        fitted[fit] = gm
    layers = [n.name for n in fitted["output"].graph.nodes if "fxq.detptq" in n.meta]
    conv = next(n for n in layers if "conv" in n)
    linear = next(n for n in layers if "linear" in n or "proj" in n)
    for name in (conv, linear):
        errors = {fit: _layer_output_error(gm, reference, name, x, 2.0) for fit, gm in fitted.items()}
        assert errors["output"] <= errors["input"] * (1 + 1e-6), (name, errors)
