"""The two classification heads of the DETR family and what each implies for the logits.

``"softmax"`` (DETR): K = num_classes + 1 logits, the last one is "no object".
``"sigmoid"`` (Deformable DETR): K = num_classes logits, independent sigmoids, no no-object logit.
"""

from __future__ import annotations

from torch import Tensor

from fxq.errors import InputError

HEADS = ("softmax", "sigmoid")


def check_head(head: str) -> str:
    """Return ``head`` if it is a known head kind, else raise InputError."""
    if head not in HEADS:
        raise InputError(f"unknown head {head!r}; use one of {HEADS} (model.head says which)")
    return head


def num_classes_of(logits: Tensor, head: str) -> int:
    """Number of real classes behind ``logits`` [..., K] for ``head``."""
    return logits.shape[-1] - 1 if check_head(head) == "softmax" else logits.shape[-1]
