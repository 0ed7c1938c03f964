"""Time and peak memory of one training step: float training, QAT (4-4-8, LSQ), and QAT with each loss term: the
Fisher-trace regularizer (reg; reg4 / reg8: lazy, every 4 / 8 steps at 4 / 8 times the weight), KD (kd),
Q-DETR's distribution alignment + DRD (drd), AQ-DETR's auxiliary query group + encoder attention distillation (aq),
and drd+aq (issues 13 and 14, deliver 6: the per-step cost of each term).

Run: .venv/bin/python benchmarks/qat_step_speed.py [--models detr_tiny deformable_detr_tiny detr_r50] [--rounds 2]
[--steps 3] [--modes float qat ...]
Each (model, mode) runs in its own process (peak RSS is per process); the modes are interleaved round by round,
so drift on this shared machine hits them alike, and the table reports the median step time and ratios (for a
lazy regularizer the mean over whole periods of K steps: its amortized cost).
The tiny models: batch 8 at 160², embedded weights; detr_r50: batch 1 at 512², random weights. Random images with
random boxes stand in for data (the step's cost does not depend on what the images show).
Writes benchmarks/results/qat_step_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, markdown, save

SETTINGS = {"detr_tiny": (8, 160), "deformable_detr_tiny": (8, 160), "detr_r50": (1, 512)}
MODES = ("float", "qat", "qat+reg", "qat+reg4", "qat+reg8", "qat+kd", "qat+drd", "qat+aq", "qat+drd+aq")


def _batch(batch: int, size: int, num_classes: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = [{"boxes": torch.rand(3, 4, generator=g) * 0.5 + 0.25,
                "labels": torch.randint(0, num_classes, (3,), generator=g)} for _ in range(batch)]
    return images, targets


def worker(model_name: str, mode: str, steps: int) -> dict:
    """Median seconds per optimizer step and peak RSS (MiB) of ``mode`` on ``model_name``."""
    import fxq
    from fxq.objectives import QATLoss, build_criterion
    from fxq.passes.distribution_alignment import align_queries
    from fxq.passes.prepare_qat import prepare_qat
    from fxq.ptq import float_graph
    from fxq.qat import QATCriterion, QATModule, qat_loss

    batch, size = SETTINGS[model_name]
    model = fxq.models.build(model_name, seed=0)
    float_gm = float_graph(model, (size, size))
    images, targets = _batch(batch, size, float_gm.num_classes)
    methods = mode.split("+")[1:]
    reg = next((m for m in methods if m.startswith("reg")), None)
    every = int(reg[3:] or 1) if reg else 1
    if mode == "float":
        net, loss_fn = float_gm, QATCriterion(QATLoss(build_criterion(float_gm.head, aux=False)))
    else:
        student = prepare_qat(float_gm, [images[:1]], "4-4-8", init="minmax").gm
        if "drd" in methods:
            align_queries(student, images[:1])
        distill = [m for m in methods if m != reg]
        options = {"distill": "+".join(distill) or None, "fisher_reg": 1e-3 if reg else 0.0, "fisher_every": every}
        net = QATModule(student, float_gm if distill else None, train_outputs=bool({"drd", "aq"} & set(distill)),
                        query_groups=2 if "aq" in distill else 1)
        loss_fn = QATCriterion(qat_loss(student, options, [1]))
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for step in range(every * -(-steps // every) + 1):  # step 0 (a regularized one) warms up, then whole periods
        start = time.perf_counter()
        loss = loss_fn(net(images), targets, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    average = statistics.mean if every > 1 else statistics.median
    return {"model": model_name, "mode": mode, "step_s": average(times[1:]),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat_step_speed.json"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for model in args.models:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", model, mode, "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.setdefault((model, mode), []).append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for model in args.models:
        base = statistics.median(r["step_s"] for r in runs[(model, "float")])
        qat = statistics.median(r["step_s"] for r in runs[(model, "qat")])
        for mode in args.modes:
            step = statistics.median(r["step_s"] for r in runs[(model, mode)])
            rows.append({"model": model, "mode": mode, "step_s": step, "x_float": step / base,
                         "x_qat": step / qat, "peak_mib": max(r["peak_mib"] for r in runs[(model, mode)])})
    save(Path(args.out), rows,
         markdown(rows, ["model", "mode", "step_s", "x_float", "x_qat", "peak_mib"]),
         "python benchmarks/qat_step_speed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
