"""The QAT objective: L = L_det + L_KD + λ_t·tr(Î_F), with every term returned separately.

- L_det: the detection objective, a :class:`fxq.objectives.SetCriterion` (L_A) or a
  :class:`fxq.objectives.CriticalObjective` (α·L_A + L_F);
- L_KD: :class:`fxq.objectives.distill.Distillation` from the float teacher's outputs (optional);
- tr(Î_F): :class:`fxq.objectives.fisher_reg.FisherTraceRegularizer` (optional) of L_F (``loss_critical``)
  when the detection objective is a CriticalObjective, else of L_A (the ordinary empirical Fisher).

The result holds ``loss`` (the total to backpropagate), ``loss_det``, the detection objective's own terms,
``kd.*`` / ``loss_kd`` and ``fisher_trace`` / ``fisher_lambda`` / ``loss_fisher`` when those are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from fxq.errors import InputError
from fxq.objectives.distill import Distillation
from fxq.objectives.fisher_reg import FisherTraceRegularizer


class QATLoss:
    """Call as ``loss(outputs, targets, teacher_outputs=None, step=0) -> dict`` of tensors."""

    def __init__(self, detection: Callable[[dict, list[dict]], dict[str, Tensor]],
                 distillation: Distillation | None = None,
                 regularizer: FisherTraceRegularizer | None = None) -> None:
        self.detection, self.distillation, self.regularizer = detection, distillation, regularizer

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        parts = {"detection": self.detection, "distillation": self.distillation, "regularizer": self.regularizer}
        return {k: v.config() if hasattr(v, "config") else (None if v is None else type(v).__name__)
                for k, v in parts.items()}

    def __call__(self, outputs: Mapping[str, Tensor], targets: list[dict],
                 teacher_outputs: Mapping[str, Tensor] | None = None, step: int = 0) -> dict[str, Tensor]:
        det = self.detection(outputs, targets)
        result = {k: v for k, v in det.items() if k != "loss"}
        result["loss_det"] = total = det["loss"]
        if self.distillation is not None:
            if teacher_outputs is None:
                raise InputError("the QAT loss distils from the float teacher: pass teacher_outputs (the float "
                                 "graph's outputs on the same images, computed under torch.no_grad())")
            kd = self.distillation(outputs, teacher_outputs)
            result.update(kd)
            total = total + kd["loss_kd"]
        if self.regularizer is not None:
            inner = det["loss_critical"] if "loss_critical" in det else det["loss"]
            reg = self.regularizer(inner, step)
            result.update(reg)
            total = total + reg["loss_fisher"]
        result["loss"] = total
        return result
