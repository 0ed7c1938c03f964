"""fxq.objectives against independent references: hand formulas, brute force, per-query loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fxq.errors import InputError
from fxq.objectives import (
    CriticalObjective,
    HungarianMatcher,
    SetCriterion,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    build_criterion,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    transform_labels,
    transform_logits,
    transform_outputs,
    transform_targets,
)

# ---------------------------------------------------------------- references (float64, plain Python)


def ref_giou(a, b):
    """GIoU of two xyxy boxes given as Python floats."""
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def to_xyxy(b):
    cx, cy, w, h = (float(v) for v in b)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def ref_cost(logit, box, label, tbox, head, weights):
    """Assignment cost of one query/target pair, written out."""
    wc, wb, wg = weights
    if head == "softmax":
        exps = [math.exp(float(v)) for v in logit]
        c_class = -exps[label] / sum(exps)
    else:
        p = 1 / (1 + math.exp(-float(logit[label])))
        c_class = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(float(x) - float(y)) for x, y in zip(box, tbox, strict=True))
    return wc * c_class + wb * l1 - wg * ref_giou(to_xyxy(box), to_xyxy(tbox))


def brute_force_min(cost, repeat=1):
    """Minimum total cost over all injective assignments of (repeated) targets to queries."""
    queries, n = cost.shape
    cost = cost.tolist()
    cols = [j for _ in range(repeat) for j in range(n)]
    return min(
        sum(cost[q][j] for q, j in zip(perm, cols, strict=True))
        for perm in itertools.permutations(range(queries), len(cols))
    )


def random_problem(seed, batch=2, queries=5, num_logits=6, counts=(3, 0), head="softmax"):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, num_logits, generator=g, dtype=torch.float64),
        "pred_boxes": torch.rand(batch, queries, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2,
    }
    num_classes = num_logits - 1 if head == "softmax" else num_logits
    targets = [
        {
            "boxes": torch.rand(n, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2,
            "labels": torch.randint(0, num_classes, (n,), generator=g),
        }
        for n in counts
    ]
    return outputs, targets


# ---------------------------------------------------------------- box ops


def test_giou_matches_hand_formula_on_known_boxes():
    cases = [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
        ([0, 0, 1, 1], [2, 0, 3, 1], 0 - (3 - 2) / 3),
        ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),
    ]
    for a, b, expected in cases:
        assert ref_giou(a, b) == pytest.approx(expected, abs=1e-12)
        got = generalized_box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
        assert got.item() == pytest.approx(expected, abs=1e-9)
    iou, _ = box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
    assert iou.item() == pytest.approx(1 / 7, abs=1e-6)


def test_pairwise_ops_are_batched_and_match_reference():
    g = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(3, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    got = generalized_box_iou(a, b)
    assert got.shape == (3, 4, 5)
    for i, n, m in itertools.product(range(3), range(4), range(5)):
        assert got[i, n, m].item() == pytest.approx(ref_giou(a[i, n].tolist(), b[i, m].tolist()), abs=1e-9)
    diag = elementwise_generalized_box_iou(a[:, :4], b[:, :4])
    assert torch.allclose(diag, torch.diagonal(got[:, :, :4], dim1=1, dim2=2))


def test_box_format_round_trip():
    boxes = torch.rand(7, 4, dtype=torch.float64)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    assert box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])


# ---------------------------------------------------------------- matcher


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_matcher_costs_match_reference(head):
    outputs, targets = random_problem(0, counts=(3, 2), head=head)
    matcher = HungarianMatcher(head=head)
    weights = (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou)
    assert weights == ((1.0, 5.0, 2.0) if head == "softmax" else (2.0, 5.0, 2.0))
    costs = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"], targets)
    for b, (cost, t) in enumerate(zip(costs, targets, strict=True)):
        for q, j in itertools.product(range(cost.shape[0]), range(cost.shape[1])):
            ref = ref_cost(outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q], int(t["labels"][j]),
                           t["boxes"][j], head, weights)
            assert cost[q, j].item() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("seed", range(4))
def test_matcher_is_optimal_by_brute_force(head, seed):
    outputs, targets = random_problem(seed, counts=(seed % 4 + 1, 0), head=head)
    matcher = HungarianMatcher(head=head)
    costs = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"], targets)
    matches = matcher(outputs, targets)
    for cost, (query, target), t in zip(costs, matches, targets, strict=True):
        assert len(query) == len(t["labels"]) == len(set(query.tolist()))
        assert sorted(target.tolist()) == list(range(len(t["labels"])))
        got = cost[query, target].sum().item() if len(query) else 0.0
        best = brute_force_min(cost.double()) if len(query) else 0.0
        assert got == pytest.approx(best, abs=1e-5)


def test_one_to_many_matching_is_optimal_and_repeats_each_target():
    outputs, targets = random_problem(7, queries=6, counts=(3, 1))
    matcher = HungarianMatcher(repeat=2)
    costs = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"], targets)
    for cost, (query, target), t in zip(costs, matcher(outputs, targets), targets, strict=True):
        assert len(set(query.tolist())) == len(query) == 2 * len(t["labels"])
        assert all(target.tolist().count(j) == 2 for j in range(len(t["labels"])))
        assert cost[query, target].sum().item() == pytest.approx(brute_force_min(cost.double(), 2), abs=1e-5)


def test_matcher_rejects_bad_inputs():
    outputs, targets = random_problem(0, num_logits=4)
    targets[0]["labels"][0] = 3  # the no-object index of a 3-class softmax head
    with pytest.raises(InputError, match="outside"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(InputError, match="unknown head"):
        HungarianMatcher(head="tanh")
    outputs, targets = random_problem(0)
    outputs["pred_logits"][0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        HungarianMatcher()(outputs, targets)


# ---------------------------------------------------------------- criterion


def ref_layer_losses(outputs, targets, matches, head, num_boxes, eos_coef=0.1):
    """CE (or focal), L1 and GIoU of one layer, written as loops over queries."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch, queries, k = logits.shape
    assigned = {}
    for b, (query, target) in enumerate(matches):
        for q, j in zip(query.tolist(), target.tolist(), strict=True):
            assigned[b, q] = j
    ce_sum = weight_sum = 0.0
    for b, q in itertools.product(range(batch), range(queries)):
        row = [float(v) for v in logits[b, q]]
        j = assigned.get((b, q))
        label = int(targets[b]["labels"][j]) if j is not None else None
        if head == "softmax":
            cls = k - 1 if label is None else label
            w = eos_coef if label is None else 1.0
            log_z = math.log(sum(math.exp(v) for v in row))
            ce_sum += w * (log_z - row[cls])
            weight_sum += w
        else:
            for c, x in enumerate(row):
                y = 1.0 if c == label else 0.0
                p = 1 / (1 + math.exp(-x))
                bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
                p_t = p * y + (1 - p) * (1 - y)
                ce_sum += (0.25 * y + 0.75 * (1 - y)) * bce * (1 - p_t) ** 2
    l1 = giou = 0.0
    for (b, q), j in assigned.items():
        tbox = targets[b]["boxes"][j]
        l1 += sum(abs(float(x) - float(y)) for x, y in zip(boxes[b, q], tbox, strict=True))
        giou += 1 - ref_giou(to_xyxy(boxes[b, q]), to_xyxy(tbox))
    ce = ce_sum / weight_sum if head == "softmax" else ce_sum / num_boxes
    return {"loss_ce": ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_criterion_terms_match_reference(head):
    outputs, targets = random_problem(3, counts=(3, 2), head=head)
    criterion = SetCriterion(head=head)
    losses = criterion(outputs, targets)
    matches = criterion.matcher(outputs, targets)
    ref = ref_layer_losses(outputs, targets, matches, head, num_boxes=5)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[term].item() == pytest.approx(ref[term], rel=1e-6), term
    weights = (1, 5, 2) if head == "softmax" else (2, 5, 2)
    expected = sum(w * ref[t] for w, t in zip(weights, ("loss_ce", "loss_bbox", "loss_giou"), strict=True))
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_softmax_ce_matches_torch_weighted_cross_entropy():
    outputs, targets = random_problem(5, counts=(2, 1))
    criterion = SetCriterion()
    matches = criterion.matcher(outputs, targets)
    classes = torch.full((2, 5), 5, dtype=torch.int64)
    for b, (q, j) in enumerate(matches):
        classes[b, q] = targets[b]["labels"][j]
    weight = torch.tensor([1.0] * 5 + [0.1], dtype=torch.float64)
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), classes, weight=weight)
    got = criterion.layer_losses(outputs, targets, matches, criterion.num_boxes(targets))["loss_ce"]
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_aux_losses_add_up(head):
    outputs, targets = random_problem(11, counts=(2, 3), head=head)
    aux = [random_problem(12 + i, counts=(2, 3), head=head)[0] for i in range(2)]
    criterion = SetCriterion(head=head)
    total = criterion({**outputs, "aux_outputs": aux}, targets)
    parts = [criterion(o, targets) for o in [outputs, *aux]]
    assert total["loss"].item() == pytest.approx(sum(p["loss"].item() for p in parts), rel=1e-9)
    for i, part in enumerate(parts[1:]):
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            assert total[f"{term}_{i}"].item() == pytest.approx(part[term].item(), rel=1e-9)
    no_aux = SetCriterion(head=head, aux=False)({**outputs, "aux_outputs": aux}, targets)
    assert no_aux["loss"].item() == pytest.approx(parts[0]["loss"].item(), rel=1e-9)


def test_criterion_handles_images_without_targets_and_custom_weights():
    outputs, targets = random_problem(2, counts=(0, 0))
    losses = SetCriterion(weights={"loss_ce": 3.0})(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss"].item() == pytest.approx(3 * losses["loss_ce"].item())


def test_one_to_many_criterion_normalises_by_repeated_count():
    outputs, targets = random_problem(4, queries=6, counts=(2, 1))
    criterion = build_criterion(one_to_many=2)
    assert criterion.num_boxes(targets).item() == 6.0
    matches = criterion.matcher(outputs, targets)
    ref = ref_layer_losses(outputs, targets, matches, "softmax", num_boxes=6)
    losses = criterion(outputs, targets)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[term].item() == pytest.approx(ref[term], rel=1e-6)


# ---------------------------------------------------------------- critical-category objective


def ref_transform(logits, critical, head):
    """Per-query loop: critical logits (sorted ids), max of the other real classes, no-object."""
    num_classes = logits.shape[-1] - 1 if head == "softmax" else logits.shape[-1]
    crit = sorted(critical)
    out = torch.empty(*logits.shape[:-1], len(crit) + 1 + (head == "softmax"), dtype=logits.dtype)
    for idx in itertools.product(*(range(s) for s in logits.shape[:-1])):
        row = logits[idx].tolist()
        others = max(row[c] for c in range(num_classes) if c not in crit)
        new = [row[c] for c in crit] + [others] + ([row[-1]] if head == "softmax" else [])
        out[idx] = torch.tensor(new, dtype=logits.dtype)
    return out


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_transformation_matches_per_query_loop(head):
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    critical = [4, 1]
    assert torch.equal(transform_logits(logits, critical, head), ref_transform(logits, critical, head))
    labels = torch.tensor([0, 1, 2, 4, 5, 1])
    assert transform_labels(labels, critical, 6).tolist() == [2, 0, 2, 1, 2, 0]


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_transformation_is_differentiable(head):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: transform_logits(x, [0, 2], head), (logits,))
    outputs, targets = random_problem(9, queries=3, num_logits=6, counts=(2, 1), head=head)
    outputs["pred_logits"] = logits
    objective = CriticalObjective(SetCriterion(head=head), [0, 2], alpha=0.5)
    objective(outputs, targets)["loss_critical"].backward()
    grad = logits.grad
    num_classes = 5 if head == "softmax" else 6
    non_critical = [c for c in range(num_classes) if c not in (0, 2)]
    assert grad[..., [0, 2]].abs().sum() > 0
    # through the max, exactly the largest non-critical logit of each query receives gradient
    top = logits.detach()[..., non_critical].argmax(-1)
    for idx in itertools.product(range(2), range(3)):
        received = [c for c in non_critical if grad[idx][c] != 0]
        assert received == [non_critical[int(top[idx])]]


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_critical_objective_combines_both_losses(head):
    outputs, targets = random_problem(6, queries=5, num_logits=7, counts=(3, 2), head=head)
    aux = [random_problem(60, queries=5, num_logits=7, counts=(3, 2), head=head)[0]]
    outputs["aux_outputs"] = aux
    criterion = SetCriterion(head=head)
    result = CriticalObjective(criterion, [1, 3], alpha=0.3)(outputs, targets)
    num_classes = 6 if head == "softmax" else 7
    ref_outputs = {
        "pred_logits": ref_transform(outputs["pred_logits"], [1, 3], head),
        "pred_boxes": outputs["pred_boxes"],
        "aux_outputs": [{**a, "pred_logits": ref_transform(a["pred_logits"], [1, 3], head)} for a in aux],
    }
    ref_targets = [
        {"boxes": t["boxes"], "labels": torch.tensor([{1: 0, 3: 1}.get(int(v), 2) for v in t["labels"]])}
        for t in targets
    ]
    l_f = criterion(ref_outputs, ref_targets)["loss"]
    l_a = criterion(outputs, targets)["loss"]
    assert result["loss_critical"].item() == pytest.approx(l_f.item(), rel=1e-9)
    assert result["loss_all"].item() == pytest.approx(l_a.item(), rel=1e-9)
    assert result["loss"].item() == pytest.approx(0.3 * l_a.item() + l_f.item(), rel=1e-9)
    assert {"all.loss_ce", "critical.loss_giou_0"} <= set(result)
    transformed = transform_outputs(outputs, [1, 3], head)
    assert transformed["aux_outputs"][0]["pred_logits"].shape[-1] == (4 if head == "softmax" else 3)
    assert transform_targets(targets, [1, 3], num_classes)[0]["labels"].tolist() == ref_targets[0]["labels"].tolist()


def test_critical_ids_are_validated():
    outputs, targets = random_problem(0, num_logits=6)  # softmax: 5 classes + no-object at 5
    criterion = SetCriterion()
    with pytest.raises(InputError, match="no-object"):
        CriticalObjective(criterion, [1, 5])(outputs, targets)
    with pytest.raises(InputError, match="not a category"):
        CriticalObjective(criterion, [9], num_classes=5)
    with pytest.raises(InputError, match="not a category"):
        transform_logits(outputs["pred_logits"], [-1], "softmax")
    with pytest.raises(InputError, match="duplicates"):
        CriticalObjective(criterion, [1, 1])
    with pytest.raises(InputError, match="empty"):
        CriticalObjective(criterion, [])
    with pytest.raises(InputError, match="nothing is left"):
        CriticalObjective(criterion, range(5))(outputs, targets)
    with pytest.raises(InputError, match="not a category"):
        CriticalObjective(SetCriterion(head="sigmoid"), [6])(*random_problem(0, num_logits=6, head="sigmoid"))


def test_query_groups_add_one_matched_criterion_per_group():
    """With group_outputs, the total is the sum of the criterion of each group on its own (Group DETR)."""
    outputs, targets = random_problem(21, counts=(2, 3), head="sigmoid")
    groups = [random_problem(22 + i, counts=(2, 3), head="sigmoid")[0] for i in range(2)]
    criterion = SetCriterion(head="sigmoid", weights={"loss_ce": 5.0})
    total = criterion({**outputs, "group_outputs": groups}, targets)
    parts = [criterion(o, targets) for o in [outputs, *groups]]
    assert total["loss"].item() == pytest.approx(sum(p["loss"].item() for p in parts), rel=1e-9)
    assert total["g2.loss_giou"].item() == pytest.approx(parts[2]["loss_giou"].item(), rel=1e-9)
    assert total["loss_ce"].item() == pytest.approx(parts[0]["loss_ce"].item(), rel=1e-9)
