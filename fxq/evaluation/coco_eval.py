"""COCO box AP with pycocotools (its prints silenced, its numbers kept), per category and for a critical set.

Per-category AP is pycocotools' AP@[.50:.95] (area ``all``, 100 detections) of that category. A category with
no (non-crowd) ground truth in the evaluated images has AP -1, pycocotools' convention; such categories are
left out of ``critical_mAP`` and ``rest_mAP`` and listed under ``no_gt_categories``. Over the categories that
have ground truth, the mean per-category AP equals pycocotools' overall AP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from fxq.data.coco import load_coco
from fxq.errors import InputError
from fxq.evaluation.finite import check_finite_outputs, check_finite_weights
from fxq.evaluation.postprocess import HEADS, postprocess, to_coco_results
from fxq.tracing import model_batch

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

GroundTruth = COCO | str | os.PathLike
Detections = Sequence[dict] | str | os.PathLike


def evaluate(
    coco_gt: GroundTruth,
    detections: Detections,
    critical_ids: Iterable[int] | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict:
    """Box metrics of COCO-format ``detections`` (list or results JSON) against ``coco_gt`` (COCO or file).

    Returns ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and ``AR*`` (in [0, 1]; -1 where undefined),
    ``per_category`` (name -> AP, -1 without ground truth), ``categories`` (rows with id, name, supercategory,
    AP, num_gt, critical), ``critical_mAP`` and ``rest_mAP`` (means of per-category AP over the critical set
    and over the other categories, each restricted to categories with ground truth; None when empty or no
    critical set is given), ``no_gt_categories``, ``num_images`` and ``num_detections``. ``image_ids``
    restricts the evaluation to those images (default: all images of ``coco_gt``).
    """
    gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt)
    dets = _load_detections(detections)
    critical = _check_critical(gt, critical_ids)
    images = sorted(gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    _check_detections(gt, dets, images)
    cocoeval = _run_cocoeval(gt, _results_coco(gt, dets), images)
    return _summarise(gt, cocoeval, critical, images, len(dets))


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable,
    coco_gt: GroundTruth,
    critical_ids: Iterable[int] | None = None,
    progress: bool = True,
    top_k: int = 100,
) -> dict:
    """Run ``model`` over ``loader`` (batches of ``(images, mask, targets)``, fed as
    :func:`fxq.tracing.model_batch` says: a graph traced with images only refuses padded batches), post-process
    with ``model.head`` and evaluate the images seen, as :func:`evaluate` (plus ``detections``, the COCO results).
    NaN or inf in the model's weights or outputs raises InputError naming the first tensor or module.
    """
    head = getattr(model, "head", None)
    if head not in HEADS:
        raise InputError(
            f"model.head is {head!r}: the model must say its classification head, one of {HEADS}"
        )
    gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt)
    check_finite_weights(model)
    detections, seen = _predict(model, loader, head, progress, top_k)
    if not seen:
        raise InputError("the loader yielded no images: evaluate on a non-empty data set")
    metrics = evaluate(gt, detections, critical_ids, image_ids=seen)
    metrics["detections"] = detections
    return metrics


def _predict(model: torch.nn.Module, loader: Iterable, head: str, progress: bool, top_k: int):
    was_training = model.training
    model.eval()
    detections: list[dict] = []
    seen: list[int] = []
    try:
        with torch.inference_mode():
            for index, batch in enumerate(tqdm(loader, desc="eval", disable=not progress, leave=False)):
                inputs, targets = model_batch(model, batch, need_targets=True, index=index)
                outputs = model(*inputs)
                scored = {k: outputs[k] for k in ("pred_logits", "pred_boxes") if k in outputs}
                check_finite_outputs(model, scored, inputs, f"batch {index} of the evaluation")
                sizes = torch.stack([t["orig_size"] for t in targets])
                ids = [int(t["image_id"]) for t in targets]
                detections += to_coco_results(postprocess(outputs, sizes, head, top_k), ids)
                seen += ids
    finally:
        model.train(was_training)
    return detections, seen


def _load_detections(detections: Detections) -> list[dict]:
    if isinstance(detections, str | os.PathLike):
        path = Path(detections)
        if not path.is_file():
            raise InputError(f"predictions file {path} does not exist: pass a COCO results JSON")
        try:
            detections = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"predictions file {path} is not valid JSON ({exc}): re-create it") from exc
        if not isinstance(detections, list):
            raise InputError(f"predictions file {path} must hold a JSON list of COCO results entries")
    return list(detections)


def _check_detections(gt: COCO, dets: list[dict], images: list[int]) -> None:
    wanted = set(images)
    for i, det in enumerate(dets):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing or len(det["bbox"]) != 4:
            raise InputError(
                f"detection {i} lacks {missing or ['a 4-number bbox']}: entries need image_id, category_id, "
                "bbox [x, y, w, h] and score"
            )
        if det["image_id"] not in gt.imgs:
            raise InputError(
                f"detection {i} is for image_id {det['image_id']}, which is not in the ground truth: "
                "evaluate against the annotation file the predictions were made for"
            )
    unknown = wanted - set(gt.imgs)
    if unknown:
        raise InputError(
            f"image ids {sorted(unknown)[:5]} are not in the ground truth: pass ids from its 'images'"
        )


def _check_critical(gt: COCO, critical_ids: Iterable[int] | None) -> set[int] | None:
    if critical_ids is None:
        return None
    critical = {int(c) for c in critical_ids}
    unknown = critical - set(gt.cats)
    if unknown:
        raise InputError(
            f"critical category ids {sorted(unknown)} are not in the ground truth's categories: "
            "resolve names against the same annotation file (fxq.data.resolve_categories)"
        )
    return critical


def _results_coco(gt: COCO, dets: list[dict]) -> COCO:
    """pycocotools' loadRes, also for an empty list (which loadRes rejects)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            return gt.loadRes(copy.deepcopy(dets))
        empty = COCO()
        empty.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        empty.createIndex()
        return empty


def _run_cocoeval(gt: COCO, dt: COCO, images: list[int]) -> COCOeval:
    cocoeval = COCOeval(gt, dt, "bbox")
    cocoeval.params.imgIds = images
    with contextlib.redirect_stdout(io.StringIO()):
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return cocoeval


def _summarise(
    gt: COCO, cocoeval: COCOeval, critical: set[int] | None, images: list[int], n_dets: int
) -> dict:
    per_id = _per_category_ap(cocoeval)
    num_gt = _num_gt(gt, images)
    rows = [
        {
            "id": cid,
            "name": gt.cats[cid]["name"],
            "supercategory": gt.cats[cid].get("supercategory", ""),
            "AP": per_id[cid],
            "num_gt": num_gt.get(cid, 0),
            "critical": critical is not None and cid in critical,
        }
        for cid in sorted(per_id)
    ]
    metrics: dict = {name: float(v) for name, v in zip(METRICS, cocoeval.stats, strict=True)}
    metrics["per_category"] = {row["name"]: row["AP"] for row in rows}
    metrics["categories"] = rows
    metrics["critical_ids"] = sorted(critical) if critical is not None else None
    metrics["critical_mAP"] = _mean_ap(per_id, critical, inside=True)
    metrics["rest_mAP"] = _mean_ap(per_id, critical, inside=False)
    metrics["no_gt_categories"] = [row["name"] for row in rows if row["AP"] < 0]
    metrics["num_images"] = len(images)
    metrics["num_detections"] = n_dets
    return metrics


def _per_category_ap(cocoeval: COCOeval) -> dict[int, float]:
    """AP@[.50:.95], area all, 100 detections, per category id (-1 without ground truth)."""
    precision = cocoeval.eval["precision"]  # [T, R, K, A, M]
    area, max_det = cocoeval.params.areaRngLbl.index("all"), len(cocoeval.params.maxDets) - 1
    out = {}
    for k, cid in enumerate(cocoeval.params.catIds):
        p = precision[:, :, k, area, max_det]
        out[int(cid)] = float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0
    return out


def _num_gt(gt: COCO, images: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for image_id in images:
        for ann in gt.imgToAnns.get(image_id, []):
            if not ann.get("iscrowd", 0):
                counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def _mean_ap(per_id: dict[int, float], critical: set[int] | None, inside: bool) -> float | None:
    if critical is None:
        return None
    values = [ap for cid, ap in per_id.items() if (cid in critical) == inside and ap >= 0]
    return float(np.mean(values)) if values else None
