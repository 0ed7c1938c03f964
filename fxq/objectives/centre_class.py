"""The pretraining objective of :class:`fxq.models.dense_classifier.DenseClassifier`: classify each object
from the logits at its box centre.

Targets are DETR's (``boxes`` cxcywh relative to the unpadded image, ``labels``, ``size`` = (h, w) of that
image). The logit map covers the padded batch, whose size is the largest ``size`` in the batch (as
:func:`fxq.data.collate` pads), so centres are rescaled by ``size / padded size`` and read bilinearly
(``grid_sample``, ``align_corners=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centre_logits(logit_map: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, K] at every target box centre of the batch, and their labels [N]."""
    padded = torch.stack([t["size"] for t in targets]).amax(0).to(logit_map.dtype)
    logits, labels = [], []
    for b, target in enumerate(targets):
        if len(target["labels"]) == 0:
            continue
        scale = (target["size"].to(logit_map.dtype) / padded).flip(0)
        grid = 2 * target["boxes"][:, :2].to(logit_map.dtype) * scale - 1
        logits.append(F.grid_sample(logit_map[b : b + 1], grid[None, None], align_corners=False)[0, :, 0].T)
        labels.append(target["labels"])
    if not logits:
        return logit_map.new_zeros((0, logit_map.shape[1])), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def centre_class_loss(logit_map: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """Cross-entropy of the centre logits (``loss``) and the fraction classified right (``accuracy``, detached);
    a batch without objects gives a zero loss that still reaches every parameter."""
    logits, labels = centre_logits(logit_map, targets)
    if len(labels) == 0:
        return {"loss": logit_map.sum() * 0, "accuracy": logit_map.new_zeros(())}
    accuracy = (logits.argmax(1) == labels).float().mean().detach()
    return {"loss": F.cross_entropy(logits, labels), "accuracy": accuracy}
