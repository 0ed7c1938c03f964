"""Box geometry for the DETR objectives: format conversion, IoU and generalized IoU.

Boxes are ``[..., 4]`` tensors; ``cxcywh`` is (centre x, centre y, width, height), ``xyxy`` is
(x0, y0, x1, y1). Pairwise functions broadcast over leading batch dimensions:
``[..., N, 4] x [..., M, 4] -> [..., N, M]``; the ``elementwise_*`` variants compare aligned pairs
``[..., 4] x [..., 4] -> [...]`` (what the loss over matched pairs needs).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert (cx, cy, w, h) boxes to (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert (x0, y0, x1, y1) boxes to (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes, ``[..., 4] -> [...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes, ``[..., N, 4] x [..., M, 4] -> ([..., N, M], [..., N, M])``."""
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    return _iou_union(a, b)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes, ``-> [..., N, M]`` in [-1, 1]."""
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    return _giou(a, b)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of aligned pairs of xyxy boxes, ``[..., 4] x [..., 4] -> [...]``."""
    return _iou_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of aligned pairs of xyxy boxes, ``[..., 4] x [..., 4] -> [...]``."""
    return _giou(boxes1, boxes2)


def _iou_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp(min=_EPS), union


def _giou(a: Tensor, b: Tensor) -> Tensor:
    iou, union = _iou_union(a, b)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)
