"""Fisher analysis, Hutchinson traces and weight sensitivity against independent float64 references.

Expectation modes under test: per-batch (default: ‖g_batch‖² averaged over batches) and per-sample
(‖g_image‖² of each image as a batch of one, averaged over images).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fxq
from fxq.objectives import build_criterion, transform_outputs, transform_targets
from fxq.passes.fisher import fisher_traces, load_analysis, save_analysis
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.hutchinson import hutchinson_trace, hutchinson_traces
from fxq.passes.pass_manager import PassManager
from fxq.passes.policy import annotate_policy
from fxq.passes.remove_dropout import remove_dropout
from fxq.passes.sensitivity import weight_sensitivity
from fxq.passes.weights import WeightRef, weight_nodes

CRITICAL = [1, 2, 3]


class TinyDetector(nn.Module):
    """A detector-shaped model small enough for exact Hessians: conv -> pool -> MLP -> logits and boxes."""

    head, num_classes, num_queries = "softmax", 4, 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2, 8)
        self.cls = nn.Linear(8, self.num_queries * (self.num_classes + 1))
        self.box = nn.Linear(8, self.num_queries * 4)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = torch.relu(self.fc1(torch.relu(self.conv(images)).mean((2, 3))))
        b = images.shape[0]
        return {"pred_logits": self.cls(h).reshape(b, self.num_queries, -1),
                "pred_boxes": self.box(h).sigmoid().reshape(b, self.num_queries, 4)}


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.only = nn.Conv2d(3, 3, 1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.only(images)


def make_batches(n_batches: int, batch: int, size: int, num_classes: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        images = torch.randn(batch, 3, size, size, generator=g).to(dtype)
        mask = torch.zeros(batch, size, size, dtype=torch.bool)
        targets = []
        for _ in range(batch):
            n = int(torch.randint(1, 4, (1,), generator=g))
            centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
            wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
            targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                            "boxes": torch.cat([centre, wh], 1).to(dtype)})
        out.append((images, mask, targets))
    return out


def tiny_graph(dtype=torch.float32) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = fxq.trace(TinyDetector(), torch.randn(1, 3, 8, 8))
    return gm.to(dtype)


@pytest.fixture(scope="module")
def detr64():
    """detr_tiny (random weights), traced and folded, in float64."""
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build("detr_tiny"), torch.randn(1, 3, 64, 64))
    PassManager([remove_dropout, fold_batchnorm])(gm)
    return gm.double()


def reference_traces(gm, batches, per_sample: bool, alpha: float) -> dict[str, dict[str, float]]:
    """Direct float64 computation: autograd.grad of L_A and L_F per unit, squared norms over each weight."""
    crit = build_criterion(gm.head, aux=False)
    refs = {node.name: ref for node, ref in weight_nodes(gm)}
    params = {ref.param: gm.get_parameter(ref.param) for ref in refs.values()}
    sums = {k: dict.fromkeys(refs, 0.0) for k in ("overall", "critical", "combined")}
    units = []
    for images, _, targets in batches:
        units += [(images[i:i + 1], [targets[i]]) for i in range(len(targets))] if per_sample else [(images, targets)]
    for images, targets in units:
        out = gm(images)
        l_a = crit(out, targets)["loss"]
        critical = transform_outputs(out, CRITICAL, gm.head), transform_targets(targets, CRITICAL, gm.num_classes)
        l_f = crit(*critical)["loss"]
        values = list(params.values())
        g_a = dict(zip(params, torch.autograd.grad(l_a, values, retain_graph=True, allow_unused=True), strict=True))
        g_f = dict(zip(params, torch.autograd.grad(l_f, values, allow_unused=True), strict=True))
        for name, ref in refs.items():
            ga = ref.select(g_a[ref.param]) if g_a[ref.param] is not None else torch.zeros(())
            gf = ref.select(g_f[ref.param]) if g_f[ref.param] is not None else torch.zeros(())
            sums["overall"][name] += float((ga ** 2).sum())
            sums["critical"][name] += float((gf ** 2).sum())
            sums["combined"][name] += float(((alpha * ga + gf) ** 2).sum())
    numel = {name: ref.select(params[ref.param]).numel() for name, ref in refs.items()}
    return {k: {n: v / len(units) / numel[n] for n, v in s.items()} for k, s in sums.items()}


@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_equals_direct_float64_computation(detr64, per_sample):
    gm = copy.deepcopy(detr64)
    batches = make_batches(2, 2, 64, gm.num_classes, torch.float64)
    info = fisher_traces(gm, batches, objective="combined", critical_ids=CRITICAL, alpha=0.5,
                         per_sample=per_sample, progress=False).info
    expected = reference_traces(detr64, batches, per_sample, alpha=0.5)
    assert info["samples"] == 4 and info["batches"] == 2 and info["nodes"] == len(expected["overall"])
    nonzero = 0
    for node, _ in weight_nodes(gm):
        fisher = node.meta["fxq.fisher"]
        assert fisher["method"] == "empirical" and fisher["per_sample"] is per_sample and fisher["samples"] == 4
        for key in ("overall", "critical", "combined"):
            assert fisher[key] == pytest.approx(expected[key][node.name], rel=1e-9, abs=1e-300), (node.name, key)
        nonzero += fisher["overall"] > 0
    assert nonzero > 50


def test_per_sample_and_per_batch_differ_and_objectives_are_separate(detr64):
    gm = copy.deepcopy(detr64)
    batches = make_batches(1, 2, 64, gm.num_classes, torch.float64)
    fisher_traces(gm, batches, progress=False)
    batch = {n.name: n.meta["fxq.fisher"]["overall"] for n, _ in weight_nodes(gm)}
    assert set(next(iter(weight_nodes(gm)))[0].meta["fxq.fisher"]) >= {"overall"}
    assert "critical" not in next(iter(weight_nodes(gm)))[0].meta["fxq.fisher"]
    fisher_traces(gm, batches, per_sample=True, progress=False)
    sample = {n.name: n.meta["fxq.fisher"]["overall"] for n, _ in weight_nodes(gm)}
    # Jensen: ‖mean of the per-image gradients‖² <= mean of ‖per-image gradient‖² is not exact here (the batch
    # loss normalises by the batch's box count), but the two estimates must not coincide.
    assert any(not math.isclose(batch[n], sample[n], rel_tol=1e-6) for n in batch if batch[n] > 0)


def test_hutchinson_converges_to_an_explicit_hessian_trace():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = (m + m.T) / 2
    w = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=torch.float64)

    def loss():
        return 0.5 * w @ a @ w + b @ w + torch.sin(b[0])

    blocks = [w]  # one block: tr(H) = tr(A)
    probes = 1500
    estimate = hutchinson_trace(loss(), blocks, num_probes=probes, seed=3)[0]
    off = float((a ** 2).sum() - (a.diagonal() ** 2).sum())
    std = math.sqrt(2 * off / probes)  # exact standard deviation of the Rademacher estimator's mean
    assert abs(estimate - float(a.trace())) < 4 * std
    assert hutchinson_trace(loss(), blocks, num_probes=8, seed=3) == hutchinson_trace(loss(), blocks, 8, seed=3)
    # unbiased: the mean of many independent small estimates is close too, and they vary with the seed
    small = [hutchinson_trace(loss(), blocks, num_probes=4, seed=s)[0] for s in range(200)]
    assert len(set(small)) > 10
    assert abs(sum(small) / len(small) - float(a.trace())) < 4 * math.sqrt(2 * off / 800)


def test_hutchinson_two_blocks_with_cross_terms():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T / 12
    u = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.cat([u, v])
    probes = 1500
    shared = hutchinson_trace(0.5 * z @ a @ z, [u, v], num_probes=probes, seed=0)
    blockwise = hutchinson_trace(0.5 * z @ a @ z, [u, v], num_probes=probes, seed=0, blockwise=True)
    for k, rows in enumerate((slice(0, 5), slice(5, 12))):
        block = a[rows, rows]
        in_block = 2 * float((block ** 2).sum() - (block.diagonal() ** 2).sum())
        cross = float((a[rows] ** 2).sum() - (block ** 2).sum())  # i in the block, j outside: once each
        assert abs(shared[k] - float(block.trace())) < 4 * math.sqrt((in_block + cross) / probes)
        assert abs(blockwise[k] - float(block.trace())) < 4 * math.sqrt(in_block / probes)


def test_hutchinson_pass_matches_the_exact_hessian_of_the_detection_loss():
    gm = tiny_graph(torch.float64)
    batches = make_batches(1, 2, 8, gm.num_classes, torch.float64, seed=4)
    probes = 60
    hutchinson_traces(gm, batches, num_probes=probes, seed=0, blockwise=True, progress=False)
    images, _, targets = batches[0]
    crit = build_criterion("softmax", aux=False)
    params = dict(gm.named_parameters())
    for node, ref in weight_nodes(gm):
        weight = params[ref.param].detach()

        def loss_of(w, name=ref.param):
            return crit(torch.func.functional_call(gm, {**params, name: w}, (images,)), targets)["loss"]

        h = torch.autograd.functional.hessian(loss_of, weight).reshape(weight.numel(), -1)
        std = math.sqrt(2 * float((h ** 2).sum() - (h.diagonal() ** 2).sum()) / probes)  # of the blockwise mean
        fisher = node.meta["fxq.fisher"]
        assert fisher["method"] == "hutchinson" and fisher["probes"] == probes and fisher["blockwise"]
        assert abs(fisher["overall"] * weight.numel() - float(h.trace())) < 4 * std + 1e-12, node.name


def test_hutchinson_pass_combined_is_the_weighted_sum_and_seeded():
    gm = tiny_graph(torch.float64)
    batches = make_batches(2, 2, 8, gm.num_classes, torch.float64, seed=5)
    hutchinson_traces(gm, batches, objective="combined", critical_ids=[0], alpha=0.3, num_probes=3, seed=7,
                      progress=False)
    first = {n.name: dict(n.meta["fxq.fisher"]) for n, _ in weight_nodes(gm)}
    for f in first.values():
        assert f["combined"] == pytest.approx(0.3 * f["overall"] + f["critical"], rel=1e-9, abs=1e-15)
        assert f["samples"] == 4 and f["batches"] == 2 and not f["per_sample"]
    hutchinson_traces(gm, batches, objective="combined", critical_ids=[0], alpha=0.3, num_probes=3, seed=7,
                      progress=False)
    assert first == {n.name: n.meta["fxq.fisher"] for n, _ in weight_nodes(gm)}
    with pytest.raises(fxq.InputError, match="at least one probe"):
        hutchinson_traces(gm, batches, num_probes=0, progress=False)


def test_nan_gradient_names_the_node():
    gm = tiny_graph()
    batches = make_batches(1, 2, 8, gm.num_classes)
    handle = gm.get_parameter("fc1.weight").register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(fxq.InputError, match=r"node 'fc1'.*not finite"):
            fisher_traces(gm, batches, progress=False)
    finally:
        handle.remove()
    with torch.no_grad():
        gm.get_parameter("box.weight")[0, 0] = float("inf")
    with pytest.raises(fxq.InputError, match=r"node 'box'.*NaN/inf"):
        fisher_traces(gm, batches, progress=False)


def test_nan_image_and_empty_loader_and_missing_targets():
    gm = tiny_graph()
    images, mask, targets = make_batches(1, 2, 8, gm.num_classes)[0]
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(fxq.InputError, match=r"batch 0: images \[1\] hold NaN"):
        fisher_traces(gm, [(images, mask, targets)], progress=False)
    with pytest.raises(fxq.InputError, match="yielded no batches"):
        fisher_traces(gm, [], progress=False)
    with pytest.raises(fxq.InputError, match="yielded no batches"):
        hutchinson_traces(gm, [], progress=False)
    with pytest.raises(fxq.InputError, match="needs ground truth"):
        fisher_traces(gm, [images], progress=False)
    with pytest.raises(fxq.InputError, match="critical_ids"):
        fisher_traces(gm, make_batches(1, 1, 8, 5), objective="critical", progress=False)


def test_sensitivity_uses_the_projects_quantizer_numerics():
    gm = tiny_graph()
    fisher_traces(gm, make_batches(1, 2, 8, gm.num_classes), progress=False)
    weight_sensitivity(gm, (2, 4, 8))
    for node, ref in weight_nodes(gm):
        w = ref.select(gm.get_parameter(ref.param)).detach().double()
        rows = w.reshape(w.shape[0], -1)
        for bits in (2, 4, 8):
            qmax = 2 ** (bits - 1) - 1
            scale = (rows.abs().amax(1, keepdim=True) / qmax).float().double()  # float32 scales, like the exporter
            q = torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale
            err = float(((q - rows) ** 2).sum())
            s = node.meta["fxq.fisher"]["overall"]
            assert node.meta["fxq.quant_error"][bits] == pytest.approx(err, rel=1e-5)
            assert node.meta["fxq.sensitivity"][bits] == pytest.approx(s * err, rel=1e-5)
        assert node.meta["fxq.quant_error"][2] > node.meta["fxq.quant_error"][4] > node.meta["fxq.quant_error"][8]


def test_analysis_round_trip_and_mismatch(tmp_path):
    gm = tiny_graph()
    annotate_policy(gm, "W4A8", overrides={})
    fisher_traces(gm, make_batches(1, 2, 8, gm.num_classes), objective="combined", critical_ids=[0, 1],
                  progress=False)
    weight_sensitivity(gm, (4, 8), objective="combined")
    path = tmp_path / "analysis.json"
    assert save_analysis(gm, path) == 4
    fresh = tiny_graph()
    load_analysis(fresh, path)
    for a, b in zip(gm.graph.nodes, fresh.graph.nodes, strict=True):
        for key in ("fxq.fisher", "fxq.sensitivity", "fxq.quant_error", "fxq.qspec"):
            assert a.meta.get(key) == b.meta.get(key), (a.name, key)
    assert set(fresh.graph.find_nodes(op="call_module", target="fc1")[0].meta["fxq.sensitivity"]) == {4, 8}
    other = fxq.trace(OneConv(), torch.randn(1, 3, 8, 8))
    with pytest.raises(fxq.InputError, match="names nodes this graph lacks"):
        load_analysis(other, path)
    with pytest.raises(fxq.InputError, match="does not exist"):
        load_analysis(fresh, tmp_path / "missing.json")


def test_weight_ref_parsing():
    ref = WeightRef.parse("transformer.encoder.layers.0.self_attn.in_proj_weight[128:256]")
    assert ref.param.endswith("in_proj_weight") and ref.rows == (128, 256) and str(ref).endswith("[128:256]")
    assert WeightRef.parse("conv.weight") == WeightRef("conv.weight")
    assert ref.select(torch.arange(400)).tolist() == list(range(128, 256))
