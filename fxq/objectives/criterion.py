"""DETR set criterion: Hungarian matching, then classification, L1 and GIoU losses on the matched pairs.

Per decoder layer (the final one and every entry of ``outputs["aux_outputs"]``):

- ``loss_ce``: softmax head: cross-entropy over all queries, unmatched queries labelled "no object",
  class weights 1 except ``eos_coef`` (0.1) for no-object, weighted mean (as DETR).
  Sigmoid head: sigmoid focal loss (alpha 0.25, gamma 2) summed over queries and classes, divided by the
  number of boxes (as Deformable DETR).
- ``loss_bbox``: L1 between matched cxcywh boxes, summed, divided by the number of boxes.
- ``loss_giou``: ``1 - GIoU`` of matched boxes, summed, divided by the number of boxes.

Aux layer i's terms are named ``loss_ce_{i}``, ``loss_bbox_{i}``, ``loss_giou_{i}``. Each extra query group g of
Group DETR (``outputs["group_outputs"]``, matched one-to-one on its own) adds the same terms prefixed ``g{g}.``.
The returned dict also holds ``loss`` = sum over all terms of ``weights[term] * term`` (defaults 1/5/2 softmax,
2/5/2 sigmoid).

The number of boxes is ``repeat * (number of ground-truth boxes)`` (so one-to-many matching keeps the scale),
at least 1. Under ``torch.distributed`` the box count and the cross-entropy weight sum are averaged over ranks
(as DETR does for the box count), so that DDP's gradient average equals the single-process gradient of the
global batch; ``rank_mean=False`` keeps each call's own normalisers (the Fisher analysis: its ranks see
different batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fxq.objectives.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from fxq.objectives.heads import check_head
from fxq.objectives.matcher import HungarianMatcher, Match

TERMS = ("loss_ce", "loss_bbox", "loss_giou")
DEFAULT_WEIGHTS = {
    "softmax": {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    "sigmoid": {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
}


@dataclass
class SetCriterion:
    """The DETR / Deformable DETR training loss; call it as ``criterion(outputs, targets) -> dict``."""

    head: str = "softmax"
    matcher: HungarianMatcher | None = None
    weights: dict[str, float] = field(default_factory=dict)
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux: bool = True
    rank_mean: bool = True

    def __post_init__(self) -> None:
        check_head(self.head)
        if self.matcher is None:
            self.matcher = HungarianMatcher(head=self.head)
        self.weights = {**DEFAULT_WEIGHTS[self.head], **self.weights}

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> SetCriterion:
        """The criterion for ``model.head`` with default weights (kwargs override)."""
        return cls(head=model.head, **kwargs)

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        return {
            "head": self.head,
            "matcher": self.matcher.config(),
            "weights": dict(self.weights),
            "eos_coef": self.eos_coef,
            "focal_alpha": self.focal_alpha,
            "focal_gamma": self.focal_gamma,
            "aux": self.aux,
        }

    def __call__(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """All loss terms (unweighted) of every decoder layer and query group, plus their weighted total ``loss``."""
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self.decoder_losses(outputs, targets, num_boxes)
        for g, group in enumerate(outputs.get("group_outputs", []), start=1):
            losses.update({f"g{g}.{k}": v for k, v in self.decoder_losses(group, targets, num_boxes).items()})
        losses["loss"] = sum(self.weights[_base(k)] * v for k, v in losses.items())
        return losses

    def decoder_losses(self, outputs: dict, targets: list[dict], num_boxes: Tensor) -> dict[str, Tensor]:
        """The terms of the final decoder layer and (when ``aux``) of every ``aux_outputs`` entry."""
        losses = self.layer_losses(outputs, targets, self.matcher(outputs, targets), num_boxes)
        if self.aux:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                terms = self.layer_losses(aux, targets, self.matcher(aux, targets), num_boxes)
                losses.update({f"{k}_{i}": v for k, v in terms.items()})
        return losses

    def num_boxes(self, targets: list[dict], device: torch.device | str = "cpu") -> Tensor:
        """Normaliser of the box losses: repeat x ground-truth boxes, averaged over ranks, at least 1."""
        count = torch.tensor(
            float(self.matcher.repeat * sum(len(t["labels"]) for t in targets)), device=device
        )
        return _rank_mean(count, self.rank_mean).clamp(min=1.0)

    def layer_losses(
        self, outputs: dict, targets: list[dict], matches: list[Match], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        """``loss_ce``, ``loss_bbox``, ``loss_giou`` of one decoder layer for the given matches."""
        batch_idx, query_idx = _flat_query_index(matches)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, matches, strict=True)])
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, matches, strict=True)])
        logits = outputs["pred_logits"]
        labels, tgt_boxes = labels.to(logits.device), tgt_boxes.to(logits.device)
        src_boxes = outputs["pred_boxes"][batch_idx, query_idx]
        if self.head == "softmax":
            loss_ce = self._softmax_ce(logits, batch_idx, query_idx, labels)
        else:
            loss_ce = self._focal(logits, batch_idx, query_idx, labels, num_boxes)
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return {
            "loss_ce": loss_ce,
            "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def _softmax_ce(self, logits: Tensor, batch_idx: Tensor, query_idx: Tensor, labels: Tensor) -> Tensor:
        no_object = logits.shape[-1] - 1
        classes = torch.full(logits.shape[:2], no_object, dtype=torch.int64, device=logits.device)
        classes[batch_idx, query_idx] = labels
        class_weight = torch.ones(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        class_weight[no_object] = self.eos_coef
        ce = F.cross_entropy(logits.transpose(1, 2), classes, weight=class_weight, reduction="none")
        return ce.sum() / _rank_mean(class_weight[classes].sum().detach(), self.rank_mean)

    def _focal(
        self, logits: Tensor, batch_idx: Tensor, query_idx: Tensor, labels: Tensor, num_boxes: Tensor
    ) -> Tensor:
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels] = 1.0
        return sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes


def build_criterion(head: str = "softmax", *, one_to_many: int = 1, **kwargs) -> SetCriterion:
    """A SetCriterion for ``head`` whose matcher repeats each ground-truth box ``one_to_many`` times."""
    matcher = HungarianMatcher(head=head, repeat=one_to_many)
    return SetCriterion(head=head, matcher=matcher, **kwargs)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss (Lin et al. 2017) of sigmoid ``logits`` against 0/1 ``targets``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _flat_query_index(matches: list[Match]) -> tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q for q, _ in matches])
    return batch_idx, query_idx


def _rank_mean(value: Tensor, across_ranks: bool = True) -> Tensor:
    """``value`` averaged over the ranks of the default process group (unchanged without one or when not
    ``across_ranks``)."""
    if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def _base(term: str) -> str:
    term = term.rpartition(".")[2]
    head, _, tail = term.rpartition("_")
    return head if tail.isdigit() else term
