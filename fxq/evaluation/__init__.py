"""Evaluation: DETR post-processing and COCO box AP (overall, per category, critical set vs the rest)."""

from fxq.evaluation.coco_eval import METRICS, evaluate, evaluate_model
from fxq.evaluation.postprocess import HEADS, postprocess, to_coco_results

__all__ = ["HEADS", "METRICS", "evaluate", "evaluate_model", "postprocess", "to_coco_results"]
