"""``fxq qat MODEL --data D (--policy P | --allocation A) --out RUN``: quantization-aware training.

Fine-tunes the traced, fake-quantized graph (learnable LSQ / LSQ+ quantizers, initialised by PTQ calibration on
``--calib-images`` training images) from the model's float weights with the detection loss L_A, optionally
the Fisher-trace regularizer λ·tr(Î_F) of the critical loss L_F (``--fisher-reg λ --critical ...``) and
distillation from the float model (``--distill kd|drd|aq``, composable: ``drd+aq``; see
:func:`fxq.qat.distill_methods`). Writes ``RUN/config.json``, ``RUN/checkpoint.pt``
(resumable, ``--resume``), ``RUN/log.jsonl`` (every loss term, each step), and at the end ``RUN/qat_model.pt``
(the student's state_dict: weights, scales, zero-points) and ``RUN/eval.json``. ``fxq eval --qat RUN`` scores it,
``fxq export --qat RUN`` lowers it. Works under ``torchrun --nproc_per_node N`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--fisher-every", type=int, default=1, metavar="K",
                   help="lazy regularization: the regularizer every K steps at weight K·λ (default 1: every step)")
    p.add_argument("--critical", nargs="+", metavar="NAME",
                   help="critical categories (names, ids or supercategories): the regularizer's L_F, and the "
                   "critical mAP in eval.json")
    p.add_argument("--alpha", type=float, default=1.0, help="α of the critical objective α·L_A + L_F")
    p.add_argument("--distill", default="none", metavar="METHODS",
                   help="distillation from the float model: none, or methods joined by '+': kd (class + box KD), "
                        "drd (Q-DETR: distribution alignment of the decoder queries + foreground-aware DRD), aq "
                        "(AQ-DETR: auxiliary query groups + encoder attention distillation); e.g. drd+aq")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD loss (default 1)")
    p.add_argument("--kd-boxes", choices=("all", "foreground"), default="foreground",
                   help="queries the KD box terms average over: weighted by the teacher's foreground probability "
                        "(default), or all alike (the first implementation's KD)")
    p.add_argument("--drd-weight", type=float, default=3.0, help="λ_DRD (default 3, Q-DETR's unofficial code)")
    p.add_argument("--drd-tau", type=float, default=0.5, help="τ of the foreground-aware matching (default 0.5)")
    p.add_argument("--aux-groups", type=int, default=1,
                   help="auxiliary query groups of --distill aq, training only (default 1)")
    p.add_argument("--aq-weight", type=float, default=1.0, help="weight of the encoder attention KL (default 1)")
    p.add_argument("--float-stage", type=int, default=0, metavar="STEPS",
                   help="Q-DETR's two-stage schedule: the encoder and decoder float for the first STEPS steps, "
                   "then quantized (default 0: quantized from the start)")
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

    from fxq.cli.train import check_batches, datasets, is_main
    from fxq.data import CocoDetection, eval_transforms, resolve_categories
    from fxq.qat import QATRecipe, distill_methods, train_qat
    from fxq.train.run_folder import claim_run_folder

    _check_args(args)
    folder = claim_run_folder(args.out, vars(args), resume=args.resume, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = QATRecipe(model=args.model, policy=args.policy, allocation=args.allocation, init=args.init,
                       size=args.size, learn_zero_point=not args.no_learn_zero_point, target=args.runtime,
                       align_queries="drd" in distill_methods(args.distill))
    train_set, val_set = datasets(args)
    check_batches(train_set, args.batch_size, args.train_split)
    _check_float_stage(args, len(train_set))
    if args.critical:  # an unknown category fails here, before the run folder is written
        resolve_categories(train_set.ann_file, args.critical)
    calib_set = CocoDetection.from_folder(args.data, args.train_split, transforms=eval_transforms(args.size))
    calib_set.ids = list(train_set.ids)  # the images --skip-bad-images kept
    folder.commit(main=is_main())
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
    keys = ("fisher_reg", "fisher_warmup", "fisher_every", "critical", "alpha", "distill", "kd_weight", "kd_boxes",
            "drd_weight", "drd_tau", "aux_groups", "aq_weight", "float_stage", "calib_images", "epochs",
            "steps", "batch_size", "lr", "lr_backbone", "lr_quant", "weight_decay", "clip", "schedule", "warmup",
            "cls_loss_coef", "seed", "ckpt_every", "stop_after", "no_progress")
    return {k: getattr(args, k) for k in keys}


#: Lower bounds of fxq qat's numeric options (None = not given).
QAT_BOUNDS = {"threads": 1, "fisher_every": 1, "float_stage": 0, "stop_after": 1, "ckpt_every": 0, "warmup": 0,
              "seed": 0, "lr": 0.0, "lr_backbone": 0.0, "lr_quant": 0.0, "weight_decay": 0.0, "clip": 0.0, "alpha": 0.0,
              "cls_loss_coef": 0.0}


def _check_float_stage(args: argparse.Namespace, images: int) -> None:
    """InputError when the float stage lasts the whole run (the transformer would never train quantized)."""
    from fxq.errors import InputError
    from fxq.train import TrainConfig
    from fxq.train.sampler import EpochBatchSampler

    per_epoch = EpochBatchSampler(images, args.batch_size, args.seed, epoch=0).num_batches
    total = TrainConfig(epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size).total_steps(per_epoch)
    if args.float_stage >= total:
        raise InputError(f"--float-stage {args.float_stage} lasts the whole run of {total} steps: the encoder and "
                         f"decoder would never train quantized; give fewer than {total} steps (Q-DETR: about half)")


def _check_args(args: argparse.Namespace) -> None:
    from fxq.cli.checks import check_at_least, check_checkpoint, check_input_file, check_size
    from fxq.errors import InputError

    check_at_least(args, QAT_BOUNDS)
    check_size(args.size)
    check_input_file(args.allocation, "--allocation")
    check_checkpoint(args.checkpoint)

    if not (args.fisher_reg >= 0):
        raise InputError(f"--fisher-reg {args.fisher_reg}: λ must be >= 0 (0 turns the regularizer off)")
    if args.fisher_reg > 0 and not args.critical:
        raise InputError("--fisher-reg needs --critical NAME ...: the regularizer is the Fisher trace of the "
                         "critical-category loss L_F")
    if args.fisher_every > 1 and not args.fisher_reg > 0:
        raise InputError(f"--fisher-every {args.fisher_every} needs --fisher-reg λ > 0: it sets how often the "
                         "regularizer runs")
    for flag in ("epochs", "batch_size", "calib_images", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    from fxq.qat import distill_methods

    distill_methods(args.distill)
    if args.aux_groups < 1:
        raise InputError(f"--aux-groups {args.aux_groups}: give at least 1 auxiliary query group")
    for flag in ("kd_weight", "drd_weight", "drd_tau", "aq_weight"):
        if not (getattr(args, flag) >= 0):
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number >= 0")
    if args.fisher_warmup < 0:
        raise InputError(f"--fisher-warmup {args.fisher_warmup}: give 0 or more steps")
