"""Mixed-precision allocations from L_A, L_F and the critical-box variant (issue 15, deliverable 3).

For each tiny trained model, per-node Fisher statistics of three objectives come from one pass of
:func:`category_fisher.multi_fisher` over the calibration images (policy annotation W4A8, batches of 8):

- ``overall``: L_A, the DETR set loss (equal to ``fisher_traces(objective="overall")`` to 1e-7);
- ``critical``: L_F, FQ-DETR's critical-category loss for C = the --supercategory (``fisher_traces(objective=
  "critical")``'s trace);
- ``variant``: L_F's class term + box terms (L1 + GIoU) on the matched pairs whose ground truth is critical only
  (``category_fisher``'s ``variant`` = ce + box_crit).

Each ‖g‖² statistic is divided by numel(W_l), as ``fisher_traces`` does, and written into ``fxq.fisher``
under its objective name; :func:`fxq.passes.allocate.allocate_bits` then chooses every quantized weight's
bits for each --settings entry CANDS@BUDGET (candidates, average weight bits weighted by element count).
Activations 8 bits, min-max PTQ calibration on the same images: the settings of
benchmarks/mixed_precision_table.py. Each distinct allocation is evaluated on the first --val-images val
images (AP, and critical AP = mean per-category AP over the supercategory's categories); the differences
(critical − overall) and (variant − overall) get a paired bootstrap over the images. The overall and
critical traces are checked against ``fisher_traces`` on the same images (``check`` in the JSON: the largest
absolute difference of s_l over the layers, divided by the largest s_l).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/critical_allocation.py
and on the 64-category set (issue 15, deliverable 4):
     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/critical_allocation.py --models deformable_detr_tiny_fine64 \
         --data runs/synth64 --out benchmarks/results/critical_allocation_fine64.json
Deterministic (ordered loaders, per-batch Fisher, fixed bootstrap seed).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from category_fisher import multi_fisher
from common import ROOT, loader
from scipy.stats import spearmanr

import fxq
from fxq.data import resolve_categories
from fxq.evaluation import bootstrap_metrics, category_mean, compare, evaluate_model
from fxq.io import write_json
from fxq.passes import annotate_policy, calibrate, insert_quantizers
from fxq.passes.allocate import allocate_bits
from fxq.passes.fisher import fisher_traces, record_fisher
from fxq.ptq import float_graph

OBJECTIVES = ("overall", "critical", "variant")
#: multi_fisher statistic per objective: (problem key, stat); "crit" is the critical set's key.
SOURCE = {"overall": ("overall", "total"), "critical": ("crit", "total"), "variant": ("crit", "variant")}


def write_traces(gm, fis: dict) -> dict[str, np.ndarray]:
    """Write fxq.fisher {overall, critical, variant} (‖g‖² / numel) on every analysed node; return the s_l of the
    quantized nodes per objective."""
    nodes = {n.name: n for n in gm.graph.nodes}
    s = {o: np.array(fis["traces"][k][stat]) / np.array(fis["numel"]) for o, (k, stat) in SOURCE.items()}
    for i, name in enumerate(fis["nodes"]):
        record_fisher(nodes[name], {"overall": float(s["overall"][i]), "critical": float(s["critical"][i]),
                                    "alpha": 1.0, "samples": fis["images"], "batches": fis["batches"],
                                    "method": "empirical", "per_sample": False})
        nodes[name].meta["fxq.fisher"]["variant"] = float(s["variant"][i])  # read by fisher_value like the others
    q = np.array(fis["quantized"])
    return {o: v[q] for o, v in s.items()}


def allocations(analysed, candidates, budget) -> dict[str, dict]:
    out = {}
    for objective in OBJECTIVES:
        gm = copy.deepcopy(analysed)
        info = allocate_bits(gm, candidates, budget, "avg_bits", objective=objective).info
        out[objective] = {"gm": gm, "bits": info["bits"], "used": info["used"], "histogram": info["histogram"]}
    return out


def differing(allocs: dict) -> dict[str, dict]:
    out = {}
    for a, b in combinations(OBJECTIVES, 2):
        ba, bb = allocs[a]["bits"], allocs[b]["bits"]
        diff = sorted(n for n in ba if ba[n] != bb[n])
        out[f"{a} vs {b}"] = {"layers": len(diff), "of": len(ba),
                              "changes": {n: [ba[n], bb[n]] for n in diff}}
    return out


def run_model(name, args, val, calib, gt, crit_ids, crit_names, images, log) -> dict:
    start = time.perf_counter()
    fgm = float_graph(fxq.models.build(name))
    analysed = copy.deepcopy(fgm)
    annotate_policy(analysed, "W4A8")
    fis = multi_fisher(analysed, calib, {"crit": crit_ids}, analysed.num_classes, log=lambda *a, **k: None)
    s = write_traces(analysed, fis)
    rho = {f"{a} vs {b}": float(spearmanr(s[a], s[b])[0]) for a, b in combinations(OBJECTIVES, 2)}
    check = {}
    for objective in ("overall", "critical"):
        ref = copy.deepcopy(fgm)
        annotate_policy(ref, "W4A8")
        fisher_traces(ref, calib, objective, critical_ids=crit_ids if objective == "critical" else None,
                      progress=False)
        mine = {n.name: n.meta["fxq.fisher"][objective] for n in analysed.graph.nodes if "fxq.fisher" in n.meta}
        theirs = {n.name: n.meta["fxq.fisher"][objective] for n in ref.graph.nodes if "fxq.fisher" in n.meta}
        # relative to the largest s_l: a few layers have s_l ~ 1e-22 (gradient ~ 0), where only noise differs
        check[objective] = max(abs(mine[n] - theirs[n]) for n in theirs) / max(abs(v) for v in theirs.values())
    log(f"{name}: Fisher {fis['images']} images, {int(np.sum(fis['quantized']))} quantized layers "
        f"({time.perf_counter() - start:.0f} s); layer Spearman {rho}")
    log(f"  max |difference| to fisher_traces / max s_l: {check}")
    result = {"fisher_seconds": round(time.perf_counter() - start, 1), "layer_spearman": rho, "check": check,
              "quantized_layers": int(np.sum(fis["quantized"])), "settings": {}}
    metrics = {"AP": "AP", "crit AP": category_mean(crit_names)}
    for cands, budget in args.settings:
        evaluate = True
        key = f"{','.join(map(str, cands))}@{budget}"
        allocs = allocations(analysed, cands, budget)
        diffs = differing(allocs)
        entry = {"candidates": cands, "budget": budget, "evaluated": evaluate, "differ": diffs,
                 "used": {o: allocs[o]["used"] for o in OBJECTIVES},
                 "histogram": {o: allocs[o]["histogram"] for o in OBJECTIVES},
                 "bits": {o: allocs[o]["bits"] for o in OBJECTIVES}}
        log(f"{name} {key}: differing layers " + ", ".join(f"{k}: {v['layers']}/{v['of']}" for k, v in diffs.items()))
        if evaluate:
            done: dict[tuple, dict] = {}  # identical allocations are evaluated once
            runs = {}
            for objective in OBJECTIVES:
                sig = tuple(sorted(allocs[objective]["bits"].items()))
                if sig in done:
                    runs[objective] = {**done[sig], "same_as": done[sig]["objective"]}
                    continue
                t0 = time.perf_counter()
                gm = allocs[objective]["gm"]
                insert_quantizers(gm)
                calibrate(gm, calib, progress=False)
                m = evaluate_model(gm, val, gt, progress=False)
                boot = bootstrap_metrics(gt, m["detections"], images, metrics, reps=args.boot_reps, seed=args.seed)
                runs[objective] = done[sig] = {"objective": objective, "AP": boot["point"]["AP"],
                                               "crit AP": boot["point"]["crit AP"], "boot": boot}
                log(f"  {name} {key} {objective}: AP {m['AP']:.4f} crit AP {boot['point']['crit AP']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            entry["runs"] = {o: {k: v for k, v in r.items() if k != "boot"} for o, r in runs.items()}
            entry["paired"] = {}
            for other in ("critical", "variant"):
                if runs[other]["objective"] == runs["overall"]["objective"]:
                    entry["paired"][f"{other} - overall"] = "identical allocation"
                else:
                    entry["paired"][f"{other} - overall"] = compare(runs["overall"]["boot"], runs[other]["boot"])
        result["settings"][key] = entry
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _ci(c: dict) -> str:
    return f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def tables(result: dict) -> str:
    alloc_rows, ap_rows = [], []
    for name, res in result["models"].items():
        for key, e in res["settings"].items():
            d = e["differ"]
            alloc_rows.append(f"| {name} | {key} | {res['quantized_layers']} | "
                              + " | ".join(f"{d[k]['layers']}" for k in d) + " | "
                              + " / ".join(f"{e['used'][o]:.3f}" for o in OBJECTIVES) + " |")
            if not e["evaluated"]:
                continue
            for o in OBJECTIVES:
                r = e["runs"][o]
                same = f" (= {r['same_as']})" if "same_as" in r else ""
                if o == "overall":
                    dap = dcrit = "-"
                else:
                    p = e["paired"][f"{o} - overall"]
                    dap = dcrit = "identical allocation" if isinstance(p, str) else None
                    if dap is None:
                        dap, dcrit = _ci(p["AP"]), _ci(p["crit AP"])
                ap_rows.append(f"| {name} | {key} | {o}{same} | {e['used'][o]:.3f} | {r['AP']:.4f} | "
                               f"{r['crit AP']:.4f} | {dap} | {dcrit} |")
    head1 = ("| model | candidates@avg bits | quantized layers | layers differing: overall vs critical | "
             "overall vs variant | critical vs variant | avg bits used (overall / critical / variant) |\n"
             "|---|---|---|---|---|---|---|")
    head2 = ("| model | candidates@avg bits | objective | avg_w_bits | AP | crit AP (person) | "
             "Δ AP vs overall [95% CI] | Δ crit AP vs overall [95% CI] |\n|---|---|---|---|---|---|---|---|")
    rho = ["| model | " + " | ".join(f"Spearman s_l {k}" for k in next(iter(result["models"].values()))
                                     ["layer_spearman"]) + " |", "|---|---|---|---|"]
    rho += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in r["layer_spearman"].values()) + " |"
            for n, r in result["models"].items()]
    return "\n".join([head1, *alloc_rows]) + "\n\n" + "\n".join([head2, *ap_rows]) + "\n\n" + "\n".join(rho)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["detr_tiny", "deformable_detr_tiny"])
    p.add_argument("--settings", nargs="+", default=["3,4,5,6,8@4.5", "3,4,5,6,8@5.0", "2,4,8@4.0"],
                   help="CANDS@BUDGET: weight-bit candidates and average weight bits of each allocation")
    p.add_argument("--supercategory", default="person")
    p.add_argument("--calib-images", type=int, default=64, help="calibration and Fisher images (train)")
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--boot-reps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="a synthetic set's folder (default runs/synth)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "critical_allocation.json"))
    args = p.parse_args()
    args.settings = [([int(c) for c in s.split("@")[0].split(",")], float(s.split("@")[1])) for s in args.settings]
    torch.manual_seed(args.seed)
    val = loader("val", args.val_images, root=args.data)
    calib = loader("train", args.calib_images, batch_size=8, root=args.data)
    gt = val.dataset.dataset.coco
    crit_ids = resolve_categories(val.dataset.dataset.ann_file, [args.supercategory])
    crit_names = [gt.cats[c]["name"] for c in crit_ids]
    images = sorted(int(i) for i in gt.getImgIds())[: args.val_images]

    def log(msg: str) -> None:
        print(msg, flush=True)

    command = "OMP_NUM_THREADS=1 python benchmarks/critical_allocation.py " + " ".join(sys.argv[1:])
    result = {"command": command, "torch": torch.__version__,
              "args": {**vars(args), "data": None if args.data is None else str(args.data)},
              "critical": {"supercategory": args.supercategory, "ids": crit_ids, "names": crit_names},
              "models": {}}
    for name in args.models:
        result["models"][name] = run_model(name, args, val, calib, gt, crit_ids, crit_names, images, log)
        write_json(Path(args.out), result)  # after each model, so a partial run leaves its results
    text = tables(result)
    write_json(Path(args.out), result | {"tables": text})
    print(f"\n`{command}`\n\n{text}\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
