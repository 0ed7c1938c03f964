"""Many empirical Fisher traces from one forward pass per batch, split into the criterion's terms.

For a loss L and quantizable node l with weight W_l, the per-batch Fisher statistic is ‖∂L/∂W_l‖² averaged over
batches, exactly what :func:`fxq.passes.fisher.fisher_traces` accumulates (``per_sample=False``; dividing by
numel(W_l) gives its ``s_l``). Here one forward pass per batch serves every objective:

- ``overall``: L_A, the DETR set loss (``aux=False``, ``rank_mean=False``, as the Fisher pass builds it);
- one entry per critical set C (a category alone or a supercategory): L_F, the set loss on FQ-DETR's transformed
  problem (:mod:`fxq.objectives.critical`), and a variant ``box_crit`` whose box terms (L1 + GIoU) count only the
  matched pairs whose ground truth is in C, normalised by the number of critical boxes in the batch (at least 1);
  its class term is L_F's.

Each loss is split into its weighted terms w_ce·ce, w_bbox·L1, w_giou·GIoU (weights 2/5/2, sigmoid heads); a
gradient of each term is taken once and the gradients of sums are formed from them (gradients are linear), so
per node and set we get ‖g‖² of: ``ce``, ``bbox``, ``giou``, ``box`` (= bbox + giou), ``total`` (= L_F, or L_A),
``box_crit`` (critical-only bbox + giou) and ``variant`` (= ce + box_crit). ‖g_total‖² differs from the sum of the
terms' ‖g‖² by the cross terms 2⟨g_ce, g_box⟩ + ...; the shares reported use the sum of the terms' traces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from fxq.objectives import build_criterion, transform_outputs, transform_targets
from fxq.passes.fisher import analysed_params, differentiable, gradients
from fxq.passes.fisher_objective import units

TERMS = ("ce", "bbox", "giou")
STATS = ("ce", "bbox", "giou", "box", "total")
VARIANT_STATS = ("box_crit", "variant")


def _weighted_terms(criterion, outputs: dict, targets: list[dict], others: int | None) -> dict[str, torch.Tensor]:
    """w·term of the final decoder layer (ce, bbox, giou); with ``others`` (the "others" label of a transformed
    problem) also the box terms on the critical pairs only (labels < others)."""
    device = outputs["pred_logits"].device
    matches = criterion.matcher(outputs, targets)
    num_boxes = criterion.num_boxes(targets, device)
    full = criterion.layer_losses(outputs, targets, matches, num_boxes)
    w = criterion.weights
    out = {t: w[f"loss_{t}"] * full[f"loss_{t}"] for t in TERMS}
    if others is not None:
        kept = []
        for t, (q, idx) in zip(targets, matches, strict=True):
            keep = t["labels"][idx].to(q.device) < others
            kept.append((q[keep], idx[keep]))
        n_crit = sum(int((t["labels"] < others).sum()) for t in targets)
        crit = criterion.layer_losses(outputs, targets, kept, torch.tensor(float(max(n_crit, 1)), device=device))
        out["bbox_crit"] = w["loss_bbox"] * crit["loss_bbox"]
        out["giou_crit"] = w["loss_giou"] * crit["loss_giou"]
    return out


def _sq(grads: Sequence[Mapping[str, torch.Tensor]], targets) -> np.ndarray:
    """‖Σ_k g_k restricted to node l‖² for every target node l (float64)."""
    out = np.zeros(len(targets))
    for i, (_, ref) in enumerate(targets):
        g = sum(ref.select(gk[ref.param]).double() for gk in grads)
        out[i] = float(g.square().sum())
    return out


def multi_fisher(gm, loader: Iterable, sets: Mapping[str, Sequence[int]], num_classes: int,
                 log=print) -> dict:
    """Per-node ‖g‖² statistics (mean over batches) of L_A and of L_F for every critical set in ``sets``.

    Returns ``{"nodes": [names], "numel": [...], "quantized": [bool], "batches": n, "images": n,
    "traces": {"overall": {stat: [per node]}, set_name: {stat: [per node]}}}`` (stats: :data:`STATS`, plus
    :data:`VARIANT_STATS` for the critical sets). ``quantized`` says whether the node has a weight qspec
    (annotate the graph's policy first).
    """
    criterion = build_criterion(gm.head, aux=False, rank_mean=False)
    targets, params = analysed_params(gm)
    sums: dict[str, dict[str, np.ndarray]] = {}
    batches = images = 0

    def add(key: str, stat: str, value: np.ndarray) -> None:
        slot = sums.setdefault(key, {})
        slot[stat] = slot.get(stat, 0.0) + value

    def grads_of(losses: Mapping[str, torch.Tensor]) -> dict[str, dict]:
        return {k: gradients(v, params, retain=True) if v.requires_grad else
                {n: torch.zeros_like(p) for n, p in params.items()} for k, v in losses.items()}

    with differentiable(gm, params.values()):
        for index, batch in enumerate(loader):
            for inputs, tgts in units(gm, batch, False, index):
                outputs = gm(*inputs)
                problems = {"overall": (outputs, tgts, None)}
                for name, ids in sets.items():
                    problems[name] = (transform_outputs(outputs, ids, gm.head),
                                      transform_targets(tgts, ids, num_classes), len(ids))
                for key, (out, tg, others) in problems.items():
                    g = grads_of(_weighted_terms(criterion, out, tg, others))
                    for t in TERMS:
                        add(key, t, _sq([g[t]], targets))
                    add(key, "box", _sq([g["bbox"], g["giou"]], targets))
                    add(key, "total", _sq([g[t] for t in TERMS], targets))
                    if others is not None:
                        add(key, "box_crit", _sq([g["bbox_crit"], g["giou_crit"]], targets))
                        add(key, "variant", _sq([g["ce"], g["bbox_crit"], g["giou_crit"]], targets))
                    del g
                del outputs, problems
                images += inputs[0].shape[0]
                batches += 1
            log(f"  Fisher batch {index + 1}: {images} images", flush=True)
    numel = [ref.select(params[ref.param]).numel() for _, ref in targets]
    return {"nodes": [n.name for n, _ in targets], "numel": numel,
            "quantized": [n.meta.get("fxq.qspec") is not None for n, _ in targets],
            "batches": batches, "images": images,
            "traces": {k: {s: (v / batches).tolist() for s, v in d.items()} for k, d in sums.items()}}
