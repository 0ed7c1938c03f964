"""``fxq export MODEL``: trace, quantize and calibrate on a COCO folder (:func:`fxq.ptq.quantize_ptq`, prepared
for ``--runtime`` when given) and lower to an ONNX QDQ model. ``fxq export --qat RUN`` lowers a finished
``fxq qat`` run instead: its learned scales and integer zero-points, at the size it was trained at."""

from __future__ import annotations

import argparse


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
    p.add_argument("--policy", default="W8A8", help='precision policy, e.g. "W8A8", "W4A8", "4-4-8" (default W8A8)')
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
    p.add_argument("--runtime", help="place precision for this runtime (e.g. ort-cpu): output quantizers and int32 "
                                     "conv biases where its integer kernels need them, 4-bit weights cast to "
                                     "int8 kernels; the report lists the kernel each quantized node runs on")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.qat:
        return _run_qat(args)
    if not args.model or not args.calib:
        from fxq.errors import InputError

        raise InputError("give MODEL and --calib FOLDER (or --qat RUN to lower a QAT run)")

    from fxq.backends.capabilities import runtime_capabilities
    from fxq.data import CocoDetection, collate, eval_transforms
    from fxq.errors import InputError
    from fxq.models import build
    from fxq.ptq import float_graph, quantize_ptq

    h, w = args.size
    if h < 32 or w < 32:
        raise InputError(f"--size {h} {w} is too small: DETR backbones downsample by 32, use at least 32 32")
    if args.runtime:
        runtime_capabilities(args.runtime)  # an unknown or uninstalled runtime fails before calibration
    data = CocoDetection.from_folder(args.calib, transforms=eval_transforms(min(h, w), max(h, w)))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, collate_fn=collate)
    example = torch.zeros(1, 3, h, w)
    float_gm = float_graph(build(args.model, checkpoint=args.checkpoint, seed=0), (h, w))
    gm = quantize_ptq(float_gm, loader, args.policy, target=args.runtime, num_batches=args.calib_batches)
    _lower(gm, example, args, args.runtime,
           {"model": args.model, "policy": args.policy, "size": [h, w], "runtime": args.runtime})
    return 0


def _run_qat(args: argparse.Namespace) -> int:
    import torch

    from fxq.errors import InputError
    from fxq.qat import load_run

    if args.model or args.calib:
        raise InputError("--qat RUN takes model, policy and calibration from the run: drop MODEL and --calib")
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
    from fxq.backends import lower_to_onnx
    from fxq.backends.runtime_lower import lower_for_runtime
    from fxq.io import write_json

    if runtime:
        report = lower_for_runtime(gm, example, args.out, runtime, opset=args.opset, dynamic=not args.static)
    else:
        report = lower_to_onnx(gm, example, args.out, opset=args.opset, dynamic=not args.static)
    print(report)
    if args.json:
        write_json(args.json, {**record, **report.to_dict()})
