"""Critical-category objective of FQ-DETR: the logit-label transformation and ``alpha * L_A + L_F``.

For a critical set C (category ids) every query's logits [..., K] become
``[logit_c for c in C (ascending)] + [others] (+ [no_object] for the softmax head)``, where
``others = max`` of the logits of the real, non-critical classes (the no-object logit is excluded).
Ground-truth labels in C become their position in sorted C; every other label becomes "others" (= len(C)).
Boxes are unchanged. The transformation is batched and differentiable (gradients reach the original logits:
the critical logits, the no-object logit and, through the max, the largest non-critical logit).

``L_F`` is the set loss (matching + criterion) on the transformed problem, ``L_A`` the ordinary set loss,
and the objective is ``alpha * L_A + L_F``. :class:`CriticalObjective` returns a dict with

- ``loss``: ``alpha * loss_all + loss_critical`` (what to backpropagate),
- ``loss_all``: L_A, ``loss_critical``: L_F,
- ``all.<term>`` / ``critical.<term>``: the criterion's individual terms of each problem (for logging).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.heads import check_head, num_classes_of


class CriticalObjective:
    """``alpha * L_A + L_F`` for the critical categories ``critical_ids``; call as ``obj(outputs, targets)``."""

    def __init__(
        self, criterion, critical_ids: Iterable[int], alpha: float = 1.0, num_classes: int | None = None
    ) -> None:
        self.criterion = criterion
        self.head = check_head(criterion.head)
        self.critical_ids = _canonical_ids(critical_ids)
        self.alpha = float(alpha)
        if num_classes is not None:
            check_critical_ids(self.critical_ids, num_classes, self.head)

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        base = self.criterion.config() if hasattr(self.criterion, "config") else type(self.criterion).__name__
        return {"critical_ids": list(self.critical_ids), "alpha": self.alpha, "criterion": base}

    def __call__(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """``loss``, ``loss_all`` (L_A), ``loss_critical`` (L_F) and every term of both, prefixed."""
        num_classes = num_classes_of(outputs["pred_logits"], self.head)
        check_critical_ids(self.critical_ids, num_classes, self.head)
        loss_all = self.criterion(outputs, targets)
        loss_critical = self.criterion(
            transform_outputs(outputs, self.critical_ids, self.head),
            transform_targets(targets, self.critical_ids, num_classes),
        )
        result = {
            "loss": self.alpha * loss_all["loss"] + loss_critical["loss"],
            "loss_all": loss_all["loss"],
            "loss_critical": loss_critical["loss"],
        }
        result.update({f"all.{k}": v for k, v in loss_all.items() if k != "loss"})
        result.update({f"critical.{k}": v for k, v in loss_critical.items() if k != "loss"})
        return result


def transform_logits(logits: Tensor, critical_ids: Iterable[int], head: str) -> Tensor:
    """Logits [..., K] -> [..., |C| + 1 (+1 no-object for softmax)]: critical, others = max non-critical."""
    ids = _canonical_ids(critical_ids)
    num_classes = num_classes_of(logits, head)
    check_critical_ids(ids, num_classes, head)
    index = torch.tensor(ids, dtype=torch.int64, device=logits.device)
    non_critical = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
    non_critical[index] = False
    parts = [logits[..., index], logits[..., :num_classes][..., non_critical].amax(-1, keepdim=True)]
    if head == "softmax":
        parts.append(logits[..., num_classes:])
    return torch.cat(parts, dim=-1)


def transform_labels(labels: Tensor, critical_ids: Iterable[int], num_classes: int) -> Tensor:
    """Labels -> position in sorted C for critical ones, ``len(C)`` ("others") for the rest."""
    ids = _canonical_ids(critical_ids)
    table = torch.full((num_classes,), len(ids), dtype=torch.int64, device=labels.device)
    table[torch.tensor(ids, dtype=torch.int64, device=labels.device)] = torch.arange(
        len(ids), device=labels.device
    )
    return table[labels]


def transform_outputs(outputs: dict, critical_ids: Iterable[int], head: str) -> dict:
    """Model outputs with every ``pred_logits`` (also in ``aux_outputs``) transformed; boxes unchanged."""
    result = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    result["pred_logits"] = transform_logits(outputs["pred_logits"], critical_ids, head)
    if "aux_outputs" in outputs:
        result["aux_outputs"] = [transform_outputs(a, critical_ids, head) for a in outputs["aux_outputs"]]
    return result


def transform_targets(targets: list[dict], critical_ids: Iterable[int], num_classes: int) -> list[dict]:
    """Targets with labels relabelled by :func:`transform_labels`; other keys unchanged."""
    return [{**t, "labels": transform_labels(t["labels"], critical_ids, num_classes)} for t in targets]


def check_critical_ids(critical_ids: Iterable[int], num_classes: int, head: str) -> None:
    """Raise InputError unless every id is a real class and at least one class is left for "others"."""
    ids = _canonical_ids(critical_ids)
    for c in ids:
        if head == "softmax" and c == num_classes:
            raise InputError(
                f"critical id {c} is the no-object index of this softmax head ({num_classes} classes + "
                "no-object); list only real category ids"
            )
        if not 0 <= c < num_classes:
            raise InputError(
                f"critical id {c} is not a category of this model (ids 0..{num_classes - 1}); "
                "use COCO category ids the model was built for"
            )
    if len(ids) >= num_classes:
        raise InputError(
            f"all {num_classes} classes are critical, nothing is left for 'others'; "
            "use the ordinary criterion instead"
        )


def _canonical_ids(critical_ids: Iterable[int]) -> tuple[int, ...]:
    ids = [int(c) for c in critical_ids]
    if not ids:
        raise InputError("the critical set is empty; pass at least one category id")
    if len(set(ids)) != len(ids):
        raise InputError(f"critical ids {ids} contain duplicates; list each category once")
    return tuple(sorted(ids))
