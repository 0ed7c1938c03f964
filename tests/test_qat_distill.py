"""Issue 14's distillation pieces against independent references: Q-DETR's foreground-aware matching against a
brute-force loop, distribution alignment against the float64 formula, the attention KL against its definition,
the training graph against the inference graph, and a drd+aq QAT run exported to ONNX."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from box_reference import giou

from fxq.cli import main
from fxq.data import CocoDetection, eval_transforms, write_synthetic
from fxq.errors import InputError
from fxq.objectives.attention_distill import attention_kl
from fxq.objectives.drd import RectificationDistillation, foreground_queries, match_teacher
from fxq.passes.distribution_alignment import DistributionAlignment, align_queries
from fxq.passes.training_graph import GROUP_EMBED, split_query_groups, training_graph
from fxq.tracing import TRAIN_OUTPUTS

SIZE = 64


def _boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    return torch.cat([centre, size], 1)


@pytest.mark.parametrize("seed", range(5))
def test_foreground_matching_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    gt, student, teacher = _boxes(g, 3), _boxes(g, 12), _boxes(g, 12)
    tau = 0.5
    table = [[giou(gt[i].tolist(), student[j].tolist()) for j in range(12)] for i in range(3)]
    expect = [j for j in range(12) if any(table[i][j] > tau * max(table[i]) for i in range(3))]
    assert foreground_queries(student, gt, tau).tolist() == expect
    for j, k in zip(expect, match_teacher(student[expect], teacher).tolist(), strict=True):
        scores = [2 * giou(student[j].tolist(), teacher[t].tolist())
                  - 5 * sum(abs(x - y) for x, y in zip(student[j].tolist(), teacher[t].tolist(), strict=True))
                  for t in range(12)]
        assert k == max(range(12), key=scores.__getitem__)


def test_drd_distance_is_the_mean_norm_of_the_matched_features():
    g = torch.Generator().manual_seed(0)
    batch, queries, dim, layers = 2, 10, 8, 3
    targets = [{"boxes": _boxes(g, 2).float()}, {"boxes": _boxes(g, 1).float()}]

    def outputs():
        feats = [torch.randn(batch, queries, dim, generator=g) for _ in range(layers)]
        boxes = torch.stack([_boxes(g, queries) for _ in range(batch)]).float()
        return {"pred_boxes": boxes, TRAIN_OUTPUTS: {"cross_attention": feats}}

    student, teacher = outputs(), outputs()
    for f in student[TRAIN_OUTPUTS]["cross_attention"]:
        f.requires_grad_(True)
    drd = RectificationDistillation(weight=3.0)
    result = drd(student, teacher, targets)
    norms = []
    for s, t in zip(student[TRAIN_OUTPUTS]["cross_attention"], teacher[TRAIN_OUTPUTS]["cross_attention"],
                    strict=True):
        for b in range(batch):
            kept = foreground_queries(student["pred_boxes"][b], targets[b]["boxes"])
            for j in kept.tolist():
                k = int(match_teacher(student["pred_boxes"][b, [j]], teacher["pred_boxes"][b])[0])
                norms.append(math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(s[b, j].detach(), t[b, k],
                                                                                       strict=True))))
    assert norms
    assert result["drd.distance"].item() == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert result["loss_drd"].item() == pytest.approx(3 * sum(norms) / len(norms), rel=1e-5)
    result["loss_drd"].backward()
    assert all(f.grad is not None for f in student[TRAIN_OUTPUTS]["cross_attention"])


def test_drd_without_ground_truth_is_zero_with_a_gradient_path():
    feats = [torch.randn(1, 4, 8, requires_grad=True)]
    out = {"pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.2, TRAIN_OUTPUTS: {"cross_attention": feats}}
    result = RectificationDistillation()(out, out, [{"boxes": torch.zeros(0, 4)}])
    assert result["loss_drd"].item() == 0 and result["drd.pairs"].item() == 0
    result["loss_drd"].backward()
    assert feats[0].grad is not None


def test_distribution_alignment_equals_the_float64_formula():
    g = torch.Generator().manual_seed(0)
    module = DistributionAlignment(16)
    with torch.no_grad():
        module.weight.copy_(torch.randn(16, generator=g))
        module.bias.copy_(torch.randn(16, generator=g))
    q = torch.randn(2, 8, 5, 16, generator=g) * 3 + 1
    q64 = q.double()
    mu, var = q64.mean(-1, keepdim=True), ((q64 - q64.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    expect = (q64 - mu) / torch.sqrt(var + 1e-5) * module.weight.double() + module.bias.double()
    assert (module(q).double() - expect).abs().max() < 1e-5


def test_attention_kl_definition_and_gradient_only_to_the_student():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, 7, generator=g).softmax(-1).requires_grad_(True)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    student = logits.softmax(-1)
    assert attention_kl(teacher.detach().clone(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-7)
    kl = attention_kl(student, teacher)
    t, s = teacher.detach().double(), student.detach().double()
    assert kl.item() == pytest.approx(float((t * (t.log() - s.log())).sum(-1).mean()), rel=1e-5)
    kl.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(InputError, match="differ"):
        attention_kl(student, teacher[:, :4])


@pytest.fixture(scope="module", params=["detr_tiny", "deformable_detr_tiny"])
def graph(request):
    from fxq.models import build
    from fxq.ptq import float_graph

    model = build(request.param, seed=0)
    return request.param, float_graph(model, (SIZE, SIZE)), model


def test_training_graph_shares_parameters_and_keeps_the_inference_outputs(graph):
    name, gm, model = graph
    before = set(gm.state_dict())
    view = training_graph(gm)
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = gm(image), view(image)
    assert torch.equal(ref["pred_logits"], got["pred_logits"]) and torch.equal(ref["pred_boxes"], got["pred_boxes"])
    train = got[TRAIN_OUTPUTS]
    layers = len(model.transformer.decoder.layers)
    assert len(train["decoder_features"]) == len(train["cross_attention"]) == layers
    assert len(train["encoder_attention"]) == len(model.transformer.encoder.layers)
    queries = ref["pred_logits"].shape[1]
    assert all(f.shape[:2] == (1, queries) for f in train["cross_attention"])
    # the row sums of every encoder attention distribution are 1 (a softmax over keys / levels × points)
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in train["encoder_attention"])
    assert dict(view.named_parameters()).keys() <= before | set()
    assert all(view.get_parameter(k) is p for k, p in gm.named_parameters())
    assert set(gm.state_dict()) == before and TRAIN_OUTPUTS not in gm(image)


def test_auxiliary_query_groups_leave_the_first_group_unchanged(graph):
    name, gm, model = graph
    queries = gm.get_parameter("query_embed.weight")
    embed = torch.nn.Parameter(torch.randn(2 * queries.shape[0], queries.shape[1],
                                           generator=torch.Generator().manual_seed(2)))
    view = training_graph(gm, query_groups=3, group_embed=embed)
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ref = gm(image)
    out = split_query_groups(view(image), gm.num_queries, 3)
    assert (out["pred_logits"] - ref["pred_logits"]).abs().max() < 1e-4
    assert (out["pred_boxes"] - ref["pred_boxes"]).abs().max() < 1e-5
    assert len(out["group_outputs"]) == 2
    # another group's queries give other detections, and its loss reaches the auxiliary queries only there
    assert not torch.allclose(out["group_outputs"][0]["pred_boxes"], ref["pred_boxes"])
    out["group_outputs"][1]["pred_boxes"].sum().backward()
    grad = embed.grad.view(2, queries.shape[0], -1)
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0
    assert not any(GROUP_EMBED in k for k in gm.state_dict())
    with pytest.raises(InputError, match="group_embed"):
        training_graph(gm, query_groups=2, group_embed=embed)


def test_align_queries_inserts_one_module_per_decoder_attention(graph):
    import copy

    name, gm, model = graph
    gm = copy.deepcopy(gm)
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    names = align_queries(gm, image)
    layers = len(model.transformer.decoder.layers)
    assert len(names) == (2 * layers if name == "detr_tiny" else layers)  # Deformable: self-attention only
    assert all(gm.get_submodule(n).weight.min() > 0 for n in names)  # γ = mean σ of the calibration queries


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, seed=1, train=8, val=2, size=SIZE)
    return root


@pytest.mark.parametrize("model", ["detr_tiny", "deformable_detr_tiny"])
def test_drd_aq_run_exports_the_aligned_student_with_parity(synth, tmp_path, model):
    from fxq.backends import OrtSession
    from fxq.qat import load_run

    run, out = tmp_path / "run", tmp_path / "qat.onnx"
    args = ["qat", model, "--data", str(synth), "--policy", "4-4-8", "--init", "minmax", "--size", str(SIZE),
            "--steps", "2", "--batch-size", "2", "--calib-images", "2", "--distill", "kd+drd+aq", "--aux-groups", "2",
            "--warmup", "0", "--no-progress", "--out", str(run)]
    assert main(args) == 0
    log = (run / "log.jsonl").read_text()
    for term in ("loss_drd", "drd.pairs", "loss_aq", "aq.attention_kl", "kd.class"):
        assert term in log, term
    _, student = load_run(run)
    state = student.state_dict()
    assert any(k.startswith("fxq_align") for k in state)
    assert not any("group" in k for k in state)
    assert main(["export", "--qat", str(run), "--out", str(out)]) == 0
    session = OrtSession(out, optimization="disable", threads=1)
    data = CocoDetection.from_folder(synth, "val", transforms=eval_transforms(SIZE))
    for image in (data[0][0], data[1][0]):
        with torch.no_grad():
            ref = student(image[None])
        got = session.run(image[None])
        assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max() < 1e-3


@pytest.mark.parametrize(("extra", "message"), [
    (["--distill", "kd+foo"], "unknown ['foo']"),
    (["--distill", "drd+drd"], "repeated"),
    (["--distill", "aq", "--aux-groups", "0"], "--aux-groups 0"),
    (["--distill", "drd", "--drd-tau", "-1"], "--drd-tau -1"),
])
def test_bad_distillation_options_are_refused_before_work(synth, tmp_path, capsys, extra, message):
    args = ["qat", "detr_tiny", "--data", str(synth), "--policy", "4-4-8", "--size", str(SIZE),
            "--out", str(tmp_path / "run"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_combinations_are_ordered_and_unique():
    from fxq.qat import distill_methods

    assert distill_methods("aq+kd") == distill_methods("kd+aq")
    assert all(len(distill_methods("+".join(c))) == len(c)
               for r in (1, 2, 3) for c in itertools.permutations(("kd", "drd", "aq"), r))
