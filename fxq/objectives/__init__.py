"""DETR training objectives: box geometry, Hungarian matching, the set criterion, the critical-category loss,
and the QAT terms (distillation from the float teacher, the Fisher-trace regularizer, their sum).

Model outputs are dicts with ``pred_logits`` [B, Q, K], ``pred_boxes`` [B, Q, 4] (cxcywh in [0, 1]) and
optionally ``aux_outputs``; targets are one dict per image with ``boxes`` [n, 4] (cxcywh) and ``labels`` [n].
Heads: ``"softmax"`` (DETR, K = classes + 1 with no-object last) and ``"sigmoid"`` (Deformable DETR, K = classes).
"""

from fxq.objectives.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from fxq.objectives.criterion import SetCriterion, build_criterion, sigmoid_focal_loss
from fxq.objectives.critical import (
    CriticalObjective,
    check_critical_ids,
    transform_labels,
    transform_logits,
    transform_outputs,
    transform_targets,
)
from fxq.objectives.distill import Distillation
from fxq.objectives.fisher_reg import FisherTraceRegularizer, fisher_trace
from fxq.objectives.heads import HEADS, num_classes_of
from fxq.objectives.matcher import HungarianMatcher, Match
from fxq.objectives.qat_loss import QATLoss

__all__ = [
    "HEADS",
    "CriticalObjective",
    "Distillation",
    "FisherTraceRegularizer",
    "HungarianMatcher",
    "Match",
    "QATLoss",
    "SetCriterion",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "build_criterion",
    "check_critical_ids",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "fisher_trace",
    "generalized_box_iou",
    "num_classes_of",
    "sigmoid_focal_loss",
    "transform_labels",
    "transform_logits",
    "transform_outputs",
    "transform_targets",
]
