"""Hungarian matching of predicted queries to ground-truth boxes (DETR, Deformable DETR).

The cost of assigning query q to target t is
``w_class * C_class + w_bbox * ||b_q - b_t||_1 + w_giou * (-GIoU(b_q, b_t))``, with
``C_class = -softmax(logits)[t_label]`` for the softmax head (DETR, weights 1/5/2) and the focal-style
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at ``p = sigmoid(logit)[t_label]`` for the
sigmoid head (Deformable DETR, weights 2/5/2, alpha 0.25, gamma 2). The assignment minimising the total cost
is found per image with ``scipy.optimize.linear_sum_assignment``.

One-to-many (``repeat=k``): every ground-truth box appears k times in the assignment problem, so up to k
queries are matched to it (more positives per step; useful for training small models quickly). Returned
target indices always refer to the original, unrepeated target list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from fxq.objectives.heads import check_head, num_classes_of

Match = tuple[Tensor, Tensor]
"""(query indices, target indices), both int64 of equal length, sorted by query index."""

_DEFAULT_WEIGHTS = {"softmax": (1.0, 5.0, 2.0), "sigmoid": (2.0, 5.0, 2.0)}


@dataclass
class HungarianMatcher:
    """Optimal one-to-one (or one-to-``repeat``) assignment of queries to targets, per image."""

    head: str = "softmax"
    cost_class: float | None = None
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    repeat: int = 1

    def __post_init__(self) -> None:
        check_head(self.head)
        if self.cost_class is None:
            self.cost_class = _DEFAULT_WEIGHTS[self.head][0]
        if self.repeat < 1:
            raise InputError(f"matcher repeat={self.repeat} is not a positive integer; use repeat >= 1")

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        return asdict(self)

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[Match]:
        """Match ``outputs["pred_logits"/"pred_boxes"]`` [B, Q, .] to ``targets``; one Match per image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        _check_batch(logits, boxes, targets, self.head)
        costs = self.cost_matrices(logits, boxes, targets)
        return [self._assign(c, len(t["labels"])) for c, t in zip(costs, targets, strict=True)]

    def cost_matrices(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[Tensor]:
        """Per image, the [Q, n_targets] assignment cost (one target list, not repeated)."""
        batch, queries = logits.shape[:2]
        flat_logits = logits.flatten(0, 1).float()
        flat_boxes = boxes.flatten(0, 1).float()
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device).float()
        cost = (
            self.cost_class * self._class_cost(flat_logits, tgt_labels)
            + self.cost_bbox * torch.cdist(flat_boxes, tgt_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.view(batch, queries, -1).cpu()
        sizes = [len(t["labels"]) for t in targets]
        return [c[i] for i, c in enumerate(cost.split(sizes, dim=-1))]

    def _class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.head == "softmax":
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob**g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        return pos[:, labels] - neg[:, labels]

    def _assign(self, cost: Tensor, n: int) -> Match:
        if n == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        if not torch.isfinite(cost).all():
            raise InputError(
                "matching cost contains NaN/inf: the predictions diverged; lower the learning rate "
                "or check the inputs for NaN"
            )
        tiled = cost.repeat(1, self.repeat).numpy().astype(np.float64)
        rows, cols = linear_sum_assignment(tiled)
        query = torch.as_tensor(rows, dtype=torch.int64)
        target = torch.as_tensor(cols % n, dtype=torch.int64)
        order = torch.argsort(query)
        return query[order], target[order]


def _check_batch(logits: Tensor, boxes: Tensor, targets: list[dict], head: str) -> None:
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise InputError(
            f"pred_logits {tuple(logits.shape)} / pred_boxes {tuple(boxes.shape)} are not [B,Q,K] / [B,Q,4]; "
            "pass the model's output dict unchanged"
        )
    if len(targets) != logits.shape[0]:
        raise InputError(
            f"{len(targets)} target dicts for a batch of {logits.shape[0]} images; pass one dict per image"
        )
    num_classes = num_classes_of(logits, head)
    for i, t in enumerate(targets):
        labels = t["labels"]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise InputError(
                f"image {i} has label {int(bad[0])} outside [0, {num_classes}) for a {head} head with "
                f"{logits.shape[-1]} logits; build the model with num_classes = max category id + 1"
            )
        if t["boxes"].shape != (labels.numel(), 4):
            raise InputError(
                f"image {i}: boxes {tuple(t['boxes'].shape)} do not match {labels.numel()} labels; "
                "targets need boxes [n, 4] (cx, cy, w, h) and labels [n]"
            )
