"""``fxq data``: data-set tools (``fxq data synth`` writes the synthetic shapes set)."""

from __future__ import annotations

import argparse
import time

from fxq.data.synth import VARIANTS, variant_classes, write_synthetic


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its actions to the fxq command line."""
    parser = subparsers.add_parser(
        "data", help="data-set tools (synthetic set)", description="Data-set tools."
    )
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        help="write the synthetic COCO-format shapes set",
        description="Write a deterministic COCO-format detection set of coloured shapes: "
        "OUT/annotations/instances_{train,val}.json and OUT/{train,val}/*.png. "
        "The same seed gives identical files.",
    )
    synth.add_argument(
        "--out", required=True, help="output folder (must be absent or empty unless --overwrite)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--train", type=int, default=1000, help="number of training images (default 1000)")
    synth.add_argument("--val", type=int, default=200, help="number of validation images (default 200)")
    synth.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    synth.add_argument("--max-objects", type=int, default=6, help="most objects per image (default 6)")
    synth.add_argument("--variant", choices=sorted(VARIANTS), default="shapes24",
                       help="category set: shapes24 (24 categories, default) or fine64 (64 categories: 8 colours "
                       "x 8 shapes, fine-grained siblings everywhere)")
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``fxq data ACTION``."""
    if args.data_command == "synth":
        return _synth(args)
    raise AssertionError(f"unhandled data action {args.data_command!r}")


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fxq.train.run_folder import check_output_folder

    check_output_folder(Path(args.out), "--out")
    start = time.perf_counter()
    files = write_synthetic(
        args.out,
        seed=args.seed,
        train=args.train,
        val=args.val,
        size=args.size,
        max_objects=args.max_objects,
        overwrite=args.overwrite,
        variant=args.variant,
    )
    seconds = time.perf_counter() - start
    classes = variant_classes(args.variant)
    supercats = sorted({c.supercategory for c in classes})
    print(
        f"wrote {args.train} train + {args.val} val images ({args.size} px, seed {args.seed}) to {args.out} "
        f"in {seconds:.1f} s"
    )
    print(f"{len(classes)} categories in {len(supercats)} supercategories: {', '.join(supercats)}")
    for split, path in files.items():
        print(f"  {split}: {path}")
    return 0
