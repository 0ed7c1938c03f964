"""``fxq allocate MODEL --data DIR --budget B``: Fisher analysis and mixed-precision weight bit allocation.

Traces MODEL, folds batch norm, applies the uniform ``--policy`` (heads stay float), computes the Fisher traces
(or loads a saved analysis with ``--analysis``), solves the allocation MILP, prints the table, and writes the
analysis JSON (``--out``) and a plot (``--plot``).

Under ``torchrun`` the ranks share the Fisher analysis's batches (:mod:`fxq.passes.fisher_objective`) and
all end with the same traces and allocation; rank 0 alone prints and writes the files.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("allocate", help="Fisher analysis and mixed-precision weight bit allocation",
                       description="Allocate weight bit-widths to MODEL's conv/linear nodes by Fisher sensitivity "
                                   "under a budget (MILP), print the table, save the analysis.")
    p.add_argument("model", help="model name, e.g. detr_tiny")
    p.add_argument("--checkpoint", help="weights to load (default: the embedded "
                   "weights, else random weights drawn with seed 0)")
    p.add_argument("--data", help="COCO folder with ground truth for the Fisher analysis")
    p.add_argument("--split", help="split of --data (default: val2017, val or the only one)")
    p.add_argument("--analysis", help="load Fisher traces from this saved analysis instead of computing them")
    p.add_argument("--images", type=int, default=32, help="images for the Fisher analysis (default 32)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image size (shorter side) and trace size")
    p.add_argument("--policy", default="W8A8", help="uniform policy before allocation (activation bits etc.)")
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8],
                   help="weight bit-widths; 32 keeps a node float (with --budget-kind latency: 8 32)")
    p.add_argument("--budget", type=float, required=True, help="budget in --budget-kind units")
    p.add_argument("--budget-kind", default="avg_bits", choices=("avg_bits", "size_bytes", "bops", "latency"))
    p.add_argument("--latency-table", help='JSON {"node": {"bits": ms}} for --budget-kind latency')
    p.add_argument("--objective", default="overall", choices=("overall", "critical", "combined"))
    p.add_argument("--critical", nargs="+", metavar="NAME", help="critical categories (names, ids, supercategories)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_A in the combined objective")
    p.add_argument("--method", default="empirical", choices=("empirical", "hutchinson"))
    p.add_argument("--per-sample", action="store_true", help="empirical Fisher per image instead of per batch")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch")
    p.add_argument("--seed", type=int, default=0, help="Hutchinson probe seed")
    p.add_argument("--tie-qkv", action="store_true", help="q/k/v projections of one attention share a bit-width")
    p.add_argument("--out", help="write the analysis (Fisher, sensitivities, chosen QSpecs) as JSON here")
    p.add_argument("--plot", help="write a PNG of Fisher traces and chosen bits here")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _loader(args: argparse.Namespace):
    import torch

    from fxq.cli.train import verify_images
    from fxq.data import CocoDetection, collate, eval_transforms

    dataset = CocoDetection.from_folder(args.data, args.split, transforms=eval_transforms(args.size))
    verify_images(dataset, args.split or "default", skip=False)
    subset = torch.utils.data.Subset(dataset, range(min(args.images, len(dataset))))
    return torch.utils.data.DataLoader(subset, batch_size=args.batch_size, collate_fn=collate), dataset


def _analyse(gm, args: argparse.Namespace) -> None:
    from fxq.data import resolve_categories
    from fxq.errors import InputError
    from fxq.passes.fisher import fisher_traces, load_analysis
    from fxq.passes.hutchinson import hutchinson_traces

    if args.analysis:
        load_analysis(gm, args.analysis)
        return
    if not args.data:
        raise InputError("give --data (a COCO folder with ground truth) for the Fisher analysis, or --analysis FILE")
    loader, dataset = _loader(args)
    critical = resolve_categories(dataset.ann_file, args.critical) if args.critical else None
    common = dict(objective=args.objective, critical_ids=critical, alpha=args.alpha, progress=not args.no_progress)
    if args.method == "hutchinson":
        hutchinson_traces(gm, loader, num_probes=args.probes, seed=args.seed, **common)
    else:
        fisher_traces(gm, loader, per_sample=args.per_sample, **common)


def _check_args(args: argparse.Namespace) -> None:
    """Every option in range, consistent and every path usable, before the model is built."""
    from fxq.cli.checks import (
        check_at_least,
        check_budget,
        check_checkpoint,
        check_input_file,
        check_input_folder,
        check_output_file,
        check_size,
    )
    from fxq.errors import InputError

    check_size(args.size)
    check_at_least(args, {"images": 1, "batch_size": 1, "probes": 1, "threads": 1, "alpha": 0.0, "seed": 0})
    check_budget(args)
    if args.objective in ("critical", "combined") and not args.critical and not args.analysis:
        raise InputError(f"--objective {args.objective} needs --critical NAME ...: the categories whose loss "
                         "L_F the Fisher analysis measures")
    check_input_file(args.latency_table, "--latency-table")
    check_input_file(args.analysis, "--analysis")
    check_checkpoint(args.checkpoint)
    check_input_folder(args.data, "--data")
    check_output_file(args.out, "--out")
    check_output_file(args.plot, "--plot")


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.models import build
    from fxq.passes.allocate import allocate_bits
    from fxq.passes.analysis_io import save_analysis
    from fxq.passes.policy import annotate_policy
    from fxq.passes.report import allocation_table, plot_allocation
    from fxq.passes.tie_groups import attention_groups
    from fxq.ptq import float_graph
    from fxq.train.distributed import init_distributed

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    main = init_distributed().is_main
    gm = float_graph(build(args.model, checkpoint=args.checkpoint, seed=0), (args.size, args.size))
    annotate_policy(gm, args.policy)
    _analyse(gm, args)
    ties = attention_groups(gm) if args.tie_qkv else None
    info = allocate_bits(gm, args.candidates, args.budget, args.budget_kind, args.latency_table, ties,
                         args.objective).info
    if not main:
        return 0
    print(allocation_table(gm))
    print(f"bits histogram {info['histogram']}, MILP {info['solve_s']:.3f} s")
    if args.out:
        save_analysis(gm, args.out)
        print(f"analysis written to {args.out}")
    if args.plot:
        plot_allocation(gm, args.plot, title=f"{args.model}: Fisher ({args.objective}) and bits")
        print(f"plot written to {args.plot}")
    return 0
