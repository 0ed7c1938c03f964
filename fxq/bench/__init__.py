"""Benchmarking above the backends (imported as ``fxq.bench``): latency measurement and profiles
(:mod:`.timing`), the ``fxq bench`` rows run side by side (:mod:`.suite`), onnxruntime's own quantization as a
peer baseline (:mod:`.ort_quantize`), and writing the results (:mod:`.results`).

The lowering layer (:mod:`fxq.backends`) never imports this package.
"""

from fxq.bench.ort_quantize import QuantizedBaseline, ort_quantize_static
from fxq.bench.results import markdown_table, write_results
from fxq.bench.suite import ROWS, BenchConfig, bench_images, check_rows, run_bench
from fxq.bench.timing import NodeTime, Timing, latency_table, profile_onnx, time_onnx, time_torch

__all__ = [
    "ROWS",
    "BenchConfig",
    "NodeTime",
    "QuantizedBaseline",
    "Timing",
    "bench_images",
    "check_rows",
    "latency_table",
    "markdown_table",
    "ort_quantize_static",
    "profile_onnx",
    "run_bench",
    "time_onnx",
    "time_torch",
    "write_results",
]
