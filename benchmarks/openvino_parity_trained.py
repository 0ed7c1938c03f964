"""OpenVINO vs onnxruntime on the trained deformable_detr_tiny (issue 17): the same fxq W8A8 file (min-max PTQ on
32 training images, lowered for ``openvino``) run by both runtimes; max / mean |Δ logits| and max |Δ boxes| between
each runtime and the fake-quant graph (and between the runtimes) on 8 validation images, and the AP of each on the
first 250 validation images, with a paired bootstrap interval (200 replicates) of each difference.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openvino_parity_trained.py (≈ 3 min on 1 thread; writes
benchmarks/results/openvino_parity_trained.json; the ONNX file goes to runs/peers/openvino_parity/).
"""

from __future__ import annotations

import sys

import torch
from common import ROOT, SessionDetector, loader, markdown, save

import fxq
from fxq.backends import OrtSession
from fxq.backends.openvino_session import OpenVinoSession
from fxq.cli.export import lower_checked
from fxq.evaluation import bootstrap_metrics, compare, evaluate_model
from fxq.ptq import float_graph, quantize_ptq

MODEL = "deformable_detr_tiny"
PATH = ROOT / "runs" / "peers" / "openvino_parity" / f"{MODEL}-w8a8.onnx"
OUT = ROOT / "benchmarks" / "results" / "openvino_parity_trained.json"


def output_differences(gm, images: torch.Tensor) -> list[dict]:
    """|Δ| between the fake-quant graph, onnxruntime and OpenVINO on ``images``."""
    with torch.no_grad():
        outputs = {"fake-quant": gm(images)}
    outputs["onnxruntime"] = OrtSession(PATH, threads=1).run(images)
    outputs["openvino"] = OpenVinoSession(PATH, threads=1).run(images)
    rows = []
    for a, b in (("onnxruntime", "fake-quant"), ("openvino", "fake-quant"), ("openvino", "onnxruntime")):
        logits = (outputs[a]["pred_logits"] - outputs[b]["pred_logits"]).abs()
        boxes = (outputs[a]["pred_boxes"] - outputs[b]["pred_boxes"]).abs()
        rows.append({"pair": f"{a} vs {b}", "max abs Δ logits": logits.max().item(),
                     "mean abs Δ logits": logits.mean().item(), "max abs Δ boxes": boxes.max().item()})
    return rows


def accuracy(gm, val) -> list[dict]:
    """AP of the fake-quant graph and of the file on each runtime, each vs onnxruntime with its interval."""
    gt = val.dataset.dataset.coco
    images = sorted(int(i) for i in gt.getImgIds())[: len(val.dataset)]
    runners = {"fake-quant": gm, "onnxruntime": SessionDetector(PATH, "cpu", gm.head),
               "openvino": SessionDetector(PATH, "openvino", gm.head)}
    boot, aps = {}, {}
    for name, runner in runners.items():
        metrics = evaluate_model(runner, val, gt, progress=False)
        aps[name] = metrics["AP"]
        boot[name] = bootstrap_metrics(gt, metrics["detections"], images, {"AP": "AP"}, reps=200, seed=0)
    rows = []
    for name in runners:
        diff = compare(boot["onnxruntime"], boot[name])["AP"]
        rows.append({"run by": name, "AP": aps[name], "vs onnxruntime": diff["diff"],
                     "95% interval": f"[{diff['lo']:+.3f}, {diff['hi']:+.3f}]"})
    return rows


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    PATH.parent.mkdir(parents=True, exist_ok=True)
    fgm = float_graph(fxq.models.build(MODEL), (160, 160))
    gm = quantize_ptq(fgm, loader("train", 32, batch_size=8), "W8A8", "minmax", progress=False, target="openvino")
    lower_checked(gm, torch.randn(1, 3, 160, 160), str(PATH), "openvino")
    val = loader("val", 250)
    diffs = output_differences(gm, next(iter(val))[0][:8])
    aps = accuracy(gm, val)
    table = markdown(diffs, list(diffs[0])) + "\n\n" + markdown(aps, list(aps[0]))
    save(OUT, [{"differences": diffs, "accuracy": aps}], table,
         "OMP_NUM_THREADS=1 python benchmarks/openvino_parity_trained.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
