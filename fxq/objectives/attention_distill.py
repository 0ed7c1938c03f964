"""AQ-DETR's layer-by-layer distillation of the quantized encoder's attention from the float encoder's.

For every encoder layer, KL(A_T ‖ A_S) of each attention row — DETR: the softmax over keys of each head and
query ([B·H, S, S]); Deformable DETR: the sampling weights, a softmax over levels × points of each head and query
([B, S, H, L·P]) — averaged over rows and layers. The maps are the training graph's
``outputs["fxq_train"]["encoder_attention"]`` (:mod:`fxq.passes.training_graph`), the student's taken before its
attention quantizer. Rows where the teacher puts zero probability (padded keys) add nothing; the teacher is
detached, so the gradient reaches only the student. AQ-DETR's abstract gives no weight: ``weight`` defaults to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fxq.errors import InputError
from fxq.tracing import train_output

TINY = 1e-12


def attention_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of KL(teacher ‖ student) of probability maps normalised over the last dimension."""
    if student.shape != teacher.shape:
        raise InputError(f"attention maps {tuple(student.shape)} (student) and {tuple(teacher.shape)} (teacher) "
                         "differ: distil from the float graph of the same model at the same input size")
    teacher = teacher.detach()
    terms = torch.where(teacher > 0, teacher * (teacher.clamp_min(TINY).log() - student.clamp_min(TINY).log()),
                        torch.zeros_like(teacher))
    return terms.sum(-1).mean()


class AttentionDistillation:
    """Layer-wise encoder attention KL; call as ``aq(student, teacher, targets) -> {"aq.attention_kl",
    "loss_aq"}``."""

    name = "aq"

    def __init__(self, weight: float = 1.0) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InputError(f"attention distillation weight={weight!r}: use a finite number >= 0")
        self.weight = weight

    def config(self) -> dict:
        """Plain-type settings (for fingerprints and logs)."""
        return {"weight": self.weight}

    def __call__(self, student: Mapping, teacher: Mapping, targets=None) -> dict[str, Tensor]:
        s_maps = train_output(student, "encoder_attention", "attention distillation (student)")
        t_maps = train_output(teacher, "encoder_attention", "attention distillation (teacher)")
        if len(s_maps) != len(t_maps):
            raise InputError(f"the student has {len(s_maps)} encoder layers, the teacher {len(t_maps)}: distil from "
                             "the float graph of the same model")
        kl = torch.stack([attention_kl(s, t) for s, t in zip(s_maps, t_maps, strict=True)]).mean()
        return {"aq.attention_kl": kl, "loss_aq": self.weight * kl}

