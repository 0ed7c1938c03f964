"""``fxq eval``: COCO box AP of a predictions file or a model, per category and critical set vs the rest."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fxq.data.categories import resolve_categories
from fxq.data.coco import find_split
from fxq.errors import InputError
from fxq.evaluation.coco_eval import evaluate, evaluate_model
from fxq.io import write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the fxq command line."""
    parser = subparsers.add_parser(
        "eval",
        help="COCO box AP of predictions or a model",
        description="COCO box AP of a predictions file or of a model: per category, and critical categories "
        "vs the rest. Prints a table; --out writes the metrics as JSON (values in [0, 1]).",
    )
    source = parser.add_argument_group("ground truth (--data [--split] or --ann [--images])")
    source.add_argument("--data", help="COCO folder: annotations/instances_<split>.json + <split>/ images")
    source.add_argument("--split", help="split of --data (default: val2017, val or the only one there)")
    source.add_argument("--ann", help="instances JSON (instead of --data)")
    source.add_argument("--images", help="image folder for --ann (needed with --model)")
    preds = parser.add_mutually_exclusive_group(required=True)
    preds.add_argument("--predictions", help="COCO results JSON to score")
    preds.add_argument("--model", help="model name for fxq.models.build, run over the images")
    preds.add_argument("--qat", metavar="RUN", help="a finished `fxq qat` run folder: its quantized student, run "
                       "over the images at the size it was trained at")
    parser.add_argument("--checkpoint", help="checkpoint for --model (default: the embedded "
                        "weights, else random weights drawn with seed 0)")
    parser.add_argument(
        "--critical", nargs="+", metavar="NAME", help="critical categories: names, ids or supercategories"
    )
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument(
        "--size", type=int, default=800, help="--model input: shorter image side (default 800)"
    )
    parser.add_argument("--max-size", type=int, help="--model input: longer side cap (default size*1333/800)")
    parser.add_argument("--batch-size", type=int, default=2, help="--model batch size (default 2)")
    parser.add_argument(
        "--top-k", type=int, default=100, help="detections per image, sigmoid heads (default 100)"
    )
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="--model/--qat: leave out images that cannot be decoded (reports how many)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table and write ``--out``."""
    ann_file, image_dir = _ground_truth(args)
    _check_args(args, image_dir)
    critical = resolve_categories(ann_file, args.critical) if args.critical else None
    if args.predictions:
        metrics = evaluate(ann_file, args.predictions, critical)
    else:
        metrics = _evaluate_model(args, ann_file, image_dir, critical)
    print(format_table(metrics))
    if args.out:
        record = {
            "ann_file": str(ann_file),
            "predictions": args.predictions,
            "model": args.model,
            "qat": args.qat,
            "checkpoint": args.checkpoint,
            "critical": args.critical,
            **metrics,
        }
        write_json(args.out, record)
        print(f"metrics written to {args.out}")
    return 0


def _ground_truth(args: argparse.Namespace) -> tuple[Path, Path | None]:
    if bool(args.data) == bool(args.ann):
        raise InputError(
            "give the ground truth as either --data DIR [--split S] or --ann FILE [--images DIR]"
        )
    if args.data:
        return find_split(args.data, args.split)
    if args.split:
        raise InputError("--split goes with --data; with --ann pass the split's --images folder")
    return Path(args.ann), Path(args.images) if args.images else None


def _check_args(args: argparse.Namespace, image_dir: Path | None) -> None:
    from fxq.cli.checks import check_at_least, check_checkpoint, check_input_file, check_output_file, check_size

    check_at_least(args, {"batch_size": 1, "top_k": 1})
    check_size(args.size)
    check_size(args.max_size, "--max-size")
    if args.max_size is not None and args.max_size < args.size:
        raise InputError(f"--max-size {args.max_size} is below --size {args.size}: the longer side cannot be "
                         "shorter than the shorter one; raise --max-size or drop it")
    check_input_file(args.predictions, "--predictions")
    check_checkpoint(args.checkpoint)
    check_output_file(args.out, "--out", create_folder=False)
    if args.checkpoint and not args.model:
        raise InputError("--checkpoint goes with --model")
    if (args.model or args.qat) and (image_dir is None or not image_dir.is_dir()):
        raise InputError(f"--model/--qat need the images: pass --data or --images (got {image_dir})")
    if args.checkpoint and args.qat:
        raise InputError("--checkpoint goes with --model; a --qat run holds its own weights")


def _evaluate_model(
    args: argparse.Namespace, ann_file: Path, image_dir: Path, critical: list[int] | None
) -> dict:
    import torch

    from fxq.cli.train import verify_images
    from fxq.data.coco import CocoDetection
    from fxq.data.collate import collate
    from fxq.data.transforms import eval_transforms

    try:
        from fxq.models import build
    except ImportError as exc:
        raise InputError(f"fxq.models.build is not available ({exc}): use --predictions instead") from exc
    if args.qat:
        from fxq.qat import load_run

        recipe, model = load_run(args.qat)
        dataset = CocoDetection(image_dir, ann_file, transforms=eval_transforms(recipe.size))
    else:
        dataset = CocoDetection(image_dir, ann_file, transforms=eval_transforms(args.size, args.max_size))
        model = build(args.model, checkpoint=args.checkpoint, seed=0)
    verify_images(dataset, args.split or ann_file.stem.removeprefix("instances_"), args.skip_bad_images)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate
    )
    metrics = evaluate_model(
        model, loader, dataset.coco, critical, progress=not args.no_progress, top_k=args.top_k
    )
    metrics.pop("detections", None)
    return metrics


def format_table(metrics: dict) -> str:
    """Per-category AP (categories with ground truth), the COCO summary and critical vs rest, in percent."""
    rows = [r for r in metrics["categories"] if r["num_gt"] > 0]
    width = max([len("category")] + [len(r["name"]) for r in rows])
    lines = [f"{'category':<{width}}  {'supercategory':<14} crit  {'#gt':>5}  {'AP%':>6}"]
    for r in rows:
        mark = "*" if r["critical"] else ""
        lines.append(
            f"{r['name']:<{width}}  {r['supercategory']:<14} {mark:^4}  {r['num_gt']:>5}  {_pct(r['AP'])}"
        )
    skipped = len(metrics["no_gt_categories"])
    if skipped:
        lines.append(f"({skipped} categories without ground truth in these images are left out)")
    lines.append(
        "  ".join(f"{k} {_pct(metrics[k]).strip()}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    )
    if metrics["critical_ids"] is not None:
        n_crit = sum(1 for r in rows if r["critical"])
        lines.append(
            f"critical mAP {_pct(metrics['critical_mAP']).strip()} ({_count(n_crit)})   "
            f"rest mAP {_pct(metrics['rest_mAP']).strip()} ({_count(len(rows) - n_crit)})"
        )
    lines.append(f"{metrics['num_images']} images, {metrics['num_detections']} detections")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n} category" if n == 1 else f"{n} categories"


def _pct(value: float | None) -> str:
    if value is None or value < 0 or math.isnan(value):
        return f"{'n/a':>6}"
    return f"{100 * value:6.1f}"
