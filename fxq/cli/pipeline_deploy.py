"""The deployment stages of ``fxq pipeline``: runtime-aware ONNX export, ORT parity on the validation images, and
the latency of the float and the quantized file on this machine.

Artifacts (JSON written atomically into the run folder; an ONNX file is removed if its export fails, is
interrupted or gives NaN/inf outputs): ``model_fp32.onnx`` and ``model_quant.onnx``;
``export.json`` (the lowering report: quantized nodes, the kernel each runs on, file sizes); ``parity.json`` (the
quantized ONNX file run by onnxruntime on the evaluation images against the fake-quant graph: the largest
|Δ| of logits and boxes over the images, and the COCO metrics of onnxruntime's detections, so the AP the
deployable file gets sits beside the graph's); ``latency.json`` (both files timed in interleaved rounds at batch
1 on the run's input size: median, p90, mean and min, and the speed-up of medians; then each profiled by
onnxruntime: kernel milliseconds per op type and the slowest nodes).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from fxq.cli.run_artifacts import EXPORT, LATENCY, ONNX_FP32, ONNX_QUANT, PARITY, write_eval
from fxq.io import write_json

#: Profiled runs of each ONNX file for the per-op-type latency (after one warm-up run).
PROFILE_RUNS = 5


class OrtDetector(nn.Module):
    """An ONNX detector run by onnxruntime behind a module's call, for :func:`fxq.evaluation.evaluate_model`;
    each call also runs ``reference`` on the same images and keeps the largest |Δ| of every output in
    ``max_abs_diff``."""

    takes_mask = False

    def __init__(self, path: Path, reference: nn.Module, threads: int | None = None) -> None:
        super().__init__()
        from fxq.backends import OrtSession

        self.session, self.head = OrtSession(path, threads=threads), reference.head
        self.reference = [reference]  # a list: not a submodule, so evaluation's weight checks see ORT only
        self.max_abs_diff = {"pred_logits": 0.0, "pred_boxes": 0.0}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        got, expected = self.session.run(images), self.reference[0](images)
        for key, largest in self.max_abs_diff.items():
            self.max_abs_diff[key] = max(largest, float((got[key] - expected[key]).abs().max()))
        return got


def export_stage(out: Path, run_id: str, fgm, qgm, size: int, runtime: str | None) -> dict:
    """Lower the float and the quantized graph; write export.json; its record."""
    from fxq.cli.export import lower_checked

    example = torch.zeros(1, 3, size, size)
    start = time.perf_counter()
    lower_checked(fgm, example, out / ONNX_FP32, None, opset=17)
    report = lower_checked(qgm, example, out / ONNX_QUANT, runtime)
    record = {"run_id": run_id, "runtime": runtime, "seconds": round(time.perf_counter() - start, 1),
              "fp32_bytes": (out / ONNX_FP32).stat().st_size, "quant_bytes": (out / ONNX_QUANT).stat().st_size,
              "report": report.to_dict()}
    write_json(out / EXPORT, record)
    return record


def parity_stage(out: Path, run_id: str, qgm, loader, ds, critical, threads: int | None = None,
                 progress: bool = False) -> dict:
    """The quantized ONNX file against the fake-quant graph on ``loader``'s images; write parity.json."""
    from fxq.evaluation import evaluate_model

    session = OrtDetector(out / ONNX_QUANT, qgm, threads)
    start = time.perf_counter()
    metrics = evaluate_model(session, loader, ds.coco, critical_ids=critical, progress=progress)
    record = {"run_id": run_id, "graph": "onnxruntime, quantized ONNX", "max_abs_diff": session.max_abs_diff,
              "eval_seconds": round(time.perf_counter() - start, 1)}
    write_eval(out, PARITY, record, metrics)
    return {**record, "AP": metrics["AP"], "critical_AP": metrics["critical_mAP"] or 0.0}


def latency_stage(out: Path, run_id: str, size: int, runs: int, threads: int | None) -> dict:
    """Time the two ONNX files in interleaved rounds at batch 1, then profile each; write latency.json."""
    from fxq.bench.timing import time_onnx_interleaved

    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    paths = {"fp32": out / ONNX_FP32, "quantized": out / ONNX_QUANT}
    timings = time_onnx_interleaved(paths, images, threads=threads, warmup=2, runs=runs, rounds=max(1, runs // 2))
    rows = {name: timing.to_dict() for name, timing in timings.items()}
    record = {"run_id": run_id, "threads": threads, "batch": 1, "size": [size, size], "rows": rows,
              "speedup": round(rows["fp32"]["median_ms"] / rows["quantized"]["median_ms"], 3),
              "profile": {name: _profile(path, images, threads) for name, path in paths.items()}}
    write_json(out / LATENCY, record)
    return record


def _profile(path: Path, images: torch.Tensor, threads: int | None, slowest: int = 12) -> dict:
    """onnxruntime's per-node kernel times of ``path`` (mean of 5 profiled runs): milliseconds per op type, the
    ``slowest`` nodes, and their sum beside the profiled total."""
    from collections import defaultdict

    from fxq.bench.timing import profile_onnx

    nodes = profile_onnx(path, images, threads=threads, runs=PROFILE_RUNS, warmup=1)
    by_op: dict[str, float] = defaultdict(float)
    for node in nodes:
        by_op[node.op] += node.ms
    return {"runs": PROFILE_RUNS, "kernel_ms": round(sum(n.ms for n in nodes), 3),
            "by_op": {op: round(ms, 3) for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "slowest": [{"node": n.node, "op": n.op, "ms": round(n.ms, 3)} for n in nodes[:slowest]]}
