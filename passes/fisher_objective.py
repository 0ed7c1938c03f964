"""The losses a Fisher analysis differentiates, and the (inputs, targets) units it feeds the graph.

Objectives (DESIGN.md §3, FQ-DETR): ``"overall"`` uses L_A, the DETR set loss
(``fxq.objectives.build_criterion(gm.head, aux=False)``); ``"critical"`` uses L_F, the set loss on the
critical-category problem (:class:`fxq.objectives.CriticalObjective`); ``"combined"`` uses α·L_A + L_F.
The combined objective is linear in the two losses, so its gradient (and Hessian) is α·(that of L_A) + (that of
L_F): an analysis computes both and derives the combined statistic, and records all three.

Loader batches are ``(images, mask, targets)`` as :func:`fxq.data.collate` yields them, or ``(images, targets)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from fxq.errors import InputError
from fxq.objectives import CriticalObjective, build_criterion
from fxq.passes.calibrate import graph_inputs

OBJECTIVES = ("overall", "critical", "combined")

Unit = tuple[tuple[torch.Tensor, ...], list[dict]]


class DetectionLosses:
    """Computes the base losses (``overall`` = L_A and/or ``critical`` = L_F) one objective needs."""

    def __init__(self, gm: torch.fx.GraphModule, objective: str = "overall",
                 critical_ids: Sequence[int] | None = None, alpha: float = 1.0) -> None:
        if objective not in OBJECTIVES:
            raise InputError(f"objective {objective!r} is unknown; use one of {OBJECTIVES}")
        head = getattr(gm, "head", None)
        if head is None:
            raise InputError("the graph does not say its detection head; pass the DetectorGraph that fxq.trace "
                             "returns for a DETR-family model (its model declares head = 'softmax'/'sigmoid')")
        if objective != "overall" and not critical_ids:
            raise InputError(f'objective "{objective}" needs the critical categories: pass critical_ids=[...] '
                             '(category ids of the model), or use objective="overall"')
        self.objective, self.alpha = objective, float(alpha)
        self.criterion = build_criterion(head, aux=False)
        self.critical = None
        if objective != "overall":
            self.critical = CriticalObjective(self.criterion, critical_ids, alpha,
                                              num_classes=getattr(gm, "num_classes", None))

    @property
    def keys(self) -> tuple[str, ...]:
        """The base losses computed: ("overall",), ("critical",) or ("overall", "critical")."""
        return {"overall": ("overall",), "critical": ("critical",)}.get(self.objective, ("overall", "critical"))

    def __call__(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The base losses of one forward pass, by key."""
        if self.critical is None:
            return {"overall": self.criterion(outputs, targets)["loss"]}
        terms = self.critical(outputs, targets)
        losses = {"overall": terms["loss_all"], "critical": terms["loss_critical"]}
        return {k: losses[k] for k in self.keys}

    def with_combined(self, values: dict[str, Any], combine: Any) -> dict[str, Any]:
        """``values`` plus ``"combined"`` = ``combine(alpha, overall, critical)`` when the objective is combined."""
        if self.objective != "combined":
            return values
        return {**values, "combined": combine(self.alpha, values["overall"], values["critical"])}


def split_batch(gm: torch.fx.GraphModule, batch: Any, index: int = 0) -> Unit:
    """The graph inputs and the per-image targets of loader batch number ``index``; NaN/inf images refused."""
    targets = batch[-1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, dict) for t in targets):
        raise InputError("a Fisher analysis needs ground truth: the loader must yield (images, mask, targets) "
                         "batches as fxq.data.collate does, with one target dict per image")
    inputs = graph_inputs(gm, batch[:-1] if len(batch) > 2 else batch[0])
    if getattr(gm, "takes_mask", False) and (len(inputs) < 2 or inputs[1] is None):
        raise InputError("this graph takes a padding mask: the loader must yield (images, mask, targets)")
    if len(targets) != inputs[0].shape[0]:
        raise InputError(f"the batch has {inputs[0].shape[0]} images but {len(targets)} target dicts; "
                         "yield one target dict per image")
    bad = [i for i in range(len(targets)) if not torch.isfinite(inputs[0][i]).all()]
    if bad:
        raise InputError(f"batch {index}: images {bad} hold NaN/inf values, so every gradient would be "
                         "NaN; check the data pipeline (decoding, normalisation) or drop those images")
    return inputs, list(targets)


def units(gm: torch.fx.GraphModule, batch: Any, per_sample: bool, index: int = 0) -> Iterator[Unit]:
    """The batch as one unit, or (``per_sample``) as one unit per image (each a batch of one)."""
    inputs, targets = split_batch(gm, batch, index)
    if not per_sample:
        yield inputs, targets
        return
    for i, target in enumerate(targets):
        yield tuple(x[i:i + 1] for x in inputs), [target]


def iterate(loader: Iterable, num_batches: int | None, progress: bool, desc: str) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` over the first ``num_batches`` batches of ``loader`` (all by default), with a bar."""
    total = num_batches
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    bar = tqdm(loader, total=total, desc=desc, disable=not progress, leave=False)
    for index, batch in enumerate(bar):
        if num_batches is not None and index >= num_batches:
            break
        yield index, batch


def require_batches(seen: int, what: str) -> None:
    """InputError when a loader yielded nothing."""
    if seen == 0:
        raise InputError(f"the {what} loader yielded no batches; pass a loader over at least one image "
                         "with its targets (and num_batches >= 1)")
