"""``fxq bench MODEL``: latency of torch eager, ORT fp32, ORT quantize_static (QDQ, QOperator), fxq int8 and
fxq mixed precision side by side (and, with ``--rows``, OpenVINO fp32 and fxq int8 lowered for OpenVINO), with
p10 / median / p90 over interleaved rounds, file sizes, per-node profiles and the allocation's latency table."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

ROW_HELP = ("torch, ort-fp32, ort-qdq, ort-qoperator, fxq-int8, fxq-mixed, fxq-int8-plain, openvino-fp32, "
            "openvino-fxq-int8, openvino-nncf (the openvino rows need pip install openvino; openvino-nncf also nncf)")
DEFAULT_ROWS = ["torch", "ort-fp32", "ort-qdq", "ort-qoperator", "fxq-int8", "fxq-mixed"]


def _default_images() -> str | None:
    for root in (Path(__file__).resolve().parents[3], Path.cwd().parent, Path("/work")):
        folder = root / "shared" / "data" / "coco-val2017-fixture"
        if folder.is_dir():
            return str(folder)
    return None


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the fxq command line."""
    p = sub.add_parser(
        "bench", help="time float and quantized models on onnxruntime side by side",
        description="Build MODEL, export it, quantize it with onnxruntime's quantize_static and with fxq (W8A8 and "
                    "W4A8 mixed, lowered for the runtime), calibrate on real images, and time every row on the "
                    "same image: warm-up, N runs in interleaved rounds, p10 / median / p90; profile each "
                    "onnxruntime row per node.")
    p.add_argument("model", help="model name (see `fxq inspect --list`)")
    p.add_argument("--images", default=_default_images(),
                   help="COCO folder: calibration and input images (default: ../shared/data/coco-val2017-fixture)")
    p.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"),
                   help="input size; images are resized to fit and zero-padded (default 512 512)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime (default 2)")
    p.add_argument("--provider", default="cpu", help="onnxruntime execution provider (default cpu)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="time the ONNX rows in this many turns (default 5)")
    p.add_argument("--calib-images", type=int, default=8, help="calibration images (default 8)")
    p.add_argument("--profile-runs", type=int, default=5, help="profiled runs per ONNX row; 0 = no profile")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, metavar="ROW", help=f"rows to run: {ROW_HELP}")
    p.add_argument("--checkpoint", help="weights to load (default: random initialisation)")
    p.add_argument("--work-dir", help="folder for the ONNX files (default: a new temporary folder)")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--markdown", help="write the table as markdown to this file")
    p.add_argument("--latency-table", help="also profile every quantizable node at each --latency-bits width and "
                                          "write the allocation's latency table (per-node ms, the rest of the "
                                          "model, the machine) to this JSON file")
    p.add_argument("--latency-bits", nargs="+", type=int, default=[4, 8, 32],
                   help="bit-widths of the latency table; 32 = the node kept float (default 4 8 32)")
    p.add_argument("--latency-policy", default="W8A8",
                   help="policy the latency table's files are quantized at, weights at each --latency-bits width "
                        "(use the allocation's --policy, e.g. 4-4-8; default W8A8)")
    p.add_argument("--in-process", action="store_true",
                   help="time the ONNX models in this process instead of a fresh one each (faster, less exact: "
                        "torch's thread pool can slow onnxruntime down right after calibration)")
    p.add_argument("--quiet", action="store_true", help="do not print progress")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    from fxq.bench.suite import check_rows
    from fxq.errors import InputError

    if args.images is None or not Path(args.images).is_dir():
        raise InputError(f"--images {args.images!r} is not a folder; give a COCO folder (images + annotations)")
    h, w = args.size
    if h < 32 or w < 32:
        raise InputError(f"--size {h} {w} is too small: DETR backbones downsample by 32, use at least 32 32")
    check_rows(args.rows)
    from fxq.cli.checks import check_bit_widths, check_checkpoint, check_output_file

    check_checkpoint(args.checkpoint)
    for flag in ("json", "markdown", "latency_table"):
        check_output_file(getattr(args, flag), f"--{flag.replace('_', '-')}")
    check_bit_widths(args.latency_bits, "--latency-bits")
    if all(b == 32 for b in args.latency_bits):
        raise InputError("--latency-bits 32 alone: add a quantized width (e.g. 8); the rest of the model is "
                         "measured at it")
    for flag, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0), ("--threads", args.threads, 1),
                             ("--calib-images", args.calib_images, 1), ("--profile-runs", args.profile_runs, 0),
                             ("--rounds", args.rounds, 1)):
        if value < low:
            raise InputError(f"{flag} {value} must be at least {low}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    parts = ["fxq bench", args.model, "--size", *map(str, args.size), "--threads", str(args.threads),
             "--provider", args.provider, "--warmup", str(args.warmup), "--runs", str(args.runs),
             "--rounds", str(args.rounds),
             "--calib-images", str(args.calib_images), "--profile-runs", str(args.profile_runs),
             "--rows", *args.rows]
    if args.checkpoint:
        parts += ["--checkpoint", args.checkpoint]
    if args.latency_table:
        parts += ["--latency-table", args.latency_table, "--latency-bits", *map(str, args.latency_bits),
                  "--latency-policy", args.latency_policy]
    return shlex.join(parts).replace("'fxq bench'", "fxq bench")


def run(args: argparse.Namespace) -> int:
    from fxq.bench.results import write_results
    from fxq.bench.suite import BenchConfig, run_bench
    from fxq.io import write_json

    _check(args)
    config = BenchConfig(
        model=args.model, images=args.images, size=tuple(args.size), threads=args.threads, provider=args.provider,
        warmup=args.warmup, runs=args.runs, calib_images=args.calib_images, profile_runs=args.profile_runs,
        rows=args.rows, checkpoint=args.checkpoint, work_dir=args.work_dir,
        latency_bits=args.latency_bits if args.latency_table else (), latency_policy=args.latency_policy,
        isolate=not args.in_process,
        rounds=args.rounds,
        log=(lambda m: None) if args.quiet else (lambda m: print(f"[bench] {m}", flush=True)))
    result = {"command": _command(args), **run_bench(config)}
    table = result.pop("latency_table", None)
    if table is not None:
        write_json(args.latency_table, table)
        result["latency_table"] = args.latency_table
    print(write_results(result, args.json, args.markdown))
    return 0
