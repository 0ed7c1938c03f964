"""``fxq pretrain MODEL --data DIR --out RUN``: pretrain a detector's ResNet backbone on the boxes, CenterNet-like.

The role ImageNet weights play for DETR: a from-scratch DETR on the synthetic set learns boxes but hardly
classes. A :class:`~fxq.models.centre_pretrainer.CentrePretrainer` (MODEL's ResNet body with 1×1 heads) learns
to name every training object from the logits at its box centre, to mark object centres and to read the box size
there (:func:`fxq.objectives.centre.centre_loss`), on whole training images at the detector's input size.
Writes ``RUN/backbone.pt`` (the body under the detector's names; pass it to ``fxq train MODEL --backbone-from
RUN/backbone.pt``), ``RUN/eval.json`` (centre accuracy on the val split),
and the trainer's ``checkpoint.pt`` / ``log.jsonl`` / ``config.json``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from fxq.cli.train import add_data_arguments, add_run_arguments

    p = sub.add_parser("pretrain", help="pretrain a detector's backbone on object classes, centres and sizes",
                       description="Pretrain MODEL's ResNet body on DATA's train split (object classification at "
                       "centres, with their sizes); evaluate on its val split.")
    add_data_arguments(p, "backbone.pt")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    add_run_arguments(p, ckpt_every=500)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fxq.cli.train import check_batches, check_run_arguments, datasets, train_run
    from fxq.io import write_atomic, write_json
    from fxq.models import build, config_of
    from fxq.models.centre_pretrainer import CentrePretrainer
    from fxq.objectives.centre import centre_loss
    from fxq.train import TrainConfig
    from fxq.train.run_folder import claim_run_folder

    config_of(args.model)
    check_run_arguments(args)
    folder = claim_run_folder(args.out, vars(args), resume=args.resume, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, val_set = datasets(args)
    check_batches(train_set, args.batch_size, args.train_split)
    detector = build(args.model, pretrained=False, seed=args.seed, num_classes=train_set.num_classes)
    model = CentrePretrainer(detector.backbone[0].body, train_set.num_classes).train()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_backbone=args.lr,
                      weight_decay=args.weight_decay, clip_max_norm=0.0, schedule="cosine",
                      warmup_steps=args.warmup, seed=args.seed, ckpt_every=args.ckpt_every,
                      stop_after=args.stop_after, progress=not args.no_progress)
    if not train_run(model, centre_loss, train_set, cfg, args, folder):
        return 0
    model.eval()
    write_atomic(f"{args.out}/backbone.pt", lambda f: torch.save(model.backbone_state(), f), mode="wb")
    accuracy, objects = centre_accuracy(model, val_set)
    write_json(f"{args.out}/eval.json", {"centre_accuracy": accuracy, "objects": objects, "split": args.val_split})
    print(f"{args.model} backbone: centre accuracy {accuracy:.3f} on {objects} objects (split {args.val_split!r})")
    return 0


def centre_accuracy(model, dataset, batch_size: int = 16) -> tuple[float, int]:
    """Fraction of ``dataset``'s objects whose centre logits name their category, and the object count."""
    import torch

    from fxq.data import collate
    from fxq.objectives.centre import centre_values

    hits = total = 0
    with torch.no_grad():
        for images, mask, targets in torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                                 collate_fn=collate):
            logits, labels = centre_values(model(images, mask)["class_map"], targets)
            hits, total = hits + int((logits.argmax(1) == labels).sum()), total + len(labels)
    return hits / max(1, total), total
