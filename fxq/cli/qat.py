"""``fxq qat MODEL --data D (--policy P | --allocation A) --out RUN``: quantization-aware training.

Fine-tunes the traced, fake-quantized graph (learnable LSQ / LSQ+ quantizers, initialised by PTQ calibration on
``--calib-images`` training images) from the model's float weights with the detection loss L_A, optionally
the Fisher-trace regularizer λ·tr(Î_F) of the critical loss L_F (``--fisher-reg λ --critical ...``) and
distillation from the float model (``--distill kd``). Writes ``RUN/config.json``, ``RUN/checkpoint.pt``
(resumable, ``--resume``), ``RUN/log.jsonl`` (every loss term, each step), and at the end ``RUN/qat_model.pt``
(the student's state_dict: weights, scales, zero-points) and ``RUN/eval.json``. ``fxq eval --qat RUN`` scores it,
``fxq export --qat RUN`` lowers it. Works under ``torchrun --nproc_per_node N`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_NAME = "config.json"
MODEL_NAME = "qat_model.pt"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``qat`` to the fxq command line."""
    from fxq.cli.train import add_data_arguments, add_run_arguments

    p = sub.add_parser("qat", help="quantization-aware training of a detector (LSQ, Fisher-trace reg., KD)",
                       description=__doc__.split("\n\n")[1])
    add_data_arguments(p, "qat_model.pt, eval.json")
    precision = p.add_mutually_exclusive_group(required=True)
    precision.add_argument("--policy", help='uniform precision, e.g. "4-4-8", "W4A8", "W2A4-Att8"')
    precision.add_argument("--allocation", help="an allocation file written by `fxq allocate --out`")
    p.add_argument("--init", help="initial calibration: a PTQ method (minmax, percentile[:q], mse, lp:<p>, "
                   "detptq) or lsq (default: the best PTQ method for the policy)")
    p.add_argument("--calib-images", type=int, default=32, help="training images for the initial calibration")
    p.add_argument("--runtime", help="prepare for this runtime's integer kernels (e.g. ort-cpu)")
    p.add_argument("--checkpoint", help="float weights to start from (default: the embedded weights)")
    p.add_argument("--fisher-reg", type=float, default=0.0, metavar="LAMBDA",
                   help="weight λ of the Fisher-trace regularizer (0: off)")
    p.add_argument("--fisher-warmup", type=int, default=0, help="steps of linear warm-up of λ from 0")
    p.add_argument("--critical", nargs="+", metavar="NAME",
                   help="critical categories (names, ids or supercategories): the regularizer's L_F, and the "
                   "critical mAP in eval.json")
    p.add_argument("--alpha", type=float, default=1.0, help="α of the critical objective α·L_A + L_F")
    p.add_argument("--distill", choices=("none", "kd"), default="none",
                   help="kd: class KL + box L1 + GIoU from the float model, same query index")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation loss")
    p.add_argument("--no-learn-zero-point", action="store_true", help="keep affine zero-points fixed (LSQ)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="end (and fit the schedule) after this many steps, "
                   "within --epochs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="weights (default 1e-4)")
    p.add_argument("--lr-backbone", type=float, default=1e-5, help="backbone weights (default 1e-5)")
    p.add_argument("--lr-quant", type=float, default=1e-3, help="quantizer scales and zero-points")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--schedule", choices=("step", "cosine"), default="cosine")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cls-loss-coef", type=float, default=None,
                   help="classification loss weight (default: what the model was trained with: 5 for the "
                   "sigmoid-head detr_tiny, else the criterion's default)")
    add_run_arguments(p, ckpt_every=100)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.cli.train import datasets, is_main
    from fxq.data import CocoDetection, eval_transforms
    from fxq.qat import QATRecipe, train_qat

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = QATRecipe(model=args.model, policy=args.policy, allocation=args.allocation, init=args.init,
                       size=args.size, learn_zero_point=not args.no_learn_zero_point, target=args.runtime)
    train_set, val_set = datasets(args)
    calib_set = CocoDetection.from_folder(args.data, args.train_split, transforms=eval_transforms(args.size))
    result = train_qat(recipe, train_set, val_set, _options(args), Path(args.out), calib_set=calib_set,
                       resume=args.resume,
                       checkpoint=args.checkpoint, argv={k: v for k, v in vars(args).items() if k != "func"})
    if result is not None and is_main():
        metrics = result["eval"]
        crit = metrics.get("critical_mAP")
        extra = "" if crit is None else f"  critical mAP {crit:.3f}"
        print(f"{args.model} QAT {args.policy or args.allocation}: AP {metrics['AP']:.3f}  AP50 "
              f"{metrics['AP50']:.3f}{extra}  ({metrics['num_images']} images; {result['minutes']:.1f} min)")
    return 0


def _options(args: argparse.Namespace) -> dict:
    keys = ("fisher_reg", "fisher_warmup", "critical", "alpha", "distill", "kd_weight", "calib_images", "epochs",
            "steps", "batch_size", "lr", "lr_backbone", "lr_quant", "weight_decay", "clip", "schedule", "warmup",
            "cls_loss_coef", "seed", "ckpt_every", "stop_after", "no_progress")
    return {k: getattr(args, k) for k in keys}


def _check_args(args: argparse.Namespace) -> None:
    from fxq.errors import InputError

    if not (args.fisher_reg >= 0):
        raise InputError(f"--fisher-reg {args.fisher_reg}: λ must be >= 0 (0 turns the regularizer off)")
    if args.fisher_reg > 0 and not args.critical:
        raise InputError("--fisher-reg needs --critical NAME ...: the regularizer is the Fisher trace of the "
                         "critical-category loss L_F")
    for flag in ("epochs", "batch_size", "calib_images", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    if args.fisher_warmup < 0:
        raise InputError(f"--fisher-warmup {args.fisher_warmup}: give 0 or more steps")
    out = Path(args.out)
    if (out / MODEL_NAME).exists() and not args.resume:
        raise InputError(f"{out} holds a finished QAT run ({MODEL_NAME}); choose another --out (nothing was "
                         "written)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the run")
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise InputError(f"{out} holds an unfinished run (checkpoint.pt): continue it with --resume or choose "
                         "another --out (nothing was written)")
