"""Why a detector does not learn classes: matched-query class accuracy and a linear probe of backbone features.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/class_probe.py MODEL WEIGHTS [--images N]
WEIGHTS: a training run's checkpoint.pt or model.pt, or a plain state_dict (e.g. fxq/weights/<name>.pt).

Prints, on the first --images synthetic validation images, the fraction of Hungarian-matched queries whose
top class is the ground truth, and, on the first --probe-images training images, the held-out accuracy of a
linear classifier (Adam, 300 steps, 80/20 split) on the projected backbone feature at each object's centre.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import loader

import fxq
from fxq.models import read_state_dict
from fxq.models.transfer import copy_backbone
from fxq.objectives import HungarianMatcher


def matched_accuracy(model: torch.nn.Module, images: int) -> float:
    """Fraction of matched queries whose highest-scoring class is the ground-truth class."""
    matcher, hits = HungarianMatcher(head=model.head), []
    with torch.no_grad():
        for batch, _, targets in loader("val", images):
            out = model(batch)
            for b, (queries, gt) in enumerate(matcher(out, targets)):
                logits = out["pred_logits"][b, queries]
                logits = logits[:, :-1] if model.head == "softmax" else logits
                hits += (logits.argmax(-1) == targets[b]["labels"][gt]).tolist()
    return sum(hits) / max(1, len(hits))


def centre_features(model: torch.nn.Module, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_proj(backbone) features at every ground-truth box centre, and the boxes' labels."""
    feats, labels = [], []
    with torch.no_grad():
        for batch, _, targets in loader("train", images):
            features, _, _ = model.backbone(batch, None)
            proj = model.input_proj(features[-1])
            h, w = proj.shape[-2:]
            for b, t in enumerate(targets):
                for box, label in zip(t["boxes"], t["labels"], strict=True):
                    x, y = min(int(box[0] * w), w - 1), min(int(box[1] * h), h - 1)
                    feats.append(proj[b, :, y, x])
                    labels.append(int(label))
    return torch.stack(feats), torch.tensor(labels)


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int = 0) -> float:
    """Held-out accuracy (last 20%) of a linear classifier trained on the first 80%."""
    torch.manual_seed(seed)
    split = int(0.8 * len(y))
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[:split]), y[:split]).backward()
        opt.step()
    return (head(x[split:]).argmax(-1) == y[split:]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("weights", help="checkpoint.pt / model.pt / state_dict; with --backbone-only only its backbone")
    p.add_argument("--backbone-only", action="store_true", help="take only the backbone from WEIGHTS (random rest)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--probe-images", type=int, default=400)
    args = p.parse_args()
    torch.manual_seed(0)
    model = fxq.models.build(args.model, pretrained=False)
    if args.backbone_only:
        copy_backbone(model, args.weights)
    else:
        model.load_state_dict(read_state_dict(args.weights))
    model.eval()
    x, y = centre_features(model, args.probe_images)
    result = {"model": args.model, "weights": args.weights, "backbone_only": args.backbone_only,
              "matched_class_accuracy": None if args.backbone_only else round(matched_accuracy(model, args.images), 3),
              "linear_probe_accuracy": round(linear_probe(x, y, model.num_classes), 3), "objects": len(y)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
