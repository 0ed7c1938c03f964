"""ONNX Runtime CPU latency of multi-scale deformable attention: the reference's GridSample sampling core against
the Gather + MatMul form that fxq exports (fxq/models/ms_deform_attn_fast.py; issue 18, deliver 1), fp32.

Run: .venv/bin/python benchmarks/deform_attn_speed.py [--rounds 5] [--runs 2] [--threads 1] [--parts core layer model]
[--runtimes ort openvino]   (openvino: needs the openvino package importable)

Parts, all at Deformable DETR-R50 512² shapes (levels 64², 32², 16², 8²; 8 heads × 32; 4 points):
(a) the sampling core alone: encoder (5440 queries at their own pixels, sampling within a few pixels of them) and
decoder (300 queries at random reference points); (a') one MSDeformAttn encoder layer; (b) the whole float
deformable_detr_r50 (random weights, seed 0), traced and exported as `fxq bench` exports its float row
(float_graph, lower_to_onnx opset 17, dynamic shapes). Variants: the file exported in the GridSample form
(``ms_deform_attn_fast.export_form("grid_sample")``) and in the Gather form (fxq's default); both compute the
sampling locations with ``sampling_locations_from_points_fast``. (a) also times the int8 core
(fxq/models/ms_deform_attn_int8.py: uint8 value table, per-row uint8 corner weights, MatMulInteger; the value's
min-max scale), whose max |Δ| column is its quantization error, not a rounding difference.

Each group's variants are timed in one spawned process, interleaved round by round (every round: ``runs`` calls of
each), so the drift of a shared machine hits them alike. Reported per variant: median, p10 and p90 of the
calls' wall time and the ratio of medians to the GridSample form's; the median and ratio of their CPU time (the
process's: it leaves out the time other jobs held the core); the max |Δ| of the outputs against the GridSample
form's; for (b) on onnxruntime, kernel
time by op type from one profiled run. Writes benchmarks/results/deform_attn_speed.json (``DEFORM_ATTN_OUT``
names another path).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import ROOT, markdown
from torch import nn

import fxq
import fxq.models.ms_deform_attn as msda
import fxq.models.ms_deform_attn_int8 as int8
from fxq.backends import lower_to_onnx
from fxq.bench.timing import in_fresh_process, op_times, profile_onnx
from fxq.io import write_json
from fxq.models import ms_deform_attn_fast as fast
from fxq.ptq import float_graph

OUT = Path(os.environ.get("DEFORM_ATTN_OUT", ROOT / "benchmarks" / "results" / "deform_attn_speed.json"))
LEVELS = ((64, 64), (32, 32), (16, 16), (8, 8))
HEADS, HEAD_DIM, POINTS, D_MODEL = 8, 32, 4, 256
LOAD_NOTE = "timings on a shared machine drift: compare the ratios, and the load averages recorded with them"


#: Variant → export form of the sampling core (``ms_deform_attn_fast.export_form``).
FORMS = {"GridSample form": "grid_sample", "Gather form": "gather"}


def _shape_inputs() -> tuple[list[torch.Tensor], list[str], dict[str, dict[int, str]]]:
    """One empty [1, 1, H, W] tensor per level: the exported model reads the level sizes from their shapes, as
    the traced detector reads them from its feature maps (so the sizes stay dynamic in the file)."""
    names = [f"level{i}" for i in range(len(LEVELS))]
    return ([torch.zeros(1, 1, h, w) for h, w in LEVELS], names,
            {n: {2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(names)})


def _encoder_reference(generator: torch.Generator) -> torch.Tensor:
    """Reference (x, y) [1, S, 1, 2] at every token's own pixel centre, levels in flattening order."""
    points = []
    for h, w in LEVELS:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        points.append(torch.stack((xs, ys), -1).reshape(-1, 2))
    return torch.cat(points)[None, :, None]


def core_inputs(queries: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value [1, S, M, D], locations [1, Lq, M, L, P, 2] (reference + N(0, 2 px) offsets), softmax weights."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in LEVELS)
    if queries == tokens:
        reference = _encoder_reference(g)
    else:
        reference = torch.rand(1, queries, 1, 2, generator=g)
    offsets = torch.randn(1, queries, HEADS, len(LEVELS), POINTS, 2, generator=g) * 2
    locations = msda.sampling_locations_from_points(reference.expand(-1, -1, len(LEVELS), -1), offsets, LEVELS)
    weights = torch.randn(1, queries, HEADS, len(LEVELS) * POINTS, generator=g).softmax(-1)
    value = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=g)
    return value, locations, weights.view(1, queries, HEADS, len(LEVELS), POINTS)


class _Core(nn.Module):
    def __init__(self, core: Callable) -> None:
        super().__init__()
        self.core = core

    def forward(self, value, locations, weights, *levels):
        return self.core(value, [(x.shape[2], x.shape[3]) for x in levels], locations, weights)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = msda.MSDeformAttn(D_MODEL, len(LEVELS), HEADS, POINTS).eval()
        with torch.no_grad():  # trained-like: offsets and weights depend on the query
            self.attn.sampling_offsets.weight.normal_(0, 0.02)
            self.attn.attention_weights.weight.normal_(0, 0.05)

    def forward(self, query, reference, value, *levels):
        return self.attn(query, reference, value, [(x.shape[2], x.shape[3]) for x in levels])


def _export(module: nn.Module, inputs: list[torch.Tensor], names: list[str], dynamic: dict, path: Path) -> Path:
    torch.onnx.export(module.eval(), tuple(inputs), path, dynamo=False, opset_version=17, input_names=names,
                      output_names=["out"], dynamic_axes=dynamic, do_constant_folding=True)
    return path


def core_group(queries: int, folder: Path) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """ONNX files of the core alone in each form, and their feed."""
    value, locations, weights = core_inputs(queries)
    levels, level_names, level_axes = _shape_inputs()
    names = ["value", "locations", "weights", *level_names]
    dynamic = {"value": {1: "S"}, "locations": {1: "Q"}, "weights": {1: "Q"}, **level_axes}
    inputs = [value, locations, weights, *levels]
    scale, zero_point = int8.value_qparams(value)
    cores = (("GridSample form", msda.ms_deform_attn_core), ("Gather form", fast.ms_deform_attn_core_fast),
             ("Gather form, int8", functools.partial(int8.ms_deform_attn_core_int8, value_scale=scale,
                                                     value_zero_point=zero_point)))
    paths = {name: _export(_Core(core), inputs, names, dynamic, folder / f"core{queries}-{i}.onnx")
             for i, (name, core) in enumerate(cores)}
    return paths, {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


def layer_group(folder: Path) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """ONNX files of one MSDeformAttn encoder layer in each form, and their feed."""
    g = torch.Generator().manual_seed(1)
    tokens = sum(h * w for h, w in LEVELS)
    query, value = torch.randn(1, tokens, D_MODEL, generator=g), torch.randn(1, tokens, D_MODEL, generator=g)
    reference = _encoder_reference(g).expand(-1, -1, len(LEVELS), -1).contiguous()
    levels, level_names, level_axes = _shape_inputs()
    names = ["query", "reference", "value", *level_names]
    dynamic = {"query": {1: "Q"}, "reference": {1: "Q"}, "value": {1: "S"}, **level_axes}
    inputs, layer, paths = [query, reference, value, *levels], _Layer(), {}
    for i, (name, form) in enumerate(FORMS.items()):
        with fast.export_form(form):
            paths[name] = _export(layer, inputs, names, dynamic, folder / f"layer-{i}.onnx")
    return paths, {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


def model_group(folder: Path) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """ONNX files of the float deformable_detr_r50 at 512² in each form, and their feed (one image)."""
    model = fxq.models.build("deformable_detr_r50", seed=0)
    image = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    gm, paths = float_graph(model, (512, 512)), {}
    for i, (name, form) in enumerate(FORMS.items()):
        paths[name] = folder / f"deformable_detr_r50-{i}.onnx"
        with fast.export_form(form):
            lower_to_onnx(gm, image, paths[name], opset=17)
    return paths, {"images": image.numpy()}


def runner(path: Path, runtime: str, threads: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """``feed -> outputs`` of the model at ``path`` on ``runtime`` ("ort" or "openvino", fp32) with ``threads``."""
    if runtime == "openvino":
        import openvino  # optional: only for --runtimes openvino

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        return lambda feed: [request.infer(feed)[o] for o in compiled.outputs]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def time_interleaved(paths: dict[str, Path], feed: dict[str, np.ndarray], runtime: str, threads: int, rounds: int,
                     runs: int) -> dict[str, dict]:
    """Per variant: wall and process CPU milliseconds of the timed calls (variants in turns, ``runs`` calls each
    per round, after one untimed call each) and the max |Δ| of its outputs against the first variant's. CPU time
    leaves out the time other processes held the core. Run it in a fresh process."""
    calls = {n: runner(p, runtime, threads) for n, p in paths.items()}
    outputs = {n: call(feed) for n, call in calls.items()}
    first = next(iter(outputs.values()))
    wall: dict[str, list[float]] = {n: [] for n in calls}
    cpu: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(runs):
                start, start_cpu = time.perf_counter(), time.process_time()
                call(feed)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
                wall[name].append((time.perf_counter() - start) * 1e3)
    return {n: {"ms": wall[n], "cpu_ms": cpu[n], "max_abs_diff": _max_abs_diff(outputs[n], first)} for n in calls}


def _max_abs_diff(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(outputs, reference, strict=True))


def summary(group: str, runtime: str, timed: dict[str, dict]) -> list[dict]:
    """Table rows per variant: wall median, p10, p90, × GridSample (the GridSample form's median over this
    one's), CPU median and its × GridSample."""
    first = next(iter(timed.values()))
    base, base_cpu = statistics.median(first["ms"]), statistics.median(first["cpu_ms"])
    rows = []
    for name, t in timed.items():
        p10, median, p90 = np.percentile(t["ms"], [10, 50, 90])
        cpu = statistics.median(t["cpu_ms"])
        rows.append({"runtime": runtime, "what": group, "variant": name, "median ms": round(float(median), 1),
                     "p10 ms": round(float(p10), 1), "p90 ms": round(float(p90), 1),
                     "× GridSample": round(base / float(median), 2), "CPU median ms": round(cpu, 1),
                     "× GridSample (CPU)": round(base_cpu / cpu, 2), "calls": len(t["ms"]),
                     "max abs diff vs GridSample": f"{t['max_abs_diff']:.1e}"})
    return rows


def _profile(path: Path, image: np.ndarray, threads: int) -> dict[str, float]:
    return {k: round(v, 1) for k, v in op_times(profile_onnx(path, torch.from_numpy(image), threads=threads,
                                                             runs=1, warmup=1)).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=2, help="timed calls of each variant per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtimes", nargs="+", choices=("ort", "openvino"), default=["ort"],
                   help="ort: onnxruntime CPU; openvino: OpenVINO CPU (needs the openvino package)")
    p.add_argument("--parts", nargs="+", choices=("core", "layer", "model"), default=["core", "layer", "model"],
                   help="(a) core, (a') layer, (b) model: the whole deformable_detr_r50 (default: all)")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fxq-deform-attn-") as folder:
        rows, profiles = measure(args, Path(folder))
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    report(rows, profiles, args, load)


def measure(args: argparse.Namespace, folder: Path) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Table rows of every asked part and runtime, and the op profiles of (b) on onnxruntime."""
    groups = {}
    if "core" in args.parts:
        groups["core, encoder (5440 queries)"] = core_group(5440, folder)
        groups["core, decoder (300 queries)"] = core_group(300, folder)
    if "layer" in args.parts:
        groups["MSDeformAttn encoder layer"] = layer_group(folder)
    if "model" in args.parts:
        groups["deformable_detr_r50 512² (whole model)"] = model_group(folder)
    rows, profiles = [], {}
    for runtime, (group, (paths, feed)) in itertools.product(args.runtimes, groups.items()):
        print(f"timing {group} on {runtime} ...", file=sys.stderr, flush=True)
        timed = in_fresh_process(time_interleaved, paths, feed, runtime, args.threads, args.rounds, args.runs)
        rows += summary(group, runtime, timed)
        if "whole model" in group and runtime == "ort":
            profiles = {n: in_fresh_process(_profile, path, feed["images"], args.threads) for n, path in paths.items()}
    return rows, profiles


def _openvino_version(runtimes: list[str]) -> str:
    if "openvino" not in runtimes:
        return ""
    import openvino

    return f", OpenVINO {openvino.__version__.split('-')[0]}"


def report(rows: list[dict], profiles: dict[str, dict[str, float]], args: argparse.Namespace, load: dict) -> None:
    """Print the markdown table (and op profiles) and write the JSON."""
    command = "python benchmarks/deform_attn_speed.py " + " ".join(sys.argv[1:])
    runtimes = f"onnxruntime {ort.__version__}{_openvino_version(args.runtimes)}"
    header = (f"{runtimes} CPU, fp32, {args.threads} thread(s), {args.rounds} rounds × {args.runs} calls per variant, "
              f"interleaved; torch {torch.__version__}; load average (1, 5, 15 min) {load['before']} before, "
              f"{load['after']} after. Note: {LOAD_NOTE}.")
    columns = ["runtime", "what", "variant", "median ms", "p10 ms", "p90 ms", "× GridSample", "CPU median ms",
               "× GridSample (CPU)", "calls", "max abs diff vs GridSample"]
    shown = [{k: f"{v:.1f}" if k.endswith(" ms") else f"{v:.2f}" if k.startswith("× GridSample") else v
              for k, v in row.items()} for row in rows]
    print(f"\n`{command.strip()}`\n\n{header}\n\n{markdown(shown, columns)}")
    for name, ops in profiles.items():
        top = ", ".join(f"{k} {v}" for k, v in list(ops.items())[:8])
        print(f"\n- **{name}** (kernel ms per run, one profiled run): {top}")
    write_json(OUT, {"command": command.strip(), "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "threads": args.threads, "load_average": load, "note": LOAD_NOTE, "rows": rows,
                     "op_profile_ms": profiles})
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
