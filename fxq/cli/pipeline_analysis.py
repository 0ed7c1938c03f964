"""The analysis stages of ``fxq pipeline``: Fisher traces of every quantizable layer, and the precision
allocation under a budget with the budget frontier around it.

``fisher.json`` (:func:`fxq.passes.analysis_io.save_analysis` format): each conv/linear node's empirical Fisher
trace of the overall loss L_A, of the critical loss L_F and of L_A + L_F (the "combined" objective computes all
three in one pass over the calibration images, two per batch). ``frontier.json``: the minimal Σ Ω (the
allocator's objective) at budgets from the smallest feasible to every node at the top candidate, with the
average weight bits each point gives, the uniform choices (every node at one candidate) beside them, and with
``--budget`` the chosen point. ``allocation.json`` (only with
``--budget``): the allocated graph's annotations, which ``fxq export --allocation`` and the PTQ stage read.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from fxq.cli.run_artifacts import ALLOCATION, FISHER, FRONTIER
from fxq.io import write_json

#: Budgets of the frontier, between the smallest feasible and the largest useful one.
FRONTIER_POINTS = 13


def fisher_stage(out: Path, fgm, calib, critical: list[int], progress: bool) -> dict:
    """Fisher traces (overall, critical, combined) of ``fgm``'s layers on ``calib``; write fisher.json."""
    from fxq.passes.analysis_io import save_analysis
    from fxq.passes.fisher import fisher_traces

    gm = copy.deepcopy(fgm)
    result = fisher_traces(gm, calib, objective="combined", critical_ids=critical, progress=progress)
    save_analysis(gm, out / FISHER)
    return result.info


def allocate_stage(out: Path, run_id: str, fgm, options: dict) -> dict:
    """Σ Ω over the budget frontier and, with ``options["budget"]``, the allocation; write frontier.json (and
    allocation.json). ``options``: policy, candidates, budget, budget_kind, latency_table, objective."""
    from fxq.passes.allocate import allocate_bits, build_problem
    from fxq.passes.analysis_io import load_analysis, save_analysis
    from fxq.passes.policy import annotate_policy

    start = time.perf_counter()
    gm = copy.deepcopy(fgm)
    annotate_policy(gm, options["policy"])
    load_analysis(gm, out / FISHER)
    kind, table, objective = options["budget_kind"], options["latency_table"], options["objective"]
    problem = build_problem(gm, options["candidates"], kind, table, None, objective)
    record = {"run_id": run_id, "budget_kind": kind, "objective": objective, "candidates": list(problem.candidates),
              "points": _frontier(gm, problem), "uniform": _uniform(problem), "chosen": None}
    if options["budget"] is not None:
        info = allocate_bits(gm, problem.candidates, options["budget"], kind, table, None, objective).info
        record["chosen"] = {"budget": info["budget"], "used": info["used"], "omega": info["objective_value"],
                            "avg_bits": _avg_bits(gm, info["bits"]), "histogram": info["histogram"]}
        save_analysis(gm, out / ALLOCATION)
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / FRONTIER, record)
    return record


def _frontier(gm: torch.fx.GraphModule, problem) -> list[dict]:
    """Optimal Σ Ω and average weight bits at budgets spread from the smallest to the largest useful one."""
    points = []
    for budget in np.linspace(problem.min_budget, problem.max_budget, FRONTIER_POINTS):
        omega, bits, used = problem.solve(float(budget))
        points.append({"budget": float(budget), "used": used, "omega": omega, "avg_bits": _avg_bits(gm, bits)})
    return points


def _uniform(problem) -> dict[str, dict]:
    """{bits: {"used", "omega", "avg_bits"}}: every allocated node at one candidate."""
    return {str(b): {"used": problem.offset + float(problem.resource[:, j].sum()),
                     "omega": float(problem.cost[:, j].sum()),
                     "avg_bits": float(b)} for j, b in enumerate(problem.candidates)}


def _avg_bits(gm: torch.fx.GraphModule, bits: dict[str, int]) -> float:
    """Weight bits averaged over the weights of the allocated nodes (a shared weight counted once)."""
    from fxq.passes.weights import parameter, weight_ref

    total = weighted = 0.0
    seen: set[str] = set()
    for node in gm.graph.nodes:
        ref = weight_ref(node) if node.name in bits else None
        if ref is None or str(ref) in seen:
            continue
        seen.add(str(ref))
        numel = ref.select(parameter(gm, ref, node)).numel()
        total, weighted = total + numel, weighted + numel * bits[node.name]
    return weighted / total if total else 0.0
