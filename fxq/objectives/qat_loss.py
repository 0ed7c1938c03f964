"""The QAT objective: L = L_det + L_KD + λ_t·tr(Î_F), with every term returned separately.

- L_det: the detection objective, a :class:`fxq.objectives.SetCriterion` (L_A) or a
  :class:`fxq.objectives.CriticalObjective` (α·L_A + L_F);
- L_KD: distillation terms from the float teacher's outputs (optional): :class:`fxq.objectives.distill.Distillation`
  (class + box KD), :class:`fxq.objectives.drd.RectificationDistillation` (Q-DETR's DRD),
  :class:`fxq.objectives.attention_distill.AttentionDistillation` (AQ-DETR's encoder attention KL);
- tr(Î_F): :class:`fxq.objectives.fisher_reg.FisherTraceRegularizer` (optional) of L_F (``loss_critical``)
  when the detection objective is a CriticalObjective, else of L_A (the ordinary empirical Fisher).

The result holds ``loss`` (the total to backpropagate), ``loss_det``, the detection objective's own terms,
``kd.*`` / ``loss_kd`` (``drd.*`` / ``loss_drd``, ``aq.*`` / ``loss_aq``) and
``fisher_trace`` / ``fisher_lambda`` / ``loss_fisher`` when those are used (a lazy regularizer's only at the
steps it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.fisher_reg import FisherTraceRegularizer


class QATLoss:
    """Call as ``loss(outputs, targets, teacher_outputs=None, step=0) -> dict`` of tensors.

    ``distillation``: one teacher term or a sequence of them, each a callable ``term(student, teacher, targets)``
    returning its terms and ``loss_<term.name>`` (KD, DRD, attention distillation), which is added to the total.
    """

    def __init__(self, detection: Callable[[dict, list[dict]], dict[str, Tensor]],
                 distillation: TeacherTerm | Sequence[TeacherTerm] | None = None,
                 regularizer: FisherTraceRegularizer | None = None) -> None:
        terms = () if distillation is None else distillation
        self.detection, self.regularizer = detection, regularizer
        self.distillations = tuple(terms) if isinstance(terms, list | tuple) else (terms,)

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        def of(part):
            return part.config() if hasattr(part, "config") else (None if part is None else type(part).__name__)
        distillation = {t.name: of(t) for t in self.distillations} or None
        if distillation is not None and list(distillation) == ["kd"]:
            distillation = distillation["kd"]  # the fingerprint of runs made before DRD / AQ existed
        return {"detection": of(self.detection), "distillation": distillation, "regularizer": of(self.regularizer)}

    def __call__(self, outputs: Mapping[str, Tensor], targets: list[dict],
                 teacher_outputs: Mapping[str, Tensor] | None = None, step: int = 0) -> dict[str, Tensor]:
        det = self.detection(outputs, targets)
        result = {k: v for k, v in det.items() if k != "loss"}
        result["loss_det"] = total = det["loss"]
        if self.distillations and teacher_outputs is None:
            raise InputError("the QAT loss distils from the float teacher: pass teacher_outputs (the float "
                             "graph's outputs on the same images, computed under torch.no_grad())")
        for term in self.distillations:
            values = term(outputs, teacher_outputs, targets)
            result.update(values)
            total = total + values[f"loss_{term.name}"]
        if self.regularizer is not None:
            inner = det["loss_critical"] if "loss_critical" in det else det["loss"]
            reg = self.regularizer(inner, step)
            result.update(reg)
            if reg:  # a lazy regularizer skips most steps
                total = total + reg["loss_fisher"]
        result["loss"] = total
        return result


class TeacherTerm(Protocol):
    """A distillation term: ``name`` ("kd", "drd", "aq") and ``term(student, teacher, targets) -> dict``."""

    name: str

    def __call__(self, student: Mapping, teacher: Mapping, targets: list[dict]) -> dict[str, Tensor]: ...
