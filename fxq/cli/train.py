"""``fxq train MODEL --data DIR --out RUN``: train a detector on a COCO-format folder, then evaluate it.

Writes ``RUN/checkpoint.pt`` (resumable), ``RUN/log.jsonl``, ``RUN/config.json``, and at the end
``RUN/model.pt`` (the weights, a plain state_dict) and ``RUN/eval.json`` (pycocotools metrics on the val split).
Works under ``torchrun --nproc_per_node N`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxq.models.transfer import STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector on a COCO-format folder",
                       description="Train MODEL on DATA's train split; evaluate on its val split at the end.")
    add_data_arguments(p, "final weights")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-backbone", type=float, default=None, help="default: --lr (tiny models train from scratch)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--schedule", choices=("step", "cosine"), default="cosine")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cls-loss-coef", type=float, default=None,
                   help="weight of the classification loss (default: 1 softmax head, 2 sigmoid head, as DETR / "
                   "Deformable DETR)")
    p.add_argument("--one-to-many", type=int, default=1, help="repeat every ground-truth box k times in matching")
    p.add_argument("--query-groups", type=int, default=1,
                   help="DETR only: train G groups of queries, each matched one-to-one (Group DETR); the first is kept")
    add_run_arguments(p, ckpt_every=500)
    p.add_argument("--init", help="start from these weights (e.g. an earlier run's model.pt) instead of random")
    p.add_argument("--backbone-from", help="initialise the ResNet backbone from this trained detector: a model "
                   "name with embedded weights (e.g. deformable_detr_tiny) or a checkpoint file")
    p.add_argument("--freeze-backbone", choices=STAGES, default=None,
                   help="no gradients to the backbone's stem through this stage (DETR: layer1)")
    p.set_defaults(func=run)


def add_run_arguments(p: argparse.ArgumentParser, ckpt_every: int) -> None:
    """What controls a run but not its data: --seed, --ckpt-every, --stop-after, --resume, --threads,
    --no-progress."""
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the data order and augmentation")
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resumable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in RUN (its files are removed)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true")


def add_data_arguments(p: argparse.ArgumentParser, outputs: str) -> None:
    """MODEL, --data, --out (a run folder holding checkpoints, log and ``outputs``) and what :func:`datasets`
    reads: --train-split, --val-split, --size, --augment."""
    p.add_argument("model", help="model name, e.g. detr_tiny")
    p.add_argument("--data", required=True, help="COCO folder (e.g. written by `fxq data synth`)")
    p.add_argument("--out", required=True, help=f"run folder (checkpoints, log, {outputs})")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--size", type=int, default=160, help="training/eval image size (shorter side)")
    p.add_argument("--augment", choices=("flip", "detr"), default="flip",
                   help="flip: horizontal flips only; detr: DETR's multi-scale resize and crop")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded (reports how many) instead of stopping")


#: Lower bounds of the options every training command shares (None = not given).
RUN_BOUNDS = {"epochs": 1, "batch_size": 1, "seed": 0, "ckpt_every": 0, "stop_after": 1, "threads": 1, "warmup": 0,
              "lr": 0.0, "lr_backbone": 0.0, "weight_decay": 0.0, "clip": 0.0, "cls_loss_coef": 0.0,
              "one_to_many": 1}


def check_run_arguments(args: argparse.Namespace) -> None:
    """The numeric options of a training command in range and --size large enough (no work done)."""
    from fxq.cli.checks import check_at_least, check_size

    check_at_least(args, RUN_BOUNDS)
    check_size(args.size)


def datasets(args: argparse.Namespace):
    """The train split (augmented as ``--augment``) and the val split of ``--data`` at ``--size`` (the longer
    side capped as DETR's, size * 1333 / 800), every image decoded once (see ``--skip-bad-images``)."""
    from fxq.data import CocoDetection, Compose, Normalize, RandomHorizontalFlip, Resize, eval_transforms
    from fxq.data import train_transforms as detr_transforms
    from fxq.data.transforms import default_max_size

    train_tf = (detr_transforms(args.size) if args.augment == "detr"
                else Compose([RandomHorizontalFlip(0.5), Resize(args.size, default_max_size(args.size)), Normalize()]))
    train = CocoDetection.from_folder(args.data, args.train_split, transforms=train_tf, seed=args.seed)
    val = CocoDetection.from_folder(args.data, args.val_split, transforms=eval_transforms(args.size))
    for split, dataset in ((args.train_split, train), (args.val_split, val)):
        verify_images(dataset, split, getattr(args, "skip_bad_images", False))
    return train, val


def verify_images(dataset, split: str, skip: bool) -> None:
    """Decode every image of ``dataset`` before work; with ``skip`` drop bad ones and say how many."""
    import sys

    skipped = dataset.verify_images(skip=skip)
    if skipped:
        print(f"skipped {skipped} of {skipped + len(dataset)} images of split {split!r} that cannot be decoded",
              file=sys.stderr)


def check_batches(train_set, batch_size: int, split: str) -> None:
    """InputError when ``batch_size`` exceeds the training images (incomplete batches are dropped: no step)."""
    from fxq.errors import InputError

    if batch_size > len(train_set):
        raise InputError(f"--batch-size {batch_size} is larger than the {len(train_set)} images of split {split!r}: "
                         "no full batch, no training step; lower --batch-size or add images")


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.cli.checks import check_input_file
    from fxq.data import collate
    from fxq.errors import InputError
    from fxq.evaluation import evaluate_model
    from fxq.io import write_atomic, write_json
    from fxq.models import build, config_of, read_state_dict
    from fxq.models.detr import TRAINING_ONLY
    from fxq.models.transfer import copy_backbone, freeze_backbone, source_state
    from fxq.objectives import build_criterion
    from fxq.train import TrainConfig
    from fxq.train.run_folder import claim_run_folder

    family, _ = config_of(args.model)
    check_run_arguments(args)
    if args.query_groups < 1:
        raise InputError(f"--query-groups {args.query_groups}: give 1 (plain DETR) or more groups")
    if args.query_groups > 1 and family != "detr":
        raise InputError(f"--query-groups {args.query_groups}: needs a DETR model, {args.model} is {family}")
    folder = claim_run_folder(args.out, vars(args), resume=args.resume, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    # a wrong backbone source or --init file fails before the datasets are read
    check_input_file(args.init, "--init")
    if args.backbone_from and Path(args.backbone_from).exists():  # a file, not a model name
        check_input_file(args.backbone_from, "--backbone-from")
    backbone = source_state(args.backbone_from) if args.backbone_from else None
    init_state = read_state_dict(args.init) if args.init else None
    train_set, val_set = datasets(args)
    check_batches(train_set, args.batch_size, args.train_split)
    groups = {"query_groups": args.query_groups} if args.query_groups > 1 else {}
    model = build(args.model, seed=args.seed, num_classes=train_set.num_classes, **groups).train()
    if args.init:
        load_init(model, args.init, args.model, init_state)
    if args.backbone_from:
        copy_backbone(model, args.backbone_from, backbone)
    if args.freeze_backbone:
        freeze_backbone(model, args.freeze_backbone)
    weights = {} if args.cls_loss_coef is None else {"loss_ce": args.cls_loss_coef}
    criterion = build_criterion(model.head, one_to_many=args.one_to_many, weights=weights)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      lr_backbone=args.lr if args.lr_backbone is None else args.lr_backbone,
                      weight_decay=args.weight_decay, clip_max_norm=args.clip, schedule=args.schedule,
                      warmup_steps=args.warmup, seed=args.seed, ckpt_every=args.ckpt_every,
                      stop_after=args.stop_after, progress=not args.no_progress)
    if not train_run(model, criterion, train_set, cfg, args, folder):
        return 0
    model.eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY)}
    write_atomic(f"{args.out}/model.pt", lambda f: torch.save(state, f), mode="wb")
    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate)
    metrics = evaluate_model(model, loader, val_set.coco, progress=not args.no_progress)
    metrics.pop("detections", None)
    write_json(f"{args.out}/eval.json", metrics)
    print(f"{args.model}: AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  "
          f"(split {args.val_split!r}, {metrics['num_images']} images)")
    return 0


def load_init(model, path: str, name: str, state: dict | None = None) -> None:
    """Load ``--init`` weights (``state``, read from ``path`` when not given) strictly, except that training-only
    weights the file lacks (a published model trained on with ``--query-groups``) keep their fresh
    initialisation."""
    from fxq.models import read_state_dict
    from fxq.models.checkpoint import check_compatible
    from fxq.models.detr import TRAINING_ONLY

    state = read_state_dict(path) if state is None else state
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINING_ONLY) and k not in state}
    state = {**fresh, **state}
    check_compatible(model, state, path, name)
    model.load_state_dict(state)


def train_run(model, criterion, train_set, cfg, args: argparse.Namespace, folder) -> bool:
    """Commit the checked run ``folder`` (:func:`fxq.train.run_folder.claim_run_folder`: ``RUN/config.json``) and
    train (resuming with ``--resume``); True when the run is complete and this process is rank 0, i.e. when the
    caller should write the final weights and evaluate."""
    from fxq.data import collate
    from fxq.train import train

    folder.commit(main=is_main())
    result = train(model, criterion, train_set, cfg, args.out, resume=args.resume, collate_fn=collate)
    return result.step >= cfg.epochs * (len(train_set) // cfg.batch_size) and is_main()


def is_main() -> bool:
    """Whether this is rank 0 (or not under torchrun)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
