"""ORT CPU latency of fxq's W8A8 ort-cpu file with and without the linears' bias folded into MatMulIntegerToFloat
(backends/matmul_bias.py; issue 18: the float Add that onnxruntime leaves after each fused quantized linear).

Run: .venv/bin/python benchmarks/matmul_bias_speed.py [--models deformable_detr_r50 detr_r50] [--size 512]
[--threads 1] [--runs 12] [--rounds 6]

Per model (random weights, seed 0): one W8A8 graph quantized for ort-cpu (min-max on two random images: kernel
speed does not depend on the values), lowered twice by lower_for_runtime, with the profile's ``fused_matmul_bias``
off ("bias Add") and on ("folded"). Both files are timed in one process, interleaved round by round, so drift on
this shared machine hits them alike; the table gives medians, the ratio, the max |Δ| of the outputs and the float
Add kernel time of one profiled run each. Writes benchmarks/results/matmul_bias_speed.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, markdown, save

import fxq
from fxq.backends import OrtSession, lower_for_runtime, runtime_capabilities
from fxq.bench.timing import op_times, profile_onnx, time_onnx_interleaved
from fxq.ptq import float_graph, quantize_ptq


def _files(model: str, size: int, folder: Path) -> tuple[dict[str, Path], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(1, 3, size, size, generator=g) for _ in range(2)]
    gm = quantize_ptq(float_graph(fxq.models.build(model, seed=0), (size, size)), calib, "W8A8", progress=False,
                      target="ort-cpu")
    paths = {"bias Add": folder / f"{model}-add.onnx", "folded": folder / f"{model}-folded.onnx"}
    plain = dataclasses.replace(runtime_capabilities("ort-cpu"), fused_matmul_bias=False)
    lower_for_runtime(gm, calib[0], paths["bias Add"], plain, verify=False)
    lower_for_runtime(gm, calib[0], paths["folded"], "ort-cpu", verify=False)
    return paths, calib[1]


def _rows(model: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    paths, image = _files(model, args.size, folder)
    timings = time_onnx_interleaved(paths, image, threads=args.threads, warmup=2, runs=args.runs, rounds=args.rounds)
    outs = {name: OrtSession(path, threads=args.threads).run(image) for name, path in paths.items()}
    delta = max((outs["folded"][k] - outs["bias Add"][k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))
    base = timings["bias Add"].median_ms
    rows = []
    for name, path in paths.items():
        add_ms = op_times(profile_onnx(path, image, threads=args.threads, runs=2)).get("Add", 0.0)
        rows.append({"model": model, "file": name, "median_ms": timings[name].median_ms,
                     "p10_ms": timings[name].p10_ms, "p90_ms": timings[name].p90_ms,
                     "speedup": base / timings[name].median_ms, "add_ms": add_ms, "max_abs_diff": delta})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["deformable_detr_r50", "detr_r50"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "matmul_bias_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for model in args.models for row in _rows(model, args, Path(tmp))]
    columns = ["model", "file", "median_ms", "p10_ms", "p90_ms", "speedup", "add_ms", "max_abs_diff"]
    save(Path(args.out), rows, markdown(rows, columns),
         "python benchmarks/matmul_bias_speed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
