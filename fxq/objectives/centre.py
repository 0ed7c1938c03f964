"""The pretraining objective of :class:`fxq.models.centre_pretrainer.CentrePretrainer`, CenterNet-like.

Targets are DETR's (``boxes`` cxcywh relative to the unpadded image, ``labels``, ``size`` = (h, w) of that
image). The maps cover the padded batch, whose size is the largest ``size`` in the batch (as
:func:`fxq.data.collate` pads), so centres are rescaled by ``size / padded size``. Per object, the class
logits and the (w, h) logits are read bilinearly at its centre (``grid_sample``, ``align_corners=False``); the
centre logit is trained with the focal loss to be 1 in every cell holding an object's centre and 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxq.objectives.criterion import sigmoid_focal_loss

#: Weights of the three terms (class cross-entropy, centre focal loss, L1 of the box size), as DETR weighs L1.
WEIGHTS = {"loss_ce": 1.0, "loss_centre": 1.0, "loss_size": 5.0}


def _centres(targets: list[dict], dtype: torch.dtype) -> list[torch.Tensor]:
    """Every target's box centres as fractions of the padded batch's width and height."""
    padded = torch.stack([t["size"] for t in targets]).amax(0).to(dtype)
    return [t["boxes"][:, :2].to(dtype) * (t["size"].to(dtype) / padded).flip(0) for t in targets]


def centre_values(value_map: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The map's channels [N, C] at every target box centre of the batch, and the boxes' labels [N]."""
    values, labels = [], []
    for b, (xy, target) in enumerate(zip(_centres(targets, value_map.dtype), targets, strict=True)):
        if len(xy):
            grid = (2 * xy - 1)[None, None]
            values.append(F.grid_sample(value_map[b : b + 1], grid, align_corners=False)[0, :, 0].T)
            labels.append(target["labels"])
    if not values:
        return value_map.new_zeros((0, value_map.shape[1])), torch.zeros(0, dtype=torch.int64)
    return torch.cat(values), torch.cat(labels)


def centre_heatmap(targets: list[dict], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """[B, h, w] with 1 in every cell that holds a box centre."""
    h, w = shape
    heat = torch.zeros(len(targets), h, w, dtype=dtype, device=targets[0]["boxes"].device)
    for b, xy in enumerate(_centres(targets, dtype)):
        cols = (xy[:, 0] * w).long().clamp(0, w - 1)
        rows = (xy[:, 1] * h).long().clamp(0, h - 1)
        heat[b, rows, cols] = 1
    return heat


def centre_loss(outputs: dict[str, torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    """``loss`` (weighted by :data:`WEIGHTS`), its three terms and ``accuracy`` (detached): the fraction of
    objects whose centre logits name their class. A batch without objects trains the centre map only."""
    class_map, box_map = outputs["class_map"], outputs["box_map"]
    values, labels = centre_values(torch.cat([class_map, box_map[:, 1:]], 1), targets)
    logits, sizes = values[:, : class_map.shape[1]], values[:, class_map.shape[1] :]
    heat = centre_heatmap(targets, box_map.shape[-2:], box_map.dtype).to(box_map.device)
    count = max(1, len(labels))
    terms = {"loss_centre": sigmoid_focal_loss(box_map[:, 0], heat).sum() / count}
    if len(labels):
        truth = torch.cat([t["boxes"][:, 2:] for t in targets]).to(sizes)
        terms["loss_ce"] = F.cross_entropy(logits, labels.to(logits.device))
        terms["loss_size"] = F.l1_loss(sizes.sigmoid(), truth)
        accuracy = (logits.argmax(1) == labels.to(logits.device)).float().mean().detach()
    else:
        terms["loss_ce"] = terms["loss_size"] = class_map.sum() * 0
        accuracy = class_map.new_zeros(())
    loss = sum(WEIGHTS[k] * v for k, v in terms.items())
    return {"loss": loss, **terms, "accuracy": accuracy}
