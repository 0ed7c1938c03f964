"""Q-DETR's distribution rectification distillation (the upper level): foreground-aware query matching and the
distance of the matched queries' decoder features.

Per image, with ground-truth boxes b^GT, student boxes b^S and teacher boxes b^T (cxcywh, final decoder layer):

- G_i = max_j GIoU(b_i^GT, b_j^S); student query j is **kept** when GIoU(b_i^GT, b_j^S) > τ·G_i for some i;
- each kept j is **matched** to the teacher query k maximising μ1·GIoU(b_j^S, b_k^T) − μ2·‖b_j^S − b_k^T‖₁;
- L_DRD = the mean over kept queries and decoder layers of ‖D_S[j] − D_T[k]‖₂, D = the layer's
  cross-attention output ("co-attended features", [B, Q, E]).

Constants: τ = 0.5, μ1 = 2, μ2 = 5 (Q-DETR's unofficial code). Choices where the paper is silent: the
matching uses the final layer's boxes for every layer's features; features are compared as they are (no
normalisation); images without ground truth contribute no pairs; the loss is 0 (with a gradient path) when no
query is kept. Boxes are detached for the matching (it selects pairs; it is not differentiated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from fxq.tracing import train_output

TAU, MU1, MU2 = 0.5, 2.0, 5.0


def foreground_queries(student_boxes: Tensor, gt_boxes: Tensor, tau: float = TAU) -> Tensor:
    """Indices of the student queries [Q, 4] kept for ground truth [n, 4] (cxcywh), ascending."""
    if len(gt_boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=student_boxes.device)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(gt_boxes), box_cxcywh_to_xyxy(student_boxes))  # [n, Q]
    best = giou.max(1, keepdim=True).values
    return (giou > tau * best).any(0).nonzero().flatten()


def match_teacher(student_boxes: Tensor, teacher_boxes: Tensor, mu1: float = MU1, mu2: float = MU2) -> Tensor:
    """For each student box [m, 4], the index of the teacher box [Q, 4] maximising μ1·GIoU − μ2·L1."""
    giou = generalized_box_iou(box_cxcywh_to_xyxy(student_boxes), box_cxcywh_to_xyxy(teacher_boxes))
    l1 = torch.cdist(student_boxes, teacher_boxes, p=1)
    return (mu1 * giou - mu2 * l1).argmax(1)


class RectificationDistillation:
    """L_DRD of the student's and teacher's ``fxq_train["cross_attention"]`` features; call as
    ``drd(student, teacher, targets) -> {"drd.pairs", "drd.distance", "loss_drd"}`` (``loss_drd`` = weight ·
    distance)."""

    name = "drd"

    def __init__(self, weight: float = 1.0, tau: float = TAU, mu1: float = MU1, mu2: float = MU2) -> None:
        for label, value in (("weight", weight), ("tau", tau), ("mu1", mu1), ("mu2", mu2)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InputError(f"DRD {label}={value!r}: use a finite number >= 0")
        self.weight, self.tau, self.mu1, self.mu2 = weight, tau, mu1, mu2

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        return {"weight": self.weight, "tau": self.tau, "mu1": self.mu1, "mu2": self.mu2}

    def pairs(self, student: Mapping, teacher: Mapping, targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        """Per image: (kept student query indices, matched teacher query indices)."""
        s_boxes, t_boxes = student["pred_boxes"].detach(), teacher["pred_boxes"].detach()
        result = []
        for b, target in enumerate(targets):
            kept = foreground_queries(s_boxes[b], target["boxes"].to(s_boxes), self.tau)
            matched = match_teacher(s_boxes[b, kept], t_boxes[b], self.mu1, self.mu2) if len(kept) else kept
            result.append((kept, matched))
        return result

    def __call__(self, student: Mapping, teacher: Mapping, targets: Sequence[dict]) -> dict[str, Tensor]:
        s_feats = train_output(student, "cross_attention", "DRD (student)")
        t_feats = train_output(teacher, "cross_attention", "DRD (teacher)")
        pairs = self.pairs(student, teacher, targets)
        distances = [(s[b, kept] - t[b, matched].detach()).norm(dim=-1)
                     for s, t in zip(s_feats, t_feats, strict=True) for b, (kept, matched) in enumerate(pairs)]
        flat = torch.cat(distances)
        distance = flat.mean() if flat.numel() else s_feats[0].sum() * 0.0
        count = torch.tensor(float(sum(len(k) for k, _ in pairs)), device=distance.device)
        return {"drd.pairs": count, "drd.distance": distance, "loss_drd": self.weight * distance}

