"""``fxq train MODEL --data DIR --out RUN``: train a detector on a COCO-format folder, then evaluate it.

Writes ``RUN/checkpoint.pt`` (resumable), ``RUN/log.jsonl``, ``RUN/config.json``, and at the end
``RUN/model.pt`` (the weights, a plain state_dict) and ``RUN/eval.json`` (pycocotools metrics on the val split).
Works under ``torchrun --nproc_per_node N`` (gloo on CPU).
"""

from __future__ import annotations

import argparse

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


def datasets(args: argparse.Namespace):
    """The train split (augmented as ``--augment``) and the val split of ``--data`` at ``--size``."""
    from fxq.data import CocoDetection, Compose, Normalize, RandomHorizontalFlip, Resize, eval_transforms
    from fxq.data import train_transforms as detr_transforms

    train_tf = (detr_transforms(args.size) if args.augment == "detr"
                else Compose([RandomHorizontalFlip(0.5), Resize(args.size), Normalize()]))
    train = CocoDetection.from_folder(args.data, args.train_split, transforms=train_tf, seed=args.seed)
    val = CocoDetection.from_folder(args.data, args.val_split, transforms=eval_transforms(args.size))
    return train, val


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.data import collate
    from fxq.errors import InputError
    from fxq.evaluation import evaluate_model
    from fxq.io import write_atomic, write_json
    from fxq.models import build, config_of
    from fxq.models.detr import TRAINING_ONLY
    from fxq.models.transfer import copy_backbone, freeze_backbone, source_state
    from fxq.objectives import build_criterion
    from fxq.train import TrainConfig

    family, _ = config_of(args.model)
    if args.query_groups < 1:
        raise InputError(f"--query-groups {args.query_groups}: give 1 (plain DETR) or more groups")
    if args.query_groups > 1 and family != "detr":
        raise InputError(f"--query-groups {args.query_groups}: needs a DETR model, {args.model} is {family}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # a wrong backbone source fails before the datasets are read
    backbone = source_state(args.backbone_from) if args.backbone_from else None
    train_set, val_set = datasets(args)
    groups = {"query_groups": args.query_groups} if args.query_groups > 1 else {}
    model = build(args.model, seed=args.seed, num_classes=train_set.num_classes, **groups).train()
    if args.init:
        load_init(model, args.init, args.model)
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
    if not train_run(model, criterion, train_set, cfg, args):
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


def load_init(model, path: str, name: str) -> None:
    """Load ``--init`` weights strictly, except that training-only weights the file lacks (a published model
    trained on with ``--query-groups``) keep their fresh initialisation."""
    from fxq.models import read_state_dict
    from fxq.models.checkpoint import check_compatible
    from fxq.models.detr import TRAINING_ONLY

    state = read_state_dict(path)
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINING_ONLY) and k not in state}
    state = {**fresh, **state}
    check_compatible(model, state, path, name)
    model.load_state_dict(state)


def train_run(model, criterion, train_set, cfg, args: argparse.Namespace) -> bool:
    """Write ``RUN/config.json`` and train (resuming with ``--resume``); True when the run is complete and this
    process is rank 0, i.e. when the caller should write the final weights and evaluate."""
    from fxq.data import collate
    from fxq.io import write_json
    from fxq.train import train

    write_json(f"{args.out}/config.json", {"argv": {k: v for k, v in vars(args).items() if k != "func"}})
    result = train(model, criterion, train_set, cfg, args.out, resume=args.resume, collate_fn=collate)
    return result.step >= cfg.epochs * (len(train_set) // cfg.batch_size) and is_main()


def is_main() -> bool:
    """Whether this is rank 0 (or not under torchrun)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
