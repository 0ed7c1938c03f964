"""Distillation of a quantized detector from its float teacher (the same weights before QAT, no gradients).

Query correspondence is fixed one to one: student query i imitates teacher query i (same image, same query
index; the QAT graph and the float graph share their queries). Terms, on the final decoder layer, each a mean
over the B·Q queries:

- ``kd.class``: softmax head (DETR): KL(p_T ‖ p_S) of the softmax over the K = classes + no-object logits;
  sigmoid head (focal, Deformable DETR): Σ over classes of the binary KL(Bern(p_T) ‖ Bern(p_S)) of the sigmoid
  probabilities;
- ``kd.bbox``: Σ over the four cxcywh coordinates of |b_S − b_T|;
- ``kd.giou``: 1 − GIoU(b_S, b_T).

The box terms are weighted by the teacher's foreground probability w_q (``boxes="foreground"``, the default:
Σ_q w_q·d_q / Σ_q w_q, w_q = 1 − p_T(no object) for a softmax head, max_c σ(z_T,c) for a sigmoid head), or
average over the queries uniformly (``boxes="all"``, the first implementation). With uniform weights background
queries, whose boxes carry no detection, dominate the box terms (on deformable_detr_tiny 91% of the queries, with
5× the foreground queries' GIoU distance after PTQ) — a choice of fxq's, the issue fixing only "class term + box
L1 (+ GIoU)".

``loss_kd`` = Σ weights[term]·term; default weights class 1, bbox 5, giou 2 (the ratios of DETR's criterion);
a weight of 0 drops a term from ``loss_kd`` (it is still returned for logging). Teacher outputs are detached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from fxq.objectives.heads import check_head

TERMS = ("class", "bbox", "giou")
#: How the box terms weight the queries: uniformly, or by the teacher's foreground probability.
BOX_WEIGHTINGS = ("all", "foreground")
DEFAULT_WEIGHTS = {"class": 1.0, "bbox": 5.0, "giou": 2.0}


def class_kl(student_logits: Tensor, teacher_logits: Tensor, head: str) -> Tensor:
    """Mean over queries of KL(teacher ‖ student) of the class probabilities of ``head``."""
    if check_head(head) == "softmax":
        log_s, log_t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
        return (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    p_t = teacher_logits.sigmoid()
    kl = (p_t * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
          + (1 - p_t) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))
    return kl.sum(-1).mean()


def foreground_probability(teacher_logits: Tensor, head: str) -> Tensor:
    """[..., Q] probability that each query is an object, by the teacher: 1 − p(no object) (softmax head, the
    last logit) or the largest class probability (sigmoid head)."""
    if check_head(head) == "softmax":
        return 1 - F.softmax(teacher_logits, -1)[..., -1]
    return teacher_logits.sigmoid().amax(-1)


def _mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return values.mean()
    weight = weight.reshape(values.shape)
    return (weight * values).sum() / weight.sum().clamp_min(1e-6)


def box_l1(student_boxes: Tensor, teacher_boxes: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over queries (weighted by ``weight`` [..., Q] when given) of the L1 distance of cxcywh boxes."""
    return _mean((student_boxes - teacher_boxes).abs().sum(-1), weight)


def box_giou_loss(student_boxes: Tensor, teacher_boxes: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over queries (weighted by ``weight`` [..., Q] when given) of 1 − GIoU of cxcywh boxes."""
    s, t = box_cxcywh_to_xyxy(student_boxes.flatten(0, -2)), box_cxcywh_to_xyxy(teacher_boxes.flatten(0, -2))
    return _mean(1 - elementwise_generalized_box_iou(s, t), None if weight is None else weight.flatten())


class Distillation:
    """Class + box distillation with a fixed query correspondence; call as ``kd(student, teacher) -> dict``."""

    name = "kd"

    def __init__(self, head: str, weights: Mapping[str, float] | None = None, boxes: str = "foreground") -> None:
        self.head = check_head(head)
        if boxes not in BOX_WEIGHTINGS:
            raise InputError(f"box distillation weighting {boxes!r} is unknown; use one of {list(BOX_WEIGHTINGS)}")
        self.boxes = boxes
        unknown = sorted(set(weights or {}) - set(TERMS))
        if unknown:
            raise InputError(f"unknown distillation terms {unknown}; the terms are {list(TERMS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        for term, w in self.weights.items():
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise InputError(f"distillation weight of {term!r} is {w!r}; use a finite number >= 0")

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        config = {"head": self.head, "weights": dict(self.weights)}
        if self.boxes != "all":  # the fingerprint of runs made before the weighting existed stays the same
            config["boxes"] = self.boxes
        return config

    def __call__(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
                 targets: object = None) -> dict[str, Tensor]:
        """``kd.class``, ``kd.bbox``, ``kd.giou`` and their weighted sum ``loss_kd``."""
        for key in ("pred_logits", "pred_boxes"):
            if key not in student or key not in teacher:
                raise InputError(f"distillation needs {key!r} in both the student's and the teacher's outputs")
            if student[key].shape != teacher[key].shape:
                raise InputError(f"student {key} {tuple(student[key].shape)} and teacher "
                                 f"{tuple(teacher[key].shape)} differ; distil from the float graph of the same "
                                 "model (same queries, classes and batch)")
        t_logits, t_boxes = teacher["pred_logits"].detach(), teacher["pred_boxes"].detach()
        weight = foreground_probability(t_logits, self.head) if self.boxes == "foreground" else None
        terms = {"kd.class": class_kl(student["pred_logits"], t_logits, self.head),
                 "kd.bbox": box_l1(student["pred_boxes"], t_boxes, weight),
                 "kd.giou": box_giou_loss(student["pred_boxes"], t_boxes, weight)}
        terms["loss_kd"] = sum(self.weights[k.split(".")[1]] * v for k, v in terms.items())
        return terms
