"""Peers on the trained tiny models (issue 17, deliverable 3): the same network quantized by each tool, calibrated
on the same images, scored on the same images, each file run by its own runtime.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers_table.py
(≈ 10 min on 1 thread; writes benchmarks/results/peers.json and prints the markdown tables; the ONNX / IR files go
to runs/peers/<model>/). Latency at DETR-R50 size is `fxq bench`'s job (RESULTS.md, "Peers", the command there).

Rows, per model (both tiny models, their 160² input, embedded weights):
- ``fp32``: the float export, onnxruntime;
- ``ort-minmax`` / ``ort-entropy`` / ``ort-percentile``: onnxruntime ``quantize_static`` of that export (QDQ,
  per-channel s8 weights, u8 activations, after ``quant_pre_process``), one row per calibrator;
- ``nncf`` / ``nncf-transformer``: ``nncf.quantize`` of that export for OpenVINO (default and transformer model
  type), run by OpenVINO CPU;
- ``fxq-w8a8``: fxq W8A8 PTQ (min-max; heads float as fxq's default policy), lowered for ort-cpu;
- ``fxq-mixed``: fxq W4A8 base policy with the Fisher allocation (L_A traces on the calibration images) of weight
  bits from {4, 8} at an average of 5.0 bits, min-max calibration, lowered for ort-cpu;
- ``fxq-qat``: the 4-4-8 QAT+KD student of ``--qat-runs``/<model>/``--qat-run`` (default qat_kd) if that run exists,
  lowered for ort-cpu.
Calibration: the first 32 training images (batches of 8) for every tool. Validation: the first 250 validation images.
Columns: AP, AP50, critical AP (supercategory person), the file's bytes, the runtime; then each row vs ``fxq-w8a8``:
the AP difference with a paired bootstrap interval over the validation images (200 replicates, re-accumulating
COCOeval).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from common import ROOT, SessionDetector, loader, markdown, save

import fxq
from fxq.bench.nncf_quantize import nncf_quantize
from fxq.bench.ort_quantize import ort_quantize_static
from fxq.bench.suite import file_bytes
from fxq.cli.export import lower_checked
from fxq.data import resolve_categories
from fxq.evaluation import bootstrap_metrics, compare, evaluate_model
from fxq.passes import annotate_policy
from fxq.passes.allocate import allocate_bits
from fxq.passes.fisher import fisher_traces
from fxq.passes.quantize import quantize_annotated
from fxq.ptq import float_graph, quantize_ptq
from fxq.qat import load_run
from fxq.targets import target_profile

MODELS = ("detr_tiny", "deformable_detr_tiny")
METRICS = {"AP": "AP", "AP50": "AP50", "critical_AP": "critical_mAP"}
SIZE = 160


def _mixed(fgm, calib):
    gm = copy.deepcopy(fgm)
    annotate_policy(gm, "W4A8")
    fisher_traces(gm, calib, "overall", progress=False)
    used = allocate_bits(gm, (4, 8), 5.0, "avg_bits").info["used"]
    quantize_annotated(gm, calib, fgm, "minmax", target_profile("ort-cpu"), progress=False)
    return gm, used


def build_files(model: str, folder: Path, calib_loader, run: Path) -> dict[str, tuple[Path, str, dict]]:
    """{row: (file, provider, extra)} for every row of the module docstring that can be built."""
    folder.mkdir(parents=True, exist_ok=True)
    fgm = float_graph(fxq.models.build(model), (SIZE, SIZE))
    example = torch.zeros(1, 3, SIZE, SIZE)
    images = [batch[0] for batch in calib_loader]
    files = {}
    fp32 = folder / "fp32.onnx"
    lower_checked(fgm, example, fp32, None, opset=17)
    files["fp32"] = (fp32, "cpu", {})
    for method in ("minmax", "entropy", "percentile"):
        path = folder / f"ort-{method}.onnx"
        baseline = ort_quantize_static(fp32, path, images, "qdq", method)
        files[f"ort-{method}"] = (path, "cpu", {"preprocessed": baseline.preprocessed})
    for model_type, row in ((None, "nncf"), ("transformer", "nncf-transformer")):
        files[row] = (nncf_quantize(fp32, folder / f"{row}.xml", images, model_type), "openvino", {})
    w8 = quantize_ptq(fgm, calib_loader, "W8A8", "minmax", progress=False, target="ort-cpu")
    lower_checked(w8, example, folder / "fxq-w8a8.onnx", "ort-cpu")
    files["fxq-w8a8"] = (folder / "fxq-w8a8.onnx", "cpu", {})
    mixed, used = _mixed(fgm, calib_loader)
    lower_checked(mixed, example, folder / "fxq-mixed.onnx", "ort-cpu")
    files["fxq-mixed"] = (folder / "fxq-mixed.onnx", "cpu", {"avg_w_bits": round(used, 3)})
    if (run / "qat_model.pt").is_file():
        _, student = load_run(run)
        lower_checked(student, example, folder / "fxq-qat.onnx", "ort-cpu")
        files["fxq-qat"] = (folder / "fxq-qat.onnx", "cpu", {"run": str(run.relative_to(ROOT))})
    return files


def score(model: str, files: dict, val, critical: list[int], reps: int) -> list[dict]:
    """One row per file: metrics, bytes, runtime, and the AP difference vs fxq-w8a8 with its interval."""
    head = fxq.models.build(model).head
    gt = val.dataset.dataset.coco
    ids = [int(val.dataset.dataset.ids[i]) for i in val.dataset.indices]
    results, boot = {}, {}
    for name, (path, provider, extra) in files.items():
        metrics = evaluate_model(SessionDetector(path, provider, head), val, gt, critical, progress=False)
        boot[name] = bootstrap_metrics(gt, metrics["detections"], ids, METRICS, critical, reps, seed=0)
        results[name] = {"model": model, "row": name, "AP": metrics["AP"], "AP50": metrics["AP50"],
                         "critical_AP": metrics["critical_mAP"], "MB": round(file_bytes(path) / 2**20, 3),
                         "runtime": "openvino" if provider == "openvino" else "onnxruntime", **extra}
        print(f"{model} {name}: AP {metrics['AP']:.3f}", flush=True)
    for name, row in results.items():
        if name == "fxq-w8a8":
            row["AP vs fxq-w8a8"] = "-"
            continue
        d = compare(boot["fxq-w8a8"], boot[name])["AP"]
        row["AP vs fxq-w8a8"] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    return list(results.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--qat-runs", default=str(ROOT / "runs" / "qat2k"), help="folder of <model>/<--qat-run> QAT runs")
    p.add_argument("--qat-run", default="qat_kd", help="the QAT run (folder name) behind the fxq-qat row")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=250)
    p.add_argument("--reps", type=int, default=200, help="bootstrap replicates")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    calib = loader("train", args.calib_images, batch_size=8)
    val = loader("val", args.val_images, batch_size=16)
    critical = resolve_categories(val.dataset.dataset.ann_file, ["person"])
    rows = []
    for model in args.models:
        files = build_files(model, ROOT / "runs" / "peers" / model, calib, Path(args.qat_runs) / model / args.qat_run)
        rows += score(model, files, val, critical, args.reps)
    columns = ["model", "row", "runtime", "AP", "AP50", "critical_AP", "MB", "AP vs fxq-w8a8"]
    save(Path(args.out), rows, markdown(rows, columns), "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers_table.py "
         + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
