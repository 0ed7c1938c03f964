"""Hessian-trace sensitivity (HAWQ-V2): Hutchinson's estimator tr(H_l) ≈ mean over Rademacher v of v_lᵀ(H v)_l.

By default one Hessian-vector product (double backprop) per probe serves every node at once: the probe v
covers all analysed parameters, and E[v_lᵀ (H v)_l] = tr(H_ll) because the cross-block terms v_lᵀ H_lm v_m have
mean zero for independent Rademacher entries. They add variance, not bias — a lot of it for a node with a
small trace coupled to nodes with large ones. ``blockwise=True`` draws a separate probe per node (v zero outside
W_l): no cross-block variance, at (number of nodes) times the cost — affordable on tiny models, not on
DETR-R50. Probes come from a seeded ``torch.Generator``: the same seed gives the same estimate. Batch i's
probes are drawn from seed·1000003 + i, whichever process analyses it: under ``torchrun`` (batch i on rank
i % world_size, the ranks' sums added; :mod:`fxq.passes.fisher_objective`) every rank writes the records one
process would over the same batches (up to summation order).

The pass :func:`hutchinson_traces` stores, like the empirical Fisher, the per-element mean tr(H_l)/numel(W_l)
of each batch's loss Hessian, averaged over batches (the expectation is per batch). Reads ``fxq.role``,
``fxq.weight``; writes ``fxq.fisher`` = ``{"overall"/"critical"/"combined": tr/numel (those computed),
"alpha", "samples", "batches", "method": "hutchinson", "per_sample": False, "probes", "seed",
"blockwise"}`` (through :func:`fxq.passes.fisher.record_fisher`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.fx

from fxq.errors import InputError
from fxq.passes.fisher import analysed_params, check_finite_weights, differentiable, record_fisher
from fxq.passes.fisher_objective import DetectionLosses, analysis_ranks, iterate, require_batches, sum_over_ranks
from fxq.passes.pass_manager import PassResult
from fxq.passes.weights import WeightRef
from fxq.tracing import ModelBatch, model_batch

PROBE_STRIDE = 1_000_003


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor shaped like ``like`` with independent ±1 entries."""
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs * 2 - 1).to(device=like.device, dtype=like.dtype)


def check_probes(num_probes: int) -> None:
    """InputError unless at least one probe is asked for."""
    if not isinstance(num_probes, int) or num_probes < 1:
        raise InputError(f"num_probes={num_probes!r}; Hutchinson needs at least one probe vector (8 is common)")


def hutchinson_diagonal(loss: torch.Tensor, params: Sequence[torch.Tensor], num_probes: int,
                        generator: torch.Generator) -> list[torch.Tensor]:
    """Per parameter, the mean over ``num_probes`` probes of v ⊙ (H v): an unbiased estimate of diag(H)."""
    check_probes(num_probes)
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for _ in range(num_probes):
        probes = [rademacher(p, generator) for p in params]
        if not live:
            continue
        dot = sum((grads[i] * probes[i]).sum() for i in live)
        hv = torch.autograd.grad(dot, [params[i] for i in live], retain_graph=True, allow_unused=True)
        for i, h in zip(live, hv, strict=True):
            if h is not None:
                total[i] += probes[i] * h.detach()
    return [t / num_probes for t in total]


def hutchinson_trace(loss: torch.Tensor, params: Sequence[torch.Tensor], num_probes: int = 64, seed: int = 0,
                     blockwise: bool = False) -> list[float]:
    """Hutchinson estimates of tr(∂²loss/∂p²) for each tensor ``p`` in ``params`` (seeded).

    ``blockwise=False``: one probe over all tensors per Hessian-vector product; ``True``: a separate probe and
    product per tensor (``len(params)`` times the cost, no cross-block variance).
    """
    check_probes(num_probes)
    generator = torch.Generator().manual_seed(seed)
    if not blockwise:
        return [float(d.double().sum()) for d in hutchinson_diagonal(loss, params, num_probes, generator)]
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    return [_block_trace(g, p, None, num_probes, generator) for g, p in zip(grads, params, strict=True)]


def _block_trace(grad: torch.Tensor | None, param: torch.Tensor, ref: WeightRef | None, num_probes: int,
                 generator: torch.Generator) -> float:
    """Mean over probes of vᵀ(H v) with v supported on ``ref``'s part of ``param`` only."""
    total = 0.0
    for _ in range(num_probes):
        part = param if ref is None else ref.select(param)
        v = rademacher(part, generator)
        if grad is None or not grad.requires_grad:
            continue
        g = grad if ref is None else ref.select(grad)
        (hv,) = torch.autograd.grad((g * v).sum(), param, retain_graph=True, allow_unused=True)
        if hv is not None:
            total += float((v.double() * (hv if ref is None else ref.select(hv)).double()).sum())
    return total / num_probes


def _node_traces(loss: torch.Tensor, params: dict, targets: list, num_probes: int, seed: int,
                 blockwise: bool) -> dict[str, float]:
    names = list(params)
    generator = torch.Generator().manual_seed(seed)
    if blockwise:
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                                    allow_unused=True), strict=True))
        return {node.name: _block_trace(grads[ref.param], params[ref.param], ref, num_probes, generator)
                for node, ref in targets}
    diag = dict(zip(names, hutchinson_diagonal(loss, [params[n] for n in names], num_probes, generator),
                    strict=True))
    return {node.name: float(ref.select(diag[ref.param]).double().sum()) for node, ref in targets}


def _batch_traces(gm: torch.fx.GraphModule, batch: ModelBatch, losses: DetectionLosses, params: dict,
                  targets: list, num_probes: int, seed: int, blockwise: bool) -> dict[str, dict[str, float]]:
    values = losses(gm(*batch.inputs), batch.targets)
    result = {key: _node_traces(loss, params, targets, num_probes, seed, blockwise) for key, loss in values.items()}
    return losses.with_combined(result, lambda a, o, c: {n: a * o[n] + c[n] for n in o})


def _check_finite(traces: dict[str, dict[str, float]], index: int) -> None:
    for key, by_node in traces.items():
        bad = next((name for name, v in by_node.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise InputError(f"Hutchinson analysis: the {key} loss Hessian estimate of node {bad!r} is not finite "
                             f"on batch {index}; check that batch's images and targets for NaN/inf")


def hutchinson_traces(gm: torch.fx.GraphModule, loader: Iterable, objective: str = "overall",
                      critical_ids: Sequence[int] | None = None, alpha: float = 1.0,
                      num_batches: int | None = None, num_probes: int = 8, seed: int = 0, blockwise: bool = False,
                      progress: bool = True) -> PassResult:
    """Write Hutchinson Hessian traces as ``fxq.fisher`` (method "hutchinson") on every conv/linear node.

    ``num_probes`` Rademacher probes per batch, drawn from ``seed`` (and the batch index); ``blockwise`` as in
    the module docstring.
    """
    start = time.perf_counter()
    check_probes(num_probes)
    losses = DetectionLosses(gm, objective, critical_ids, alpha)
    targets, params = analysed_params(gm)
    check_finite_weights(gm, targets)
    ranks = analysis_ranks(gm)

    def local() -> dict:
        sums: dict[str, dict[str, float]] = {}
        images = batches = 0
        with differentiable(gm, params.values()):
            for index, raw in iterate(loader, num_batches, progress, f"Hutchinson ({objective})", ranks):
                batch = model_batch(gm, raw, need_targets=True, index=index)
                traces = _batch_traces(gm, batch, losses, params, targets, num_probes,
                                       seed * PROBE_STRIDE + index, blockwise)
                _check_finite(traces, index)
                for key, by_node in traces.items():
                    acc = sums.setdefault(key, dict.fromkeys(by_node, 0.0))
                    for name, value in by_node.items():
                        acc[name] += value
                images += len(batch.targets)
                batches += 1
        return {"sums": sums, "images": images, "batches": batches}

    total = sum_over_ranks(local, ranks)
    images, batches = total["images"], total["batches"]
    require_batches(batches, "Hutchinson analysis")
    extra = {"alpha": losses.alpha} if objective != "overall" else {}
    for node, ref in targets:
        numel = ref.select(params[ref.param]).numel()
        record_fisher(node, {**{k: s[node.name] / batches / numel for k, s in total["sums"].items()}, **extra,
                             "samples": images, "batches": batches, "method": "hutchinson", "per_sample": False,
                             "probes": num_probes, "seed": seed, "blockwise": blockwise})
    return PassResult(gm, False, {"nodes": len(targets), "objective": objective, "samples": images,
                                  "batches": batches, "probes": num_probes,
                                  "seconds": time.perf_counter() - start})
