"""Raw DETR outputs -> scored detections in original-image pixels, as the official repositories do it.

``softmax`` head (DETR): softmax over K = num_classes + 1 logits, the last (no-object) column dropped, best
class per query; every query is kept. ``sigmoid`` head (Deformable DETR): sigmoid over K = num_classes logits,
the ``top_k`` highest (query, class) pairs over the flattened Q×K scores. Labels are column indices, i.e. COCO
category ids under the DETR convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fxq.errors import InputError
from fxq.objectives.box_ops import box_cxcywh_to_xyxy

HEADS = ("softmax", "sigmoid")


def postprocess(
    outputs: Mapping[str, torch.Tensor],
    orig_sizes: torch.Tensor,
    head: str = "softmax",
    top_k: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per image ``{"scores" [N], "labels" [N] int64, "boxes" [N, 4] (x0, y0, x1, y1) pixels}``, on the CPU.

    ``outputs`` has ``pred_logits`` [B, Q, K] and ``pred_boxes`` [B, Q, 4] ((cx, cy, w, h) in [0, 1]);
    ``orig_sizes`` is [B, 2] (h, w) of the original images.
    """
    logits, boxes = _check(outputs, orig_sizes, head)
    if head == "softmax":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    else:
        scores, labels, boxes = _topk_sigmoid(logits, boxes, top_k)
    h, w = orig_sizes.detach().cpu().to(torch.float32).unbind(1)
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
    xyxy = box_cxcywh_to_xyxy(boxes) * scale
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy, strict=True)]


def _topk_sigmoid(logits: torch.Tensor, boxes: torch.Tensor, top_k: int):
    batch, queries, classes = logits.shape
    prob = logits.sigmoid().flatten(1)
    scores, index = prob.topk(min(top_k, queries * classes), dim=1)
    labels = index % classes
    chosen = torch.gather(boxes, 1, (index // classes)[..., None].expand(-1, -1, 4))
    return scores, labels, chosen


def to_coco_results(results: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int]) -> list[dict]:
    """COCO results entries ``{"image_id", "category_id", "bbox" [x, y, w, h], "score"}`` for pycocotools."""
    if len(results) != len(image_ids):
        raise InputError(f"{len(results)} results for {len(image_ids)} image ids: pass one id per image")
    entries = []
    for result, image_id in zip(results, image_ids, strict=True):
        boxes = result["boxes"].detach().to(torch.float64).cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(
            boxes.tolist(), result["scores"].tolist(), result["labels"].tolist(), strict=True
        ):
            entries.append(
                {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            )
    return entries


def _check(outputs: Mapping[str, torch.Tensor], orig_sizes: torch.Tensor, head: str):
    if head not in HEADS:
        raise InputError(f"unknown classification head {head!r}: use one of {HEADS}")
    if "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise InputError(
            f"model outputs have keys {sorted(outputs)}: expected 'pred_logits' and 'pred_boxes'"
        )
    logits = outputs["pred_logits"].detach().float().cpu()
    boxes = outputs["pred_boxes"].detach().float().cpu()
    if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise InputError(
            f"pred_logits {tuple(logits.shape)} / pred_boxes {tuple(boxes.shape)}: "
            "expected [B, Q, K] and [B, Q, 4]"
        )
    if head == "softmax" and logits.shape[-1] < 2:
        raise InputError("a softmax head needs at least one class column plus the no-object column")
    if tuple(orig_sizes.shape) != (logits.shape[0], 2):
        raise InputError(
            f"orig_sizes has shape {tuple(orig_sizes.shape)}: expected [{logits.shape[0]}, 2] (h, w)"
        )
    return logits, boxes
