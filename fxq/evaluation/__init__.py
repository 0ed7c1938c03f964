"""Evaluation: DETR post-processing, COCO box AP (overall, per category, critical set vs the rest) and paired
bootstrap intervals over images for AP differences."""

from fxq.evaluation.bootstrap import (
    METRIC_NAMES,
    bootstrap_metrics,
    category_mean,
    compare,
    paired_bootstrap,
    resample,
)
from fxq.evaluation.coco_eval import METRICS, evaluate, evaluate_model
from fxq.evaluation.postprocess import HEADS, postprocess, to_coco_results

__all__ = [
    "HEADS", "METRICS", "METRIC_NAMES", "bootstrap_metrics", "category_mean", "compare", "evaluate",
    "evaluate_model", "paired_bootstrap", "postprocess", "resample", "to_coco_results",
]
