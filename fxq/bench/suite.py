"""One benchmark run: every requested model variant of one network timed side by side on the same real images,
with file sizes, the integer kernels onnxruntime runs, per-node profiles, and optionally the allocation's
latency table.

The rows (:data:`ROWS`), all built from one float graph and one set of real images:

- ``torch``: the eager PyTorch model, fp32;
- ``ort-fp32``: the float graph exported to ONNX;
- ``ort-qdq`` / ``ort-qoperator``: onnxruntime's ``quantize_static`` of that export (:mod:`fxq.bench.ort_quantize`);
- ``fxq-int8``: fxq W8A8, quantized for the runtime by :func:`fxq.ptq.quantize_ptq` (``target=``) and lowered by
  :func:`fxq.backends.runtime_lower.lower_for_runtime`;
- ``fxq-mixed``: fxq W4A8 (4-bit weights; the stem conv, attention matmuls and activations at 8 bits; heads
  float — :data:`fxq.passes.policy.DEFAULT_OVERRIDES`), same preparation;
- ``fxq-int8-plain``: fxq W8A8, the plain recipe through the plain QDQ lowering, for comparison;
- ``openvino-fp32`` / ``openvino-fxq-int8``: the float export, and fxq W8A8 quantized and lowered for the
  ``openvino`` target, run by OpenVINO CPU (fp32 float layers) instead of onnxruntime — timed in the same turns
  as the other rows, not profiled (needs ``pip install openvino``);
- ``openvino-nncf``: NNCF's ``nncf.quantize`` of the float export (transformer model type) as OpenVINO IR, run
  by OpenVINO (:mod:`fxq.bench.nncf_quantize`; needs ``pip install nncf``), timed like the other OpenVINO rows.

The "integer kernels" column counts the op types of the runtime's profile
(:attr:`fxq.targets.TargetProfile.integer_kernels`) in the graph onnxruntime runs.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from fxq.backends.capabilities import runtime_of_provider
from fxq.backends.fusion_probes import optimized_model
from fxq.backends.lower_qdq import lower_to_onnx
from fxq.backends.node_map import float_node_names
from fxq.backends.openvino_facts import layer_counts
from fxq.backends.openvino_session import openvino_version, require_openvino
from fxq.backends.runtime_lower import lower_for_runtime
from fxq.bench.nncf_quantize import ir_bytes, nncf_quantize, require_nncf
from fxq.bench.ort_quantize import ort_quantize_static
from fxq.bench.timing import (
    fx_node_ms,
    in_fresh_process,
    latency_table,
    measure_models,
    op_times,
    profile_onnx,
    time_onnx_interleaved,
    time_torch,
)
from fxq.data import CocoDetection, eval_transforms
from fxq.errors import InputError
from fxq.machine import machine_name
from fxq.models import build as build_model
from fxq.passes.policy import DEFAULT_OVERRIDES, set_weight_bits
from fxq.passes.precision import annotated_copy
from fxq.passes.quantize import quantize_annotated
from fxq.passes.sensitivity import FLOAT_BITS
from fxq.passes.weights import weight_nodes, weight_of
from fxq.ptq import float_graph, quantize_ptq
from fxq.targets import TARGETS, target_profile

ROWS = ("torch", "ort-fp32", "ort-qdq", "ort-qoperator", "fxq-int8", "fxq-mixed", "fxq-int8-plain", "openvino-fp32",
        "openvino-fxq-int8", "openvino-nncf")
POLICIES = {"fxq-int8": "W8A8", "fxq-mixed": "W4A8", "fxq-int8-plain": "W8A8", "openvino-fxq-int8": "W8A8"}
#: Rows run by OpenVINO (the others by onnxruntime on the configured provider).
OPENVINO_ROWS = ("openvino-fp32", "openvino-fxq-int8", "openvino-nncf")
#: The allocation's latency table measures each node at each bit-width: no node is pinned to 8 bits.
TABLE_OVERRIDES = {pattern: policy for pattern, policy in DEFAULT_OVERRIDES.items() if policy is None}


def check_rows(rows: Sequence[str]) -> list[str]:
    """The requested rows in canonical order; InputError naming the known ones for an unknown row."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise InputError(f"unknown bench row(s) {unknown or rows}; choose from {', '.join(ROWS)}")
    if any(r in OPENVINO_ROWS for r in rows):
        require_openvino()
    if "openvino-nncf" in rows:
        require_nncf()
    return [r for r in ROWS if r in rows]


def bench_images(folder: str | os.PathLike, size: tuple[int, int], count: int) -> torch.Tensor:
    """``count`` images [count, 3, H, W] of a COCO folder: normalised, resized to fit H×W, zero-padded."""
    h, w = size
    data = CocoDetection.from_folder(folder, transforms=eval_transforms(min(h, w), max(h, w)))
    if len(data) == 0:
        raise InputError(f"{os.fspath(folder)!r} holds no images; give a COCO folder with images")
    out = torch.zeros(count, 3, h, w)
    for i in range(count):
        image, _ = data[i % len(data)]
        scale = min(h / image.shape[1], w / image.shape[2], 1.0)
        if scale < 1.0:
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
        out[i, :, : image.shape[1], : image.shape[2]] = image[:, :h, :w]
    return out


@dataclass
class BenchConfig:
    """What to measure: the network, input size, threads, provider, runs, rows, and where files go.

    ``isolate``: time and profile the ONNX models in fresh processes (see
    :func:`fxq.bench.timing.in_fresh_process`); the torch row runs in this process. ONNX rows are timed in
    ``rounds`` turns (:func:`fxq.bench.timing.time_onnx_interleaved`).
    """

    model: str
    images: str
    size: tuple[int, int] = (512, 512)
    threads: int = 2
    provider: str = "cpu"
    warmup: int = 5
    runs: int = 20
    calib_images: int = 8
    profile_runs: int = 5
    rows: Sequence[str] = ("torch", "ort-fp32", "ort-qdq", "ort-qoperator", "fxq-int8", "fxq-mixed")
    checkpoint: str | None = None
    work_dir: str | None = None
    latency_bits: Sequence[int] = ()
    latency_policy: str = "W8A8"
    top_nodes: int = 15
    seed: int = 0
    isolate: bool = True
    rounds: int = 5
    log: Callable[[str], None] = field(default=lambda message: None)


def _kernels(path: Path, runtime: str) -> dict[str, int]:
    profile = TARGETS[runtime]
    if profile.engine == "openvino":
        ops = Counter(layer_counts(path))
    else:
        ops = Counter(n.op_type for n in optimized_model(path, profile.provider).graph.node)
    return {op: ops[op] for op in profile.integer_kernels if ops[op]}


def file_bytes(path: Path) -> int:
    """Bytes of a model file with its external data (.onnx + .onnx.data, or OpenVINO IR .xml + .bin)."""
    if path.suffix == ".xml":
        return ir_bytes(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class _Suite:
    def __init__(self, config: BenchConfig) -> None:
        self.c = config
        self.runtime = runtime_of_provider(config.provider)
        self.folder = Path(config.work_dir or tempfile.mkdtemp(prefix="fxq-bench-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, Any] = {}
        self.lowering: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        torch.manual_seed(c.seed)
        self.model = build_model(c.model, checkpoint=c.checkpoint).eval()
        self.float_gm = float_graph(self.model, c.size)
        images = bench_images(c.images, c.size, c.calib_images + 1)
        self.input, self.calibration = images[:1], [images[i:i + 1] for i in range(1, len(images))]

    def float_onnx(self) -> Path:
        path = self.folder / f"{self.c.model}-fp32.onnx"
        if not path.exists():
            lower_to_onnx(self.float_gm, self.input, path, opset=17)
        return path

    def row_runtime(self, name: str) -> str:
        """The runtime target a row is quantized for and run on."""
        return "openvino" if name in OPENVINO_ROWS else self.runtime

    def fxq_model(self, name: str) -> Path:
        policy = POLICIES[name]
        self.c.log(f"quantizing {name} ({policy})")
        path = self.folder / f"{self.c.model}-{name}.onnx"
        runtime = self.row_runtime(name)
        if name.endswith("-plain"):
            gm = quantize_ptq(self.float_gm, self.calibration, policy, progress=False)
            self.lowering[name] = lower_to_onnx(gm, self.input, path).to_dict()
        else:
            gm = quantize_ptq(self.float_gm, self.calibration, policy, progress=False, target=runtime)
            report = lower_for_runtime(gm, self.input, path, runtime)
            self.lowering[name] = {k: v for k, v in report.to_dict().items() if k not in ("nodes", "node_names")}
            self.lowering[name]["float_nodes"] = report.float_nodes
        self.extra[name] = {"policy": policy}
        return path

    def ort_model(self, name: str) -> Path:
        self.c.log(f"quantizing {name} with onnxruntime.quantization")
        path = self.folder / f"{self.c.model}-{name}.onnx"
        baseline = ort_quantize_static(self.float_onnx(), path, self.calibration, name.split("-", 1)[1])
        self.extra[name] = {"preprocessed": baseline.preprocessed}
        return path

    def nncf_model(self) -> Path:
        self.c.log("quantizing openvino-nncf with nncf.quantize")
        path = nncf_quantize(self.float_onnx(), self.folder / f"{self.c.model}-openvino-nncf.xml", self.calibration)
        self.extra["openvino-nncf"] = {"policy": "W8A8 (NNCF)", "model_type": "transformer"}
        return path

    def models(self) -> dict[str, Path]:
        """Every requested ONNX row's model file, built in row order."""
        paths = {}
        for name in check_rows(self.c.rows):
            if name in ("ort-fp32", "openvino-fp32"):
                paths[name] = self.float_onnx()
            elif name == "openvino-nncf":
                paths[name] = self.nncf_model()
            elif name.startswith("ort-"):
                paths[name] = self.ort_model(name)
            elif name.startswith(("fxq-", "openvino-fxq-")):
                paths[name] = self.fxq_model(name)
        return paths

    def isolated(self, fn, *args):
        return in_fresh_process(fn, *args) if self.c.isolate else fn(*args)

    def profile(self, name: str, nodes: list) -> None:
        self.profiles[name] = {"by_op": {k: round(v, 3) for k, v in op_times(nodes).items()},
                               "top_nodes": [{"node": n.node, "op": n.op, "ms": round(n.ms, 3)}
                                             for n in nodes[:self.c.top_nodes]]}

    def run(self) -> None:
        c = self.c
        rows = check_rows(c.rows)
        paths = self.models()
        timings = {}
        if "torch" in rows:
            c.log("timing torch (eager, this process)")
            timings["torch"] = time_torch(self.model, self.input, c.threads, c.warmup, c.runs)
        c.log(f"timing {', '.join(paths)} in turns" + (", then profiling each" if c.profile_runs else ""))
        providers = {name: "openvino" for name in paths if name in OPENVINO_ROWS}
        onnx_timings, profiles = self.isolated(measure_models, paths, self.input, c.provider, c.threads, c.warmup,
                                               c.runs, c.rounds, c.profile_runs, providers)
        timings.update(onnx_timings)
        for name in rows:
            path = paths.get(name)
            file_info = {"file": path.name, "file_bytes": file_bytes(path),
                         "kernels": _kernels(path, self.row_runtime(name))} \
                if path else {"file": None, "file_bytes": None, "kernels": {}}
            runtime = "torch" if name == "torch" else TARGETS[self.row_runtime(name)].engine
            self.rows.append({"name": name, "runtime": runtime, **file_info, **timings[name].to_dict(),
                              **self.extra.get(name, {})})
            if name in profiles:
                self.profile(name, profiles[name])
        reference = timings["ort-fp32"].median_ms if "ort-fp32" in timings else None
        for row in self.rows:
            row["speedup_vs_ort_fp32"] = round(reference / row["median_ms"], 3) if reference else None

    def latency(self) -> dict[str, Any]:
        """The allocation's latency table (:func:`fxq.passes.allocate.load_latency_table`'s format): each
        quantizable node profiled in a file quantized at ``latency_policy`` with every weight at each bit-width
        (32: the float export), scaled by that file's timed median over its profile's total (``profile_scale``),
        and per quantized width ``rest_ms``, that file's timed median minus its nodes."""
        quantized = sorted(b for b in self.c.latency_bits if b != FLOAT_BITS)
        if not quantized:
            raise InputError(f"latency bits {list(self.c.latency_bits)} hold no quantized width; add one (e.g. 8), "
                             "the rest of the model is measured at it")
        per_bits, weighted, paths, totals = {}, set(), {}, {}
        for bits in quantized:
            self.c.log(f"profiling every node at {self.c.latency_policy} with {bits}-bit weights for the latency table")
            paths[bits] = self.folder / f"{self.c.model}-latency-w{bits}.onnx"
            report = lower_for_runtime(self.uniform_weights(bits), self.input, paths[bits], self.runtime, verify=False)
            weighted = {n.node for n in report.nodes if n.weight_storage is not None}
            per_bits[bits], totals[bits] = self._node_ms(paths[bits], report.node_names, weighted)
        if FLOAT_BITS in self.c.latency_bits:
            self.c.log("profiling every node of the float export for the latency table")
            paths[FLOAT_BITS] = self.float_onnx()
            weights = {n.name: weight_of(self.float_gm, n) for n, _ in weight_nodes(self.float_gm)}
            names = float_node_names(onnx.load(str(paths[FLOAT_BITS])), weights)
            per_bits[FLOAT_BITS], totals[FLOAT_BITS] = self._node_ms(paths[FLOAT_BITS], names, weighted)
        timed = self.isolated(time_onnx_interleaved, paths, self.input, self.c.provider, self.c.threads,
                              self.c.warmup, self.c.runs, self.c.rounds)
        # a profiled session runs slower than a timed one, by a factor that differs per file: scale each file's
        # node times to its timed median
        scale = {b: timed[b].median_ms / totals[b] if totals[b] > 0 else 1.0 for b in per_bits}
        nodes = latency_table({b: {n: ms * scale[b] for n, ms in row.items()} for b, row in per_bits.items()})
        rest = {b: round(max(timed[b].median_ms - sum(row[b] for row in nodes.values()), 0.0), 4) for b in quantized}
        return {"nodes": nodes, "rest_ms": rest, "timed_ms": {b: round(t.median_ms, 4) for b, t in timed.items()},
                "profile_scale": {b: round(k, 4) for b, k in scale.items()}, "policy": self.c.latency_policy,
                "machine": machine_name(), "model": self.c.model, "size": list(self.c.size),
                "threads": self.c.threads, "provider": self.c.provider}

    def uniform_weights(self, bits: int):
        """The float graph quantized at ``latency_policy`` (heads float as the policy says, no node pinned to 8
        bits) with every quantized weight at ``bits``, prepared for the runtime."""
        gm = annotated_copy(self.float_gm, self.c.latency_policy, None, TABLE_OVERRIDES)
        set_weight_bits(gm, bits)
        quantize_annotated(gm, self.calibration, self.float_gm, "minmax", target_profile(self.runtime), progress=False)
        return gm

    def _node_ms(self, path: Path, names: dict[str, str], keep: set[str]) -> tuple[dict[str, float], float]:
        """({FX node: profiled ms} for the nodes in ``keep``, the profile's total ms per run)."""
        nodes = self.isolated(profile_onnx, path, self.input, self.c.provider, self.c.threads,
                              max(self.c.profile_runs, 3))
        return {k: v for k, v in fx_node_ms(nodes, names).items() if k in keep}, sum(n.ms for n in nodes)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Build, time and profile every requested row of ``config``; returns the results (JSON-serialisable),
    with ``latency_table`` when ``config.latency_bits`` is given."""
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise InputError(f"threads={config.threads!r} must be a positive integer")
    suite = _Suite(config)
    suite.build()
    suite.run()
    result: dict[str, Any] = {
        "model": config.model, "size": list(config.size), "threads": config.threads, "provider": config.provider,
        "warmup": config.warmup, "runs": config.runs, "calibration_images": config.calib_images,
        "images": os.fspath(config.images), "rounds": config.rounds, "onnxruntime": ort.__version__,
        "openvino": openvino_version(), "torch": torch.__version__, "machine": machine_name(),
        "rows": suite.rows, "profiles": suite.profiles, "lowering": suite.lowering,
        "work_dir": str(suite.folder),
    }
    if config.latency_bits:
        result["latency_table"] = suite.latency()
    return result

