"""``fxq pipeline``: the whole flow on one model — data, float accuracy, PTQ (a uniform policy or an allocation),
accuracy of the quantized graph, runtime-aware ONNX export, onnxruntime parity and accuracy, latency, report.

Defaults run in about a minute on 2 cores: the embedded tiny Deformable DETR, a fresh synthetic set (seed 1, so images
the model never saw), W8A8 with min-max calibration, prepared for ORT CPU. Options come from the flags, else from a
--recipe YAML file, else from the defaults (--print-recipe prints the recipe the arguments give). Writes one file per
stage into OUT: recipe.yaml (the effective options), environment.json (command, versions, machine), model.json,
eval_fp32.json, eval_quant.json (per-category AP), model_fp32.onnx, model_quant.onnx, export.json, parity.json,
latency.json (unless --latency-runs 0), summary.json, and last report.html (`fxq report OUT` rebuilds it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fxq.cli.recipe import Given

if TYPE_CHECKING:
    import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="synthetic data → float eval → PTQ → quantized eval → report, in one command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_options(p)
    p.add_argument("--recipe", metavar="R.yaml", help="YAML file of the options above (flags given here override "
                   "it; its paths are relative to the current folder, as on the command line)")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the recipe these arguments give (the defaults, when alone) as YAML and exit")
    p.set_defaults(func=run)


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The options a recipe holds; their defaults here are the recipe's defaults."""
    p.add_argument("--model", action=Given, default="deformable_detr_tiny",
                   help="model (default: embedded deformable_detr_tiny)")
    p.add_argument("--checkpoint", action=Given, help="weights for --model (default: fxq's embedded weights)")
    p.add_argument("--data", action=Given,
                   help="COCO folder with train (calibration) and val splits (default: a new synthetic one)")
    p.add_argument("--policy", action=Given, default="W8A8", help='precision policy: W8A8, W4A8, W4A4, "4-4-8", ...')
    p.add_argument("--allocation", action=Given, metavar="A.json",
                   help="per-node precision from `fxq allocate MODEL --out A.json` instead of the policy (made for "
                        "--model at --size)")
    p.add_argument("--method", action=Given, default="minmax",
                   help="calibration: minmax, percentile:99.99, mse, lp:<p>, detptq")
    p.add_argument("--critical", action=Given, nargs="+", default=["person"],
                   help="critical categories (names/ids/supercategories)")
    p.add_argument("--calib-images", action=Given, type=int, default=32, help="calibration images (train split)")
    p.add_argument("--val-images", action=Given, type=int, default=100, help="evaluation images (val split)")
    p.add_argument("--size", action=Given, type=int, default=160, help="input side in pixels")
    p.add_argument("--runtime", action=Given, default="ort-cpu",
                   help="runtime the quantized ONNX file is prepared for (ort-cpu; none: plain QDQ)")
    p.add_argument("--latency-runs", action=Given, type=int, default=20,
                   help="timed runs of each ONNX file, interleaved (0: no latency stage)")
    p.add_argument("--threads", action=Given, type=int, default=None,
                   help="onnxruntime intra-op threads for parity and latency (default: onnxruntime's)")
    p.add_argument("--out", action=Given, default="runs/pipeline", help="output folder")
    p.add_argument("--seed", action=Given, type=int, default=1, help="seed of the synthetic set and of torch")


def recipe_options() -> dict[str, argparse.Action]:
    """{key: argparse action} of the pipeline's recipe options, in order."""
    from fxq.cli.recipe import recipe_options as options_of

    parser = argparse.ArgumentParser(add_help=False)
    _add_recipe_options(parser)
    return options_of(parser)


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
    from fxq.cli.recipe import apply_recipe, dump_recipe, effective_recipe, load_recipe

    options = recipe_options()
    if args.recipe:
        apply_recipe(args, load_recipe(args.recipe, options))
    recipe = effective_recipe(args, options)
    if args.print_recipe:
        print(dump_recipe(recipe, options), end="")
        return 0
    _check(args)
    return _run_stages(args, _write_setup(Path(args.out), recipe, options))


def _check(args: argparse.Namespace) -> None:
    """Every option checked before any work."""
    from fxq.cli.checks import (
        check_at_least,
        check_checkpoint,
        check_input_file,
        check_input_folder,
        check_output_file,
        check_size,
    )
    from fxq.errors import InputError
    from fxq.quant import parse_method, parse_policy
    from fxq.targets import TARGETS

    check_at_least(args, {"calib_images": 1, "val_images": 1, "seed": 0, "latency_runs": 0, "threads": 1})
    check_size(args.size)
    check_checkpoint(args.checkpoint)
    check_input_folder(args.data, "--data")
    check_input_file(args.allocation, "--allocation")
    check_output_file(Path(args.out) / "summary.json", "--out")
    parse_policy(args.policy)
    if args.allocation and args.policy != "W8A8":
        raise InputError(f"give a policy ({args.policy}) or an allocation ({args.allocation}), not both")
    if args.runtime not in (*TARGETS, "none"):
        raise InputError(f"--runtime {args.runtime} is not a target: choose one of {', '.join(TARGETS)} or none")
    if args.method != "detptq":
        parse_method(args.method)


def _write_setup(out: Path, recipe: dict, options: dict) -> str:
    """Write the run folder's recipe.yaml and environment.json; the new run's id (every artifact carries it)."""
    from fxq.cli.environment import environment
    from fxq.cli.recipe import command_line, dump_recipe
    from fxq.cli.run_artifacts import ENVIRONMENT, ONNX_FP32, ONNX_QUANT, OPTIONAL, write_recipe
    from fxq.io import write_json

    for name in (*OPTIONAL, ONNX_FP32, ONNX_QUANT):  # a new run: no stage's file of the last one stays
        (out / name).unlink(missing_ok=True)
    write_recipe(out, dump_recipe(recipe, options))
    env = environment(command_line("fxq pipeline", recipe, options))
    write_json(out / ENVIRONMENT, env)
    return env["run_id"]


def _run_stages(args: argparse.Namespace, run_id: str) -> int:
    import torch

    from fxq.cli.report import build_report
    from fxq.cli.run_artifacts import EVAL_FP32, EVAL_QUANT, MODEL, SUMMARY
    from fxq.data import resolve_categories
    from fxq.io import write_json
    from fxq.models import build
    from fxq.ptq import float_graph, quantize_ptq
    from fxq.roles import quantizer_nodes

    out = Path(args.out)
    torch.manual_seed(args.seed)
    model = build(args.model, checkpoint=args.checkpoint)
    root = _data(args)
    val, val_ds = _loader(root, "val", args.val_images, args.size, 16)
    calib, _ = _loader(root, "train", args.calib_images, args.size, 8)
    critical = resolve_categories(val_ds.ann_file, args.critical)
    fgm = float_graph(model, (args.size, args.size))
    write_json(out / MODEL, {"run_id": run_id, **_model_record(args, model, fgm)})
    record = {"run_id": run_id, "graph": "fp32 (FX graph)", "seconds": 0.0}
    rows = [_evaluate(out / EVAL_FP32, record, fgm, val, val_ds, critical)]
    start = time.perf_counter()
    runtime = None if args.runtime == "none" else args.runtime
    precision = "allocation" if args.allocation else args.policy
    qgm = quantize_ptq(fgm, calib, None if args.allocation else args.policy, args.method, progress=False,
                       target=runtime, allocation=args.allocation)
    record = {"run_id": run_id, "graph": f"{precision} {args.method}",
              "seconds": round(time.perf_counter() - start, 1), "policy": args.policy, "method": args.method,
              "allocation": args.allocation, "runtime": runtime, "quantizers": len(quantizer_nodes(qgm))}
    rows.append(_evaluate(out / EVAL_QUANT, record, qgm, val, val_ds, critical))
    deployed = _deploy(args, out, run_id, fgm, qgm, runtime, (val, val_ds, critical))
    _print_rows(args, root, rows)
    _print_deployment(deployed)
    write_json(out / SUMMARY, {"run_id": run_id, "model": args.model, "policy": args.policy,
                               "allocation": args.allocation, "method": args.method, "rows": rows, **deployed})
    print(f"report: {build_report(out)}")
    return 0


def _deploy(args: argparse.Namespace, out: Path, run_id: str, fgm, qgm, runtime: str | None, data) -> dict:
    """Export, ORT parity and (unless --latency-runs 0) latency stages; what the summary shows of them."""
    from fxq.cli.pipeline_deploy import export_stage, latency_stage, parity_stage

    val, val_ds, critical = data
    export = export_stage(out, run_id, fgm, qgm, args.size, runtime)
    parity = parity_stage(out, run_id, qgm, val, val_ds, critical, args.threads)
    found = {"export": {k: export[k] for k in ("runtime", "fp32_bytes", "quant_bytes")},
             "parity": {k: parity[k] for k in ("max_abs_diff", "AP", "critical_AP")}}
    if args.latency_runs:
        latency = latency_stage(out, run_id, args.size, args.latency_runs, args.threads)
        found["latency"] = {"fp32_ms": latency["rows"]["fp32"]["median_ms"],
                            "quantized_ms": latency["rows"]["quantized"]["median_ms"], "speedup": latency["speedup"]}
    return found


def _print_deployment(found: dict) -> None:
    export, parity = found["export"], found["parity"]
    diff = parity["max_abs_diff"]
    print(f"ONNX ({export['runtime'] or 'plain QDQ'}): {export['quant_bytes']:,} bytes quantized vs "
          f"{export['fp32_bytes']:,} float; onnxruntime AP {parity['AP']:.3f} (critical {parity['critical_AP']:.3f}),"
          f" max |Δ| vs the graph: logits {diff['pred_logits']:.2e}, boxes {diff['pred_boxes']:.2e}")
    if "latency" in found:
        t = found["latency"]
        print(f"latency (onnxruntime, batch 1): fp32 {t['fp32_ms']:.1f} ms, quantized {t['quantized_ms']:.1f} ms "
              f"({t['speedup']:.2f}×)")


def _model_record(args: argparse.Namespace, model: torch.nn.Module, fgm: torch.fx.GraphModule) -> dict:
    """model.json: the model, its weights and the float graph's parameters, MACs and nodes at the run's size."""
    from fxq.costs import role_summary

    roles = role_summary(fgm)
    return {"model": args.model, "checkpoint": args.checkpoint, "size": [args.size, args.size],
            "parameters": sum(p.numel() for p in model.parameters()),
            "macs": sum(r["macs"] for r in roles.values()), "graph_nodes": sum(r["nodes"] for r in roles.values()),
            "roles": roles}


def _print_rows(args: argparse.Namespace, root: Path, rows: list[dict]) -> None:
    print(f"{args.model} on {args.val_images} images of {root} (critical: {', '.join(args.critical)})")
    print(f"{'graph':<28}{'AP':>8}{'AP50':>8}{'crit AP':>9}{'rest AP':>9}{'time s':>8}")
    for r in rows:
        print(f"{r['graph']:<28}{r['AP']:>8.3f}{r['AP50']:>8.3f}{r['critical_AP']:>9.3f}{r['rest_AP']:>9.3f}"
              f"{r['seconds']:>8.1f}")


def _evaluate(path: Path, record: dict, gm, loader, ds, critical) -> dict:
    """Evaluate ``gm``, write ``record`` and the metrics to ``path``; the summary row."""
    from fxq.cli.run_artifacts import write_eval
    from fxq.evaluation import evaluate_model

    start = time.perf_counter()
    m = evaluate_model(gm, loader, ds.coco, critical_ids=critical, progress=False)
    write_eval(path.parent, path.name, {**record, "eval_seconds": round(time.perf_counter() - start, 1)}, m)
    return {"graph": record["graph"], "AP": m["AP"], "AP50": m["AP50"], "critical_AP": m["critical_mAP"] or 0.0,
            "rest_AP": m["rest_mAP"] or 0.0, "seconds": record["seconds"]}
