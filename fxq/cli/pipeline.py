"""``fxq pipeline``: the whole flow on one model — data, float accuracy, PTQ, accuracy of the quantized graph.

Defaults run in about a minute on 2 cores: the embedded tiny Deformable DETR, a fresh synthetic set (seed 1, so images
the model never saw), W8A8 with min-max calibration. Writes ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="synthetic data → float eval → PTQ → quantized eval, in one command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deformable_detr_tiny", help="model (default: embedded deformable_detr_tiny)")
    p.add_argument("--checkpoint", help="weights for --model (default: fxq's embedded weights)")
    p.add_argument("--data", help="COCO folder with train (calibration) and val splits (default: a new synthetic one)")
    p.add_argument("--policy", default="W8A8", help='precision policy: W8A8, W4A8, W4A4, "4-4-8", ...')
    p.add_argument("--method", default="minmax", help="calibration: minmax, percentile:99.99, mse, lp:<p>, detptq")
    p.add_argument("--critical", nargs="+", default=["person"], help="critical categories (names/ids/supercategories)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--out", default="runs/pipeline", help="output folder")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def _data(args: argparse.Namespace) -> Path:
    from fxq.data import write_synthetic

    if args.data:
        return Path(args.data)
    root = Path(args.out) / "data"
    if not (root / "annotations" / "instances_val.json").is_file():
        write_synthetic(root, seed=args.seed, train=args.calib_images, val=args.val_images, size=args.size,
                        overwrite=True)
    return root


def _loader(root: Path, split: str, images: int, size: int, batch_size: int):
    from torch.utils.data import DataLoader, Subset

    from fxq.data import CocoDetection, collate, eval_transforms

    ds = CocoDetection.from_folder(root, split, transforms=eval_transforms(size))
    return DataLoader(Subset(ds, range(min(images, len(ds)))), batch_size=batch_size, collate_fn=collate), ds


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.data import resolve_categories
    from fxq.io import write_json
    from fxq.models import build
    from fxq.ptq import float_graph, quantize_ptq
    from fxq.quant import parse_method, parse_policy

    parse_policy(args.policy)
    if args.method != "detptq":
        parse_method(args.method)
    torch.manual_seed(args.seed)
    model = build(args.model, checkpoint=args.checkpoint)
    root = _data(args)
    val, val_ds = _loader(root, "val", args.val_images, args.size, 16)
    calib, _ = _loader(root, "train", args.calib_images, args.size, 8)
    critical = resolve_categories(val_ds.ann_file, args.critical)
    rows = []
    fgm = float_graph(model, (args.size, args.size))
    rows.append(_evaluate("fp32 (FX graph)", fgm, val, val_ds, critical, 0.0))
    start = time.perf_counter()
    qgm = quantize_ptq(fgm, calib, args.policy, args.method, progress=False)
    rows.append(_evaluate(f"{args.policy} {args.method}", qgm, val, val_ds, critical, time.perf_counter() - start))
    print(f"{args.model} on {args.val_images} images of {root} (critical: {', '.join(args.critical)})")
    print(f"{'graph':<28}{'AP':>8}{'AP50':>8}{'crit AP':>9}{'rest AP':>9}{'time s':>8}")
    for r in rows:
        print(f"{r['graph']:<28}{r['AP']:>8.3f}{r['AP50']:>8.3f}{r['critical_AP']:>9.3f}{r['rest_AP']:>9.3f}"
              f"{r['seconds']:>8.1f}")
    write_json(Path(args.out) / "summary.json", {"model": args.model, "policy": args.policy,
                                                  "method": args.method, "rows": rows})
    return 0


def _evaluate(label, gm, loader, ds, critical, seconds) -> dict:
    from fxq.evaluation import evaluate_model

    m = evaluate_model(gm, loader, ds.coco, critical_ids=critical, progress=False)
    return {"graph": label, "AP": m["AP"], "AP50": m["AP50"], "critical_AP": m["critical_mAP"] or 0.0,
            "rest_AP": m["rest_mAP"] or 0.0, "seconds": round(seconds, 1)}
