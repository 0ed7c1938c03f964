"""``fxq pipeline``: the whole flow on one model — data, float accuracy, Fisher analysis, allocation under a budget
(or a uniform policy), PTQ, accuracy of the quantized graph, runtime-aware ONNX export, onnxruntime parity and
accuracy, latency with a per-op-type profile, report.

Defaults run in under a minute on 2 cores: the embedded tiny Deformable DETR, a fresh synthetic set (seed 1, so images
the model never saw), W8A8 with min-max calibration, prepared for ORT CPU. Options come from the flags, else from a
--recipe YAML file, else from the defaults (--print-recipe prints the recipe the arguments give). Each stage writes
its files into OUT (fxq/cli/pipeline_run.py lists them); a rerun keeps the stages whose inputs did not change
(fxq/cli/stages.py), --from STAGE reruns from there, Ctrl-C leaves the finished stages for the next run.
recipe.yaml, environment.json, stages.json, summary.json and last report.html (`fxq report OUT` rebuilds it) come
with every run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fxq.cli.recipe import Given

#: Stage names, in run order (:mod:`fxq.cli.pipeline_run`).
STAGE_NAMES = ("data", "model", "eval_fp32", "fisher", "allocate", "quantize", "eval_quant", "export", "parity",
               "latency")
#: Budget units of the allocation (:mod:`fxq.passes.allocate`).
BUDGET_KINDS = ("avg_bits", "size_bytes", "bops", "latency")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="data → float eval → Fisher → allocation → PTQ or QAT → eval → ONNX → "
                                        "parity → latency → report, in one command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_options(p)
    p.add_argument("--recipe", metavar="R.yaml", help="YAML file of the options above (flags given here override "
                   "it; its paths are relative to the current folder, as on the command line)")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the recipe these arguments give (the defaults, when alone) as YAML and exit")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", choices=STAGE_NAMES,
                   help=f"rerun this stage and every later one even if done ({', '.join(STAGE_NAMES)})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (another command's run, or this pipeline's stages) instead of "
                        "refusing / skipping stages that are done")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    p.add_argument("--budget", action=Given, type=float, default=None,
                   help="allocate weight bits by Fisher sensitivity within this budget (--budget-kind units) "
                        "instead of the policy's uniform weight bits (the policy still sets activations)")
    p.add_argument("--budget-kind", action=Given, default="avg_bits", choices=BUDGET_KINDS,
                   help="unit of --budget: average weight bits, model bytes, BOPs or latency (ms; "
                        "needs --latency-table)")
    p.add_argument("--objective", action=Given, default="critical", choices=("overall", "critical", "combined"),
                   help="Fisher trace the allocation weighs: of L_A, of the critical loss L_F, or of both")
    p.add_argument("--candidates", action=Given, type=int, nargs="+", default=[2, 4, 8],
                   help="weight bit-widths the allocation chooses from (32: the node kept float)")
    p.add_argument("--latency-table", action=Given, metavar="T.json",
                   help="per-node latencies from `fxq bench MODEL --latency-table T.json` (--budget-kind latency)")
    p.add_argument("--method", action=Given, default="minmax",
                   help="calibration: minmax, percentile:99.99, mse, lp:<p>, detptq")
    p.add_argument("--qat-steps", action=Given, type=int, default=0,
                   help="quantization-aware training steps after the calibration (`fxq qat` in OUT/qat, at its "
                        "defaults; 0: PTQ only). --method is then QAT's initial calibration")
    p.add_argument("--fisher-reg", action=Given, type=float, default=0.0, metavar="LAMBDA",
                   help="QAT: weight λ of the Fisher-trace regularizer of the critical loss (0: off)")
    p.add_argument("--distill", action=Given, default="none",
                   help="QAT: distillation from the float model: none, kd, drd, aq or a '+' of them (e.g. drd+aq)")
    p.add_argument("--critical", action=Given, nargs="+", default=["person"],
                   help="critical categories (names/ids/supercategories)")
    p.add_argument("--calib-images", action=Given, type=int, default=32, help="calibration images (train split)")
    p.add_argument("--val-images", action=Given, type=int, default=100, help="evaluation images (val split)")
    p.add_argument("--size", action=Given, type=int, default=160, help="input side in pixels")
    p.add_argument("--runtime", action=Given, default="ort-cpu",
                   help="runtime the quantized ONNX file is prepared for (ort-cpu, openvino, tensorrt, ...: "
                        "fxq.targets.TARGETS; none: plain QDQ); parity and latency run it on onnxruntime CPU")
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


def run(args: argparse.Namespace) -> int:
    from fxq.cli.pipeline_run import PipelineRun
    from fxq.cli.recipe import apply_recipe, dump_recipe, effective_recipe, load_recipe

    options = recipe_options()
    if args.recipe:
        apply_recipe(args, load_recipe(args.recipe, options))
    recipe = effective_recipe(args, options)
    if args.print_recipe:
        print(dump_recipe(recipe, options), end="")
        return 0
    _check(args)
    out = Path(args.out)
    _claim(out, args.overwrite)
    book = _stage_book(args, out, recipe)
    run = PipelineRun(args)
    run.check_inputs()
    names = list(book.stages)
    todo = book.prepare(names[names.index(args.from_stage):] if args.from_stage else ())
    run.run_id = _write_setup(out, recipe, options)
    return _run_stages(run, book, todo)


def _stage_book(args: argparse.Namespace, out: Path, recipe: dict):
    from fxq.cli.pipeline_run import stage_plan
    from fxq.cli.stages import StageBook
    from fxq.errors import InputError

    book = StageBook(out, stage_plan(args), recipe)
    if args.from_stage and args.from_stage not in book.stages:
        raise InputError(f"--from {args.from_stage}: this run has no {args.from_stage} stage (it has "
                         f"{', '.join(book.stages)})")
    return book


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

    check_at_least(args, {"calib_images": 1, "val_images": 1, "seed": 0, "latency_runs": 0, "threads": 1,
                          "qat_steps": 0, "fisher_reg": 0.0})
    check_size(args.size)
    check_checkpoint(args.checkpoint)
    check_input_folder(args.data, "--data")
    check_input_file(args.allocation, "--allocation")
    check_input_file(args.latency_table, "--latency-table")
    check_output_file(Path(args.out) / "summary.json", "--out")
    parse_policy(args.policy)
    if args.allocation and args.policy != "W8A8":
        raise InputError(f"give a policy ({args.policy}) or an allocation ({args.allocation}), not both")
    if args.runtime not in (*TARGETS, "none"):
        raise InputError(f"--runtime {args.runtime} is not a target: choose one of {', '.join(TARGETS)} or none")
    if args.method != "detptq":
        parse_method(args.method)
    _check_budget(args)
    _check_qat(args)


def _check_qat(args: argparse.Namespace) -> None:
    from fxq.errors import InputError
    from fxq.qat import distill_methods

    distill_methods(args.distill)
    if not args.qat_steps and (args.fisher_reg or args.distill != "none"):
        raise InputError("--fisher-reg and --distill act in QAT: give --qat-steps N (N > 0) too")


def _check_budget(args: argparse.Namespace) -> None:
    from fxq.cli.checks import check_budget
    from fxq.errors import InputError

    if args.budget is not None and args.allocation:
        raise InputError(f"give --budget (the pipeline allocates) or --allocation {args.allocation} (a saved "
                         "allocation), not both")
    check_budget(args)


def _claim(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding another command's run unless ``overwrite``; with it, empty the folder."""
    import shutil

    from fxq.cli.run_artifacts import RECIPE, STAGES
    from fxq.errors import InputError
    from fxq.train.run_folder import RUN_FILES

    if not out.is_dir():
        return
    if overwrite:
        for entry in out.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return
    if (out / STAGES).is_file() or (out / RECIPE).is_file():
        return  # a pipeline run: its stages that are done are kept
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present:
        raise InputError(f"{out} holds another command's run ({', '.join(present)}): choose another --out, or "
                         "replace it with --overwrite (nothing was written)")


def _write_setup(out: Path, recipe: dict, options: dict) -> str:
    """Write the run folder's recipe.yaml and environment.json; this invocation's run id (the artifacts of the
    stages it runs carry it, stages.json records it)."""
    from fxq.cli.environment import environment
    from fxq.cli.recipe import command_line, dump_recipe
    from fxq.cli.run_artifacts import ENVIRONMENT, REPORT, SUMMARY, write_recipe
    from fxq.io import write_json

    for name in (SUMMARY, REPORT):  # rebuilt at the end from the stages' artifacts
        (out / name).unlink(missing_ok=True)
    write_recipe(out, dump_recipe(recipe, options))
    env = environment(command_line("fxq pipeline", recipe, options))
    write_json(out / ENVIRONMENT, env)
    return env["run_id"]


def _run_stages(run, book, todo: list[str]) -> int:
    import torch

    from fxq.cli.pipeline_summary import print_summary, write_summary
    from fxq.cli.report import build_report

    args, run_id = run.args, run.run_id
    torch.manual_seed(args.seed)
    ran = {}
    for i, name in enumerate(book.stages, 1):
        if name not in todo:
            print(f"[{i}/{len(book.stages)}] {name}: done, kept (its inputs did not change)", flush=True)
            continue
        print(f"[{i}/{len(book.stages)}] {name}", flush=True)
        book.start(name)
        start = time.perf_counter()
        run.stage(name)()
        ran[name] = time.perf_counter() - start
        book.finish(name, run_id, ran[name])
    summary = write_summary(run.out, run_id, args, book)
    print_summary(summary, args)
    print(f"report: {build_report(run.out)}")
    return 0
