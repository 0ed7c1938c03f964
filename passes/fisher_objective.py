"""The losses a Fisher analysis differentiates, and the (inputs, targets) units it feeds the graph.

Objectives (FQ-DETR; docs/METHODS.md, "Sensitivity"): ``"overall"`` uses L_A, the DETR set loss
(``fxq.objectives.build_criterion(gm.head, aux=False, rank_mean=False)``); ``"critical"`` uses L_F, the set loss on the
critical-category problem (:class:`fxq.objectives.CriticalObjective`); ``"combined"`` uses α·L_A + L_F.
The combined objective is linear in the two losses, so its gradient (and Hessian) is α·(that of L_A) + (that of
L_F): an analysis computes both and derives the combined statistic, and records all three.

Loader batches are ``(images, mask, targets)`` as :func:`fxq.data.collate` yields them, or ``(images, targets)``;
they reach the graph through :func:`fxq.tracing.model_batch` (which refuses NaN/inf images, missing targets
and, for a graph traced with images only, padded batches).

Under ``torchrun`` (WORLD_SIZE > 1; the process group of :func:`fxq.train.distributed.init_distributed`, gloo
on CPU) an analysis shares the loader's batches out: batch i is analysed on rank i % world_size, so the ranks
see the batches one process sees, each exactly once (every rank reads every batch and skips the others'). The
losses normalise by their own batch (``rank_mean=False``), and :func:`sum_over_ranks` adds the ranks'
accumulators, so every rank ends with what one process computes over the same batches. An error on one rank
is raised on every rank (none waits for the others forever).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from fxq.errors import InputError
from fxq.objectives import CriticalObjective, build_criterion
from fxq.tracing import model_batch
from fxq.train.distributed import DistInfo, gather_objects, init_distributed

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
        self.criterion = build_criterion(head, aux=False, rank_mean=False)
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


def units(gm: torch.fx.GraphModule, batch: Any, per_sample: bool, index: int = 0) -> Iterator[Unit]:
    """Loader batch number ``index`` as one (inputs, targets) unit, or (``per_sample``) as one unit per image
    (each a batch of one)."""
    inputs, targets = model_batch(gm, batch, need_targets=True, index=index)
    if not per_sample:
        yield inputs, targets
        return
    for i, target in enumerate(targets):
        yield tuple(x[i:i + 1] for x in inputs), [target]


def analysis_ranks(gm: torch.fx.GraphModule) -> DistInfo:
    """The ranks an analysis of ``gm`` shares its batches with: torchrun's process group (joined here), or one."""
    param = next(gm.parameters(), None)
    return init_distributed("cpu" if param is None else str(param.device))


def iterate(loader: Iterable, num_batches: int | None, progress: bool, desc: str,
            ranks: DistInfo | None = None) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` over the first ``num_batches`` batches of ``loader`` (all by default) whose index is
    this rank's (index % world_size == rank; every index for one process), with a bar on rank 0."""
    ranks = ranks or DistInfo()
    total = num_batches
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    bar = tqdm(loader, total=total, desc=desc, disable=not (progress and ranks.is_main), leave=False)
    for index, batch in enumerate(bar):
        if num_batches is not None and index >= num_batches:
            break
        if index % ranks.world_size == ranks.rank:
            yield index, batch


def sum_over_ranks(local: Callable[[], dict], ranks: DistInfo) -> dict:
    """``local()`` (nested dicts of numbers) summed over the ranks, key by key; one process: ``local()``.

    An exception raised by ``local`` on any rank is raised on every rank: the failing one re-raises its own,
    the others an error of the same kind (InputError, else RuntimeError) naming the rank and its message.
    """
    if ranks.world_size == 1:
        return local()
    try:
        mine, error = ("ok", local()), None
    except Exception as exc:  # any failure: the other ranks must hear of it, not wait forever
        mine, error = ("error", isinstance(exc, InputError), f"{type(exc).__name__}: {exc}"), exc
    gathered = gather_objects(mine, ranks)
    if error is not None:
        raise error
    for rank, item in enumerate(gathered):
        if item[0] == "error":
            kind = InputError if item[1] else RuntimeError
            raise kind(f"rank {rank} of {ranks.world_size} failed in the analysis: {item[2]}")
    return functools.reduce(_add, (item[1] for item in gathered))


def _add(a: Any, b: Any) -> Any:
    """Key-by-key sum of two nested dicts of numbers (a key missing on one side counts as zero)."""
    if not isinstance(a, dict):
        return a + b
    return {k: _add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}


def require_batches(seen: int, what: str) -> None:
    """InputError when a loader yielded nothing."""
    if seen == 0:
        raise InputError(f"the {what} loader yielded no batches; pass a loader over at least one image "
                         "with its targets (and num_batches >= 1)")
