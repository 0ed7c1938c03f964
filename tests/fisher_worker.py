"""Per-rank worker of tests/test_fisher_distributed.py's torchrun test: ``fisher_worker.py SYNTH OUT``.

Runs every analysis of CASES, a loader whose batch 1 holds a NaN image, and ``fxq allocate`` on this rank, and
writes what it got to OUT/rank{RANK}.json (``fxq allocate`` writes its analysis to OUT/rank{RANK}/analysis.json,
which only rank 0 may do). The test runs the same cases in one process and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fxq.data import CocoDetection, collate, eval_transforms
from fxq.errors import InputError
from fxq.models import build
from fxq.passes.fisher import fisher_traces
from fxq.passes.hutchinson import hutchinson_traces
from fxq.passes.weights import weight_nodes
from fxq.ptq import float_graph

SIZE, CRITICAL = 64, [1, 2, 3]
#: The synthetic train split has 6 images: batch size 2 gives 3 batches (rank 0 analyses 2, rank 1 one),
#: batch size 4 gives 2 batches of 4 and 2 images, num_batches=1 leaves rank 1 nothing to analyse.
CASES: dict[str, dict] = {
    "fisher_overall_odd": {"method": "empirical", "objective": "overall", "batch_size": 2},
    "fisher_combined": {"method": "empirical", "objective": "combined", "batch_size": 4, "alpha": 0.5},
    "fisher_critical_per_sample": {"method": "empirical", "objective": "critical", "batch_size": 4,
                                   "per_sample": True},
    "fisher_one_batch": {"method": "empirical", "objective": "overall", "batch_size": 2, "num_batches": 1},
    "hutchinson_overall_odd": {"method": "hutchinson", "objective": "overall", "batch_size": 2, "probes": 2,
                               "seed": 3},
}
CLI = ["allocate", "detr_tiny", "--split", "val", "--images", "3", "--batch-size", "1", "--size", str(SIZE),
       "--candidates", "4", "8", "--budget", "6", "--no-progress"]


def graph() -> torch.fx.GraphModule:
    """detr_tiny with seed-0 weights, traced and folded as ``fxq allocate`` makes it."""
    return float_graph(build("detr_tiny", seed=0), (SIZE, SIZE))


def train_set(root: Path) -> CocoDetection:
    return CocoDetection.from_folder(root, "train", transforms=eval_transforms(SIZE))


def records(gm: torch.fx.GraphModule) -> dict[str, dict]:
    """``fxq.fisher`` of every analysed node, by node name."""
    return {node.name: dict(node.meta["fxq.fisher"]) for node, _ in weight_nodes(gm)}


def run_case(gm: torch.fx.GraphModule, dataset: CocoDetection, case: dict) -> dict[str, dict]:
    """The records one case's analysis writes on ``gm``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=case["batch_size"], collate_fn=collate)
    common = {"objective": case["objective"], "critical_ids": CRITICAL if case["objective"] != "overall" else None,
              "alpha": case.get("alpha", 1.0), "num_batches": case.get("num_batches"), "progress": False}
    if case["method"] == "hutchinson":
        hutchinson_traces(gm, loader, num_probes=case["probes"], seed=case["seed"], **common)
    else:
        fisher_traces(gm, loader, per_sample=case.get("per_sample", False), **common)
    return records(gm)


def nan_batch_error(gm: torch.fx.GraphModule, dataset: CocoDetection) -> str | None:
    """The InputError message of an analysis whose batch 1 (rank 1's) holds a NaN image, None without one."""
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate))
    batches[1][0][0, 0, 0, 0] = float("nan")
    try:
        fisher_traces(gm, batches, progress=False)
    except InputError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    from fxq.cli import main

    torch.set_num_threads(1)
    root, out, rank = Path(sys.argv[1]), Path(sys.argv[2]), int(os.environ["RANK"])
    gm, dataset = graph(), train_set(root)
    result = {name: run_case(gm, dataset, case) for name, case in CASES.items()}
    result["nan_error"] = nan_batch_error(gm, dataset)
    result["cli_status"] = main([*CLI, "--data", str(root), "--out", str(out / f"rank{rank}" / "analysis.json")])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
