"""How far each student is from its float teacher, on foreground and background queries (the deformable KD
regression of issue 13): the PTQ student (4-4-8, lp:3 on 32 training images) and the finished 2000-step runs
``qat`` and ``qat_kd`` of deformable_detr_tiny, on the first 32 validation images. A query is foreground when the
teacher's largest class probability exceeds 0.3. Columns: class KL, box L1 and 1 − GIoU against the teacher
(:mod:`fxq.objectives.distill`'s terms, unweighted), over all, foreground and background queries.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_query_distances.py [--runs runs/qat2k] (≈ 20 s; needs the
runs of `RUNS=runs/qat2k STEPS=2000 EPOCHS=4 benchmarks/qat_runs.sh deformable_detr_tiny qat qat_kd`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import ROOT, loader, markdown, save

from fxq.objectives.distill import box_giou_loss, box_l1, class_kl
from fxq.qat import QATRecipe, load_run, student_and_teacher
from fxq.tracing import model_batch

MODEL = "deformable_detr_tiny"
FOREGROUND = 0.3


def distances(student, teacher_out: dict, inputs, foreground: torch.Tensor) -> dict:
    """Class KL, box L1 and 1 − GIoU of ``student`` against the teacher's outputs, per query group."""
    with torch.no_grad():
        out = student(*inputs)
    row = {}
    for part, sel in (("all", torch.ones_like(foreground)), ("fg", foreground), ("bg", ~foreground)):
        s_logits, t_logits = out["pred_logits"][sel], teacher_out["pred_logits"][sel]
        s_boxes, t_boxes = out["pred_boxes"][sel], teacher_out["pred_boxes"][sel]
        row[f"{part} class KL"] = class_kl(s_logits, t_logits, "sigmoid").item()
        row[f"{part} L1"] = box_l1(s_boxes, t_boxes).item()
        row[f"{part} 1-GIoU"] = box_giou_loss(s_boxes, t_boxes).item()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "qat2k")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kd_query_distances.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ptq, teacher, _ = student_and_teacher(QATRecipe(MODEL), loader("train", 32, batch_size=8))
    students = {"ptq": ptq.eval()} | {name: load_run(args.runs / MODEL / name)[1] for name in ("qat", "qat_kd")}
    inputs = model_batch(teacher, next(iter(loader("val", 32, batch_size=32)))).inputs
    with torch.no_grad():
        teacher_out = teacher.eval()(*inputs)
    foreground = teacher_out["pred_logits"].sigmoid().amax(-1) > FOREGROUND
    rows = [{"student": name, **distances(s, teacher_out, inputs, foreground)} for name, s in students.items()]
    share = f"foreground queries: {foreground.float().mean().item():.3f} of {foreground.numel()}"
    save(Path(args.out), [{"foreground_share": foreground.float().mean().item(), "rows": rows}],
         share + "\n\n" + markdown(rows, list(rows[0])),
         "OMP_NUM_THREADS=1 python benchmarks/kd_query_distances.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
