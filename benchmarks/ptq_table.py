"""PTQ accuracy table: AP and critical AP of the tiny trained models at fp32 and each policy × calibration method.

Run: .venv/bin/python benchmarks/ptq_table.py   (≈ 20 min on 2 cores; writes benchmarks/results/ptq.json)
Calibration: the first --calib-images training images; evaluation: the first --val-images validation images.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import ROOT, loader, markdown, save

import fxq
from fxq.data import resolve_categories
from fxq.evaluation import evaluate_model
from fxq.ptq import float_graph, quantize_ptq

POLICIES = ["W8A8", "W4A8", "W4A4", "4-4-8"]
METHODS = ["minmax", "percentile:99.99", "lp:1", "mse", "lp:3", "lp:4", "detptq"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["detr_tiny", "deformable_detr_tiny"])
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--critical", nargs="+", default=["person"], help="critical categories (names/supercategories)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ptq.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    val = loader("val", args.val_images)
    calib = loader("train", args.calib_images, batch_size=8)
    gt = val.dataset.dataset.coco
    critical = resolve_categories(val.dataset.dataset.ann_file, args.critical)
    rows = []
    for name in args.models:
        fgm = float_graph(fxq.models.build(name))
        rows.append(_row(name, "fp32", "-", fgm, val, gt, critical, 0.0))
        for policy in args.policies:
            for method in args.methods:
                start = time.perf_counter()
                gm = quantize_ptq(fgm, calib, policy, method, progress=False)
                rows.append(_row(name, policy, method, gm, val, gt, critical, time.perf_counter() - start))
                print(rows[-1], flush=True)
    cols = ["model", "policy", "method", "AP", "AP50", "critical_AP", "rest_AP", "calib_s"]
    save(args.out if args.out.endswith(".json") else args.out + ".json", rows, markdown(rows, cols),
         "python benchmarks/ptq_table.py " + " ".join(sys.argv[1:]))


def _row(model, policy, method, gm, val, gt, critical, seconds) -> dict:
    m = evaluate_model(gm, val, gt, critical_ids=critical, progress=False)
    return {"model": model, "policy": policy, "method": method, "AP": m["AP"], "AP50": m["AP50"],
            "critical_AP": m["critical_mAP"], "rest_AP": m["rest_mAP"], "calib_s": round(seconds, 1)}


if __name__ == "__main__":
    main()
