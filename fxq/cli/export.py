"""``fxq export MODEL``: trace, quantize and calibrate on a COCO folder (:func:`fxq.ptq.quantize_ptq`, prepared
for ``--runtime`` when given) and lower to an ONNX QDQ model. ``fxq export --qat RUN`` lowers a finished
``fxq qat`` run instead: its learned scales and integer zero-points, at the size it was trained at."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the fxq command line."""
    p = sub.add_parser(
        "export", help="quantize a model and write it as an ONNX QDQ model",
        description="Trace MODEL, remove dropout, fold batch norm, annotate a precision policy, insert quantizers, "
                    "calibrate on the images of a COCO folder and lower to ONNX QDQ (int8 / int4); prints the "
                    "lowering report.")
    p.add_argument("model", nargs="?", help="model name (see `fxq inspect --list`); not with --qat")
    p.add_argument("--qat", metavar="RUN", help="lower this finished `fxq qat` run (no calibration: its learned "
                   "quantizers; model, policy, size and runtime come from RUN/config.json)")
    p.add_argument("--policy", help='uniform precision policy, e.g. "W8A8", "W4A8", "4-4-8" (default W8A8)')
    p.add_argument("--allocation", metavar="A.json", help="per-node precision from `fxq allocate MODEL --out A.json` "
                   "(instead of --policy)")
    p.add_argument("--calib", help="COCO folder whose images calibrate the activations (not with --qat)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--checkpoint", help="weights to load (official {'model': ...} file or plain state_dict; default: "
                   "the embedded weights, else random weights drawn with seed 0)")
    p.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"),
                   help="example input size; calibration images are resized to fit it (default 512 512)")
    p.add_argument("--calib-batches", type=int, help="calibrate on this many batches (default: all images)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21; int4 needs 21)")
    p.add_argument("--static", action="store_true", help="fix batch, height and width to the example's")
    p.add_argument("--runtime", help="place precision for this runtime (ort-cpu, openvino, tensorrt, ...): output "
                                     "quantizers and int32 conv biases where its integer kernels need them, 4-bit "
                                     "weights cast to int8 kernels; tensorrt: TensorRT's explicit-quantization "
                                     "rules, checked on the file; the report lists the kernel each quantized node "
                                     "runs on")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out calibration images that cannot be decoded (reports how many)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.qat:
        return _run_qat(args)
    from fxq.errors import InputError

    if not args.model or not args.calib:
        raise InputError("give MODEL and --calib FOLDER (or --qat RUN to lower a QAT run)")

    from fxq.backends.capabilities import runtime_capabilities
    from fxq.cli.checks import check_input_file
    from fxq.cli.train import verify_images
    from fxq.data import CocoDetection, collate, eval_transforms
    from fxq.evaluation.finite import check_finite_weights
    from fxq.models import build
    from fxq.ptq import float_graph, quantize_ptq
    from fxq.quant import parse_policy

    h, w = args.size
    _check_args(args)
    if args.policy and args.allocation:
        raise InputError("give --policy or --allocation, not both (an allocation fixes every node's precision)")
    if not args.allocation:
        args.policy = args.policy or "W8A8"
        parse_policy(args.policy)
    else:
        check_input_file(args.allocation, "--allocation")
    if args.runtime:
        runtime_capabilities(args.runtime)  # an unknown or uninstalled runtime fails before calibration
    data = CocoDetection.from_folder(args.calib, transforms=eval_transforms(min(h, w), max(h, w)))
    verify_images(data, "calibration", args.skip_bad_images)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, collate_fn=collate)
    example = torch.zeros(1, 3, h, w)
    model = build(args.model, checkpoint=args.checkpoint, seed=0)
    check_finite_weights(model, args.checkpoint or args.model)
    float_gm = float_graph(model, (h, w))
    gm = quantize_ptq(float_gm, loader, args.policy, target=args.runtime, num_batches=args.calib_batches,
                      allocation=args.allocation)
    _lower(gm, example, args, args.runtime, {"model": args.model, "policy": args.policy,
                                             "allocation": args.allocation, "size": [h, w], "runtime": args.runtime})
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Every option in range and every output path writable, before any model is built."""
    from fxq.backends.onnx_export import MAX_OPSET, MIN_OPSET
    from fxq.cli.checks import check_at_least, check_checkpoint, check_output_file, check_size
    from fxq.errors import InputError

    check_size(args.size)
    check_at_least(args, {"calib_batches": 1, "batch_size": 1})
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise InputError(f"--opset {args.opset} is not supported: give {MIN_OPSET}..{MAX_OPSET} (21 for int4)")
    check_checkpoint(args.checkpoint)
    check_output_file(args.out, "--out")
    check_output_file(args.json, "--json")
    if args.json and args.out and Path(args.json).resolve() == Path(args.out).resolve():
        raise InputError(f"--json {args.json} is the --out file: give the report another name")


def _run_qat(args: argparse.Namespace) -> int:
    import torch

    from fxq.errors import InputError
    from fxq.qat import load_run

    if args.model or args.calib or args.allocation:
        raise InputError("--qat RUN takes model, precision and calibration from the run: drop MODEL, --calib and "
                         "--allocation")
    _check_args(args)
    recipe, student = load_run(args.qat)
    runtime = args.runtime or recipe.target
    if runtime != recipe.target:
        trained = f"for runtime {recipe.target}" if recipe.target else "without runtime preparation"
        raise InputError(f"--runtime {runtime}: the run {args.qat} was trained {trained} (its quantizer "
                         f"placement); export it as trained, or retrain it with fxq qat --runtime {runtime}")
    example = torch.zeros(1, 3, recipe.size, recipe.size)
    _lower(student, example, args, runtime, {"qat": args.qat, **recipe.to_dict()})
    return 0


def _lower(gm, example, args: argparse.Namespace, runtime: str | None, record: dict) -> None:
    """Lower ``gm`` (for ``runtime``, or plain QDQ), print the report and write ``--json`` with ``record``."""
    from fxq.io import write_json

    report = lower_checked(gm, example, args.out, runtime, opset=args.opset, dynamic=not args.static)
    print(report)
    if args.json:
        write_json(args.json, {**record, **report.to_dict()})


def lower_checked(gm, example, out: str | Path, runtime: str | None, *, opset: int = 21, dynamic: bool = True):
    """The lowering report of ``gm`` written to ``out`` (for ``runtime``, or plain QDQ); InputError when the file's
    outputs on ``example`` hold NaN/inf. On any error or Ctrl-C no half-written ONNX file stays behind."""
    from fxq.backends import lower_to_onnx
    from fxq.backends.runtime_lower import lower_for_runtime

    out = str(out)
    before = _stamps(out)
    try:
        if runtime:
            report = lower_for_runtime(gm, example, out, runtime, opset=opset, dynamic=dynamic)
        else:
            report = lower_to_onnx(gm, example, out, opset=opset, dynamic=dynamic)
        _check_outputs(out, example)
    except BaseException:
        for path, stamp in _stamps(out).items():
            if stamp != before.get(path):
                path.unlink(missing_ok=True)
        raise
    return report


def _stamps(out: str) -> dict[Path, tuple[int, int]]:
    """(mtime, size) of the ONNX file and its external data file, where they exist."""
    paths = (Path(out), Path(f"{out}.data"))
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in paths if p.is_file()}


def _check_outputs(out: str, example) -> None:
    """InputError when the written ONNX model's outputs on ``example`` hold NaN or inf, naming the first output."""
    import numpy as np

    from fxq.backends.session import inference_session, session_options
    from fxq.errors import InputError

    session = inference_session(out, session_options(exact_int8=False), "CPUExecutionProvider")
    if len(session.get_inputs()) != 1:
        return
    feed = {session.get_inputs()[0].name: example.numpy()}
    for meta, value in zip(session.get_outputs(), session.run(None, feed), strict=True):
        values = np.asarray(value)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise InputError(f"the exported model's output {meta.name!r} holds {bad} NaN/inf of {values.size} values "
                             f"on a zero image: the quantized graph is not usable ({out} was removed); check the "
                             "checkpoint's weights and the calibration images")
