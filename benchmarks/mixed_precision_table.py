"""Mixed precision at equal average weight bits: Uniform vs Fisher-Overall vs Fisher-Critical (FQ-DETR's table).

For each tiny trained model: the bit-width of every conv/linear weight is chosen by the MILP among --candidates
at an average of 4.5 and 5.0 bits (activations 8 bits, min-max PTQ calibration), minimising Σ s_l·‖Q_b(W)−W‖²
with s_l = 1 ("uniform": plain weight error), the Fisher trace of the DETR loss ("fisher_overall") or of the
critical-category loss ("fisher_critical"). Critical sets: (a) the --hurt categories whose AP drops most under
uniform W4A8 (as the FQ-DETR paper picks them), (b) one supercategory (--supercategory).

Run: .venv/bin/python benchmarks/mixed_precision_table.py   (writes benchmarks/results/mixed_precision.json)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from common import ROOT, loader, markdown, save

import fxq
from fxq.data import resolve_categories
from fxq.evaluation import evaluate_model
from fxq.passes import annotate_policy, calibrate, insert_quantizers
from fxq.passes.allocate import allocate_bits
from fxq.passes.fisher import fisher_traces
from fxq.ptq import float_graph, quantize_ptq


def _per_category(gm, val, gt) -> dict[int, float]:
    metrics = evaluate_model(gm, val, gt, progress=False)
    return {row["id"]: row["AP"] for row in metrics["categories"]} | {"AP": metrics["AP"]}


def _mean(ap: dict, ids: list[int]) -> float:
    values = [ap[i] for i in ids if ap[i] >= 0]
    return sum(values) / len(values)


def _allocated(analysed, calib, candidates, budget: float, objective: str):
    gm = copy.deepcopy(analysed)
    info = allocate_bits(gm, candidates, budget, "avg_bits", objective=objective).info
    insert_quantizers(gm)
    calibrate(gm, calib, progress=False)
    return gm, info["used"]


def run_model(name: str, args, val, calib, gt, critical_sets) -> list[dict]:
    fgm = float_graph(fxq.models.build(name))
    fp = _per_category(fgm, val, gt)
    w4 = _per_category(quantize_ptq(fgm, calib, "W4A8", progress=False), val, gt)
    hurt = sorted((i for i in fp if i != "AP" and fp[i] >= 0), key=lambda i: w4[i] - fp[i])[: args.hurt]
    sets = {"most hurt by W4A8": hurt, **critical_sets}
    analysed = copy.deepcopy(fgm)
    annotate_policy(analysed, "W4A8")
    rows = [_row(name, "fp32", "-", 32.0, fp, sets), _row(name, "uniform W4A8", "-", 4.0, w4, sets)]
    fisher_traces(analysed, calib, "overall", progress=False)
    for budget in args.budgets:
        for objective in ("uniform", "overall"):
            gm, used = _allocated(analysed, calib, args.candidates, budget, objective)
            label = "uniform" if objective == "uniform" else "fisher_overall"
            rows.append(_row(name, label, "-", used, _per_category(gm, val, gt), sets))
    for set_name, ids in sets.items():
        critical = copy.deepcopy(analysed)
        fisher_traces(critical, calib, "critical", critical_ids=ids, progress=False)
        for budget in args.budgets:
            gm, used = _allocated(critical, calib, args.candidates, budget, "critical")
            rows.append(_row(name, "fisher_critical", set_name, used, _per_category(gm, val, gt), sets))
    return rows


def _row(model, method, critical_for, bits, ap, sets) -> dict:
    row = {"model": model, "method": method, "critical set used": critical_for, "avg_w_bits": round(bits, 3),
           "AP": ap["AP"]}
    for set_name, ids in sets.items():
        row[f"crit AP ({set_name})"] = _mean(ap, ids)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["detr_tiny", "deformable_detr_tiny"])
    p.add_argument("--budgets", nargs="+", type=float, default=[4.5, 5.0])
    p.add_argument("--candidates", nargs="+", type=int, default=[3, 4, 5, 6, 8])
    p.add_argument("--supercategory", default="person")
    p.add_argument("--hurt", type=int, default=5, help="size of the most-hurt critical set")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_precision.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    val, calib = loader("val", args.val_images), loader("train", args.calib_images, batch_size=8)
    gt = val.dataset.dataset.coco
    supercat = {f"supercategory {args.supercategory}":
                resolve_categories(val.dataset.dataset.ann_file, [args.supercategory])}
    rows = []
    for name in args.models:
        rows += run_model(name, args, val, calib, gt, supercat)
        print(rows[-1], flush=True)
    cols = list(rows[0])
    save(args.out, rows, markdown(rows, cols), "python benchmarks/mixed_precision_table.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
