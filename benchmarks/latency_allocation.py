"""Latency-budgeted allocation end to end (issue 18, deliverable 3): measure every quantizable node per candidate
precision on this machine (float included), let the MILP choose under a whole-model latency budget, export each
allocation, and compare its measured latency with the allocator's prediction and its AP with the uniform choices.

Run (one thread; each command ≈ 5–10 min; writes benchmarks/results/latency_allocation_<model>.json and .png):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_allocation.py --model deformable_detr_tiny
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_allocation.py --model detr_r50 --size 512 --policy W8A8 \\
        --candidates 8 32 --no-ap

Steps: (1) ``fxq bench``'s latency table (:meth:`fxq.bench.suite._Suite.latency`): each node profiled by
onnxruntime in files quantized uniformly at each quantized candidate and in the float export, plus the rest of the
model (per quantized width, the timed file minus its nodes), all files at ``--policy``; (2) Fisher traces of L_A
on the calibration images under ``--policy``
(default 4-4-8: 4-bit weights and activations, 8-bit attention; on this CPU 4-bit values run on the int8 kernels,
so the latency choice is which layers stay float); (3) for ``--points`` budgets from the fastest to the slowest
achievable, the allocation by Fisher (objective ``overall``) and by the plain weight error (``uniform``, the
baseline; the only one with ``--no-ap``, for random weights, which have no loss to weigh by), each quantized
(min-max) and lowered for ort-cpu; (4) every file, with the float export and the uniform
policy, timed in interleaved rounds (fresh process, ``--rounds`` turns of ``--runs`` calls), then (tiny models)
scored on the first 250 validation images by onnxruntime, with paired bootstrap intervals (200 replicates over
the images) of each Fisher allocation's AP against the weight-error one at the same budget and of every row
against the uniform policy. The prediction of a file is the allocator's ``used``:
rest + Σ node latency at the chosen precision.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from common import ROOT, SessionDetector, loader, markdown, save, synthetic_root

import fxq
from fxq.bench.suite import BenchConfig, _Suite, bench_images
from fxq.bench.timing import in_fresh_process, measure_models
from fxq.cli.export import lower_checked
from fxq.data import resolve_categories
from fxq.evaluation import bootstrap_metrics, compare, evaluate_model
from fxq.io import write_json
from fxq.passes import annotate_policy
from fxq.passes.allocate import allocatable_nodes, allocate_bits, build_problem, load_latency_table
from fxq.passes.fisher import fisher_traces
from fxq.passes.quantize import quantize_annotated
from fxq.passes.sensitivity import weight_sensitivity
from fxq.ptq import float_graph, quantize_ptq
from fxq.targets import target_profile

RESULTS = ROOT / "benchmarks" / "results"
#: Calibration and input images of the random-weight models (the bench default).
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "coco-val2017-fixture"


def measure_table(args, folder: Path) -> dict:
    """The latency table of ``args.model`` at ``args.size`` over the candidates (32 = float)."""
    images = synthetic_root() if args.model.endswith("_tiny") else SHARED_IMAGES
    config = BenchConfig(args.model, str(images), (args.size, args.size), threads=1, rows=("ort-fp32",),
                         work_dir=str(folder), latency_bits=tuple(args.candidates), latency_policy=args.policy,
                         runs=args.runs,
                         rounds=args.rounds, calib_images=4, profile_runs=max(args.profile_runs, 3),
                         log=lambda m: print(m, flush=True))
    suite = _Suite(config)
    suite.build()
    return suite.latency()


def calibration(args) -> list:
    """Calibration / Fisher batches: synthetic training images (tiny models) or the shared COCO images."""
    if args.model.endswith("_tiny"):
        return list(loader("train", args.calib_images, args.size, batch_size=8))
    images = bench_images(SHARED_IMAGES, (args.size, args.size), args.calib_images)
    return [images[i:i + 1] for i in range(len(images))]


def allocations(fgm, calib, table, args) -> list[dict]:
    """One record per (objective, budget): the chosen bits, the predicted latency and the quantized graph."""
    analysed = copy.deepcopy(fgm)
    annotate_policy(analysed, args.policy)
    objectives = ("uniform",) if args.no_ap else ("overall", "uniform")  # random weights: no loss to weigh by
    if args.no_ap:
        weight_sensitivity(analysed, args.candidates, "uniform", allocatable_nodes(analysed))
    else:
        fisher_traces(analysed, calib, "overall", progress=False)
    problem = build_problem(copy.deepcopy(analysed), args.candidates, "latency", table, None, "uniform")
    low, high = problem.min_budget, problem.max_budget
    budgets = [low + (high - low) * i / (args.points - 1) for i in range(args.points)]
    out, profile = [], target_profile("ort-cpu")
    for objective in objectives:
        for k, budget in enumerate(budgets):
            gm = copy.deepcopy(analysed)
            info = allocate_bits(gm, args.candidates, budget, "latency", table, objective=objective).info
            quantize_annotated(gm, calib, fgm, "minmax", profile, progress=False)
            floats = sum(b == 32 for b in info["bits"].values())
            out.append({"name": f"{objective}-{k}", "objective": objective, "budget_ms": budget,
                        "predicted_ms": info["used"], "float_nodes": floats, "nodes": len(info["bits"]), "gm": gm})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deformable_detr_tiny")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--policy", default="4-4-8")
    p.add_argument("--candidates", nargs="+", type=int, default=[4, 32])
    p.add_argument("--points", type=int, default=5, help="budgets from the fastest to the slowest achievable")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--profile-runs", type=int, default=10)
    p.add_argument("--no-ap", action="store_true", help="latency only (random-weight models)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = ROOT / "runs" / "latency_allocation" / args.model
    folder.mkdir(parents=True, exist_ok=True)
    recorded = measure_table(args, folder)
    write_json(folder / "latency_table.json", recorded)
    table = load_latency_table(folder / "latency_table.json")
    fgm = float_graph(fxq.models.build(args.model), (args.size, args.size))
    calib = calibration(args)
    rows = allocations(fgm, calib, table, args)
    example = torch.zeros(1, 3, args.size, args.size)
    paths = {"fp32": folder / "fp32.onnx"}
    lower_checked(fgm, example, paths["fp32"], None, opset=17)
    uniform = quantize_ptq(fgm, calib, args.policy, progress=False, target="ort-cpu")
    paths[args.policy] = folder / "uniform.onnx"
    lower_checked(uniform, example, paths[args.policy], "ort-cpu")
    for row in rows:
        paths[row["name"]] = folder / f"{row['name']}.onnx"
        lower_checked(row.pop("gm"), example, paths[row["name"]], "ort-cpu")
    timings, _ = in_fresh_process(measure_models, paths, example, "cpu", 1, 5, args.runs, args.rounds)
    head = fxq.models.build(args.model).head
    val = None if args.no_ap else loader("val", args.val_images, args.size)
    critical = None if val is None else resolve_categories(val.dataset.dataset.ann_file, ["person"])
    val_ids = [] if val is None else [int(val.dataset.dataset.ids[i]) for i in val.dataset.indices]
    boot = {}
    table_rows = [{"name": n, "objective": "-", "budget_ms": None, "predicted_ms": None, "float_nodes": None,
                   "nodes": None} for n in ("fp32", args.policy)] + rows
    for row in table_rows:
        t = timings[row["name"]]
        row.update({"p10_ms": t.p10_ms, "median_ms": t.median_ms, "p90_ms": t.p90_ms})
        if row["predicted_ms"] is not None:
            row["error_pct"] = round(100 * (row["median_ms"] - row["predicted_ms"]) / row["predicted_ms"], 1)
        if val is not None:
            m = evaluate_model(SessionDetector(paths[row["name"]], "cpu", head), val, val.dataset.dataset.coco,
                               critical, progress=False)
            row["AP"] = m["AP"]
            boot[row["name"]] = bootstrap_metrics(val.dataset.dataset.coco, m["detections"], val_ids,
                                                  {"AP": "AP"}, critical, 200, seed=0)
        print(row, flush=True)
    for row in table_rows if val is not None else []:
        base = row["name"].replace("overall", "uniform") if row["objective"] == "overall" else None
        for column, other in (("AP vs weight-error allocation", base), ("AP vs " + args.policy, args.policy)):
            if other and other != row["name"]:
                d = compare(boot[other], boot[row["name"]])["AP"]
                row[column] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    columns = ["name", "objective", "float_nodes", "budget_ms", "predicted_ms", "median_ms", "p10_ms", "p90_ms",
               "error_pct", *([] if val is None else ["AP", "AP vs weight-error allocation", "AP vs " + args.policy])]
    shown = [{c: ("-" if r.get(c) is None else r[c]) for c in columns} for r in table_rows]
    out = RESULTS / f"latency_allocation_{args.model}.json"
    save(out, table_rows, markdown(shown, columns),
         "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_allocation.py " + " ".join(sys.argv[1:]))
    plot(table_rows, args, out.with_suffix(".png"), recorded)


def plot(rows: list[dict], args, path: Path, recorded: dict) -> None:
    """Predicted vs measured latency; AP vs measured latency (when scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = "AP" in rows[0]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(10 if scored else 5, 4), squeeze=False)
    ax = axes[0][0]
    for objective, marker in (("overall", "o"), ("uniform", "s")):
        chosen = [r for r in rows if r["objective"] == objective]
        ax.plot([r["predicted_ms"] for r in chosen], [r["median_ms"] for r in chosen], marker, label=objective)
    lo = min(r["median_ms"] for r in rows) * 0.9
    hi = max(r["median_ms"] for r in rows) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15, label="±10%")
    ax.set(xlabel="predicted ms", ylabel="measured median ms", title=f"{args.model} {args.size}²: latency")
    ax.legend(fontsize=8)
    if scored:
        ax = axes[0][1]
        for objective, marker in (("overall", "o-"), ("uniform", "s-")):
            chosen = [r for r in rows if r["objective"] == objective]
            ax.plot([r["median_ms"] for r in chosen], [r["AP"] for r in chosen], marker,
                    label=f"allocated ({'Fisher' if objective == 'overall' else 'weight error'})")
        for r in rows[:2]:
            ax.plot(r["median_ms"], r["AP"], "k^")
            ax.annotate(r["name"], (r["median_ms"], r["AP"]), fontsize=8)
        ax.set(xlabel="measured median ms", ylabel="AP", title="AP vs measured latency")
        ax.legend(fontsize=8)
    fig.suptitle(f"1 thread, {recorded['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
