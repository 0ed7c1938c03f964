"""DetPTQ with output-fitted scales against input-fitted DetPTQ and every fixed p (issue 15, deliverable 5).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detptq_output_fit.py   (≈ 25 min on one core; writes
benchmarks/results/detptq_output_fit.json)

Rows per model, at one policy (W4A4): ``lp:<p>`` for p = 1…4 (every quantizer's clip fitted on its own input,
fxq.ptq.quantize_ptq), ``detptq:input`` and ``detptq:output`` (fxq.passes.detptq with ``fit="input"`` /
``"output"``, otherwise the quantize_ptq recipe: same annotation, observers and calibration images). Calibration:
the first --calib-images training images (batches of 8); DetPTQ's p is chosen by ODOL on those images only.
Evaluation: the first --val-images validation images; each DetPTQ row is compared with the best fixed p on those
images (and output- with input-fitted DetPTQ) by a paired bootstrap over the images
(fxq.evaluation.bootstrap_metrics, shared draws). Detections are
cached per row under --cache; --reuse takes the cached rows instead of recomputing them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, loader, markdown, save

import fxq
from fxq.data import resolve_categories
from fxq.evaluation import bootstrap_metrics, compare, evaluate_model
from fxq.passes.detptq import detptq
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import assign_qspec
from fxq.passes.precision import annotated_copy
from fxq.ptq import float_graph, quantize_ptq
from fxq.quant import observer_fields

METHODS = ["lp:1", "lp:2", "lp:3", "lp:4", "detptq:input", "detptq:output"]
METRICS = {"AP": "AP", "AP50": "AP50", "critical_AP": "critical_mAP"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["detr_tiny", "deformable_detr_tiny"])
    p.add_argument("--policy", default="W4A4")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--critical", nargs="+", default=["person"], help="critical categories (names/supercategories)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--reps", type=int, default=200, help="bootstrap replicates")
    p.add_argument("--cache", default="/tmp/detptq_output_fit_cache", help="folder of per-row detections")
    p.add_argument("--reuse", action="store_true", help="take cached rows instead of recomputing them")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detptq_output_fit.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    val = loader("val", args.val_images)
    calib = list(loader("train", args.calib_images, batch_size=8))
    critical = resolve_categories(val.dataset.dataset.ann_file, args.critical)
    rows, diffs = [], []
    for model in args.models:
        results = {m: _cached_row(model, m, calib, val, critical, args) for m in args.methods}
        model_rows, model_diffs = _compare(model, results, val, critical, args.reps)
        rows += model_rows
        diffs += model_diffs
    table = markdown(rows, ["model", "method", "AP", "AP50", "critical_AP", "calib_s", "p_chosen"])
    if diffs:
        table += "\n\nPaired bootstrap over validation images (b − a):\n\n" + markdown(diffs, list(diffs[0]))
    save(Path(args.out), rows + diffs, table, "python benchmarks/detptq_output_fit.py " + " ".join(sys.argv[1:]))


def _cached_row(model: str, method: str, calib: list, val, critical: list[int], args) -> dict:
    """Detections and calibration record of one row, from the cache with --reuse, else computed (and cached)."""
    path = Path(args.cache) / f"{model}_{args.policy}_{method.replace(':', '_')}.json"
    stamp = {"calib": args.calib_images, "val": args.val_images, "policy": args.policy}
    if args.reuse and path.is_file():
        cached = json.loads(path.read_text())
        if cached["stamp"] == stamp:
            return cached
    fgm = float_graph(fxq.models.build(model))
    start = time.perf_counter()
    gm, info = _quantize(fgm, calib, args.policy, method)
    seconds = time.perf_counter() - start
    m = evaluate_model(gm, val, val.dataset.dataset.coco, critical_ids=critical, progress=False)
    result = {"stamp": stamp, "detections": m["detections"], "calib_s": round(seconds, 1), "info": info}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, separators=(",", ":")))
    print(f"{model} {method}: AP {m['AP']:.3f}, calibrated in {seconds:.0f} s", flush=True)
    return result


def _quantize(fgm, calib: list, policy: str, method: str) -> tuple[torch.nn.Module, dict]:
    """The calibrated graph of ``method`` and, for DetPTQ, its search record (ODOLs, chosen p per layer)."""
    if not method.startswith("detptq"):
        return quantize_ptq(fgm, calib, policy, method, progress=False), {}
    gm = annotated_copy(fgm, policy, None)  # quantize_ptq's steps, with the fit made explicit
    for node in gm.graph.nodes:
        spec = node.meta.get("fxq.qspec")
        if spec is not None:
            assign_qspec(node, spec.replace(**observer_fields("detptq", spec.a_symmetric)))
    insert_quantizers(gm)
    info = detptq(gm, calib, fgm, fit=method.partition(":")[2], progress=False).info
    chosen = [n.meta["fxq.detptq"]["p"] for n in gm.graph.nodes if "fxq.detptq" in n.meta]
    info["p_counts"] = {str(p): chosen.count(p) for p in sorted(set(chosen))}
    return gm, json.loads(json.dumps(info, default=float))


def _compare(model: str, results: dict, val, critical: list[int], reps: int) -> tuple[list[dict], list[dict]]:
    """The rows of one model and each DetPTQ row's paired difference against the best fixed p."""
    gt, images = val.dataset.dataset.coco, _image_ids(val)
    boot = {m: bootstrap_metrics(gt, r["detections"], images, METRICS, critical, reps, seed=0)
            for m, r in results.items()}
    rows = []
    for method, r in results.items():
        point = boot[method]["point"]
        counts = r["info"].get("p_counts")
        rows.append({"model": model, "method": method, "AP": point["AP"], "AP50": point["AP50"],
                     "critical_AP": point["critical_AP"], "calib_s": r["calib_s"],
                     "p_chosen": "-" if counts is None else " ".join(f"{p}:{c}" for p, c in counts.items()),
                     "info": r["info"]})
    fixed = [m for m in results if m.startswith("lp:")]
    if not fixed:
        return rows, []
    best = max(fixed, key=lambda m: boot[m]["point"]["AP"])
    pairs = [(best, m) for m in results if m.startswith("detptq")]
    if {"detptq:input", "detptq:output"} <= set(results):
        pairs.append(("detptq:input", "detptq:output"))
    diffs = []
    for a, b in pairs:
        d = compare(boot[a], boot[b])["AP"]
        diffs.append({"model": model, "comparison": f"{b} − {a}", "a": d["a"], "b": d["b"], "diff": d["diff"],
                      "95% interval": f"[{d['lo']:+.3f}, {d['hi']:+.3f}]", "P(diff > 0)": d["p_positive"]})
    return rows, diffs


def _image_ids(val) -> list[int]:
    """The image ids of the validation loader (a Subset of a CocoDetection), in order."""
    ds = val.dataset
    return [int(ds.dataset.ids[i]) for i in ds.indices]


if __name__ == "__main__":
    main()
