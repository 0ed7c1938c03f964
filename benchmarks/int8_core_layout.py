"""ORT CPU time of the int8 sampling core (fxq/models/ms_deform_attn_int8.py) with today's index layout vs the
first one (issue 18, deliverable 1).

Run: .venv/bin/python benchmarks/int8_core_layout.py [--queries 5440] [--rounds 10] [--runs 3]
[--out benchmarks/results/int8_core_layout.json]

"first layout": the core as first committed: the table rows of all four corners computed
(``corner_rows``, an int32 Add over 4× the footprints) and the top-left one taken, and the corner weights stacked
on axis 3 and then permuted to the footprint's order (a four-way Concat plus a Transpose). "today": only the
top-left row (``top_left_rows``) and the weights stacked with the corners last. Same inputs as
benchmarks/deform_attn_speed.py's core group (Deformable DETR-R50 encoder shapes at 512², unit-normal values);
both files exported alike, timed in one process, interleaved round by round; wall and process CPU time (the CPU
time leaves out the time other processes held the core); max |Δ| of the outputs (0: the same numbers).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path

import deform_attn_speed as das
import torch
from common import ROOT, markdown, save

import fxq.models.ms_deform_attn_fast as fast
import fxq.models.ms_deform_attn_int8 as int8


def first_layout(value, spatial_shapes, sampling_locations, attention_weights, value_scale, value_zero_point):
    """The int8 core with the first index layout (module docstring); the same numbers as today's."""
    batch, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    queries = sampling_locations.shape[1]
    locations = sampling_locations.transpose(1, 2)
    corner, frac = fast.top_left_corners(locations, fast.level_sizes(spatial_shapes, locations, locations.shape[4]))
    rows = fast.corner_rows(spatial_shapes, corner, batch * heads)[:, :, :, 0]
    weights = fast.bilinear_weights(frac, attention_weights.transpose(1, 2)).permute(0, 1, 2, 4, 5, 3)
    weights_q, weight_scale = int8.row_quantized(weights.reshape(batch, heads, queries, 1, -1))
    table = int8.footprint_table(int8.quantize_u8(value, value_scale, value_zero_point), spatial_shapes,
                                 value_zero_point)
    gathered = table.index_select(0, rows.flatten()).reshape(batch, heads, queries, -1, head_dim)
    sums = int8.matmul_integer(weights_q, gathered, 0, value_zero_point)
    out = sums.to(torch.float32) * (weight_scale * value_scale)
    return out.reshape(batch, heads, queries, head_dim).transpose(1, 2).reshape(batch, queries, heads * head_dim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=5440)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_core_layout.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    value, locations, weights = das.core_inputs(args.queries)
    levels, level_names, level_axes = das._shape_inputs()
    names = ["value", "locations", "weights", *level_names]
    dynamic = {"value": {1: "S"}, "locations": {1: "Q"}, "weights": {1: "Q"}, **level_axes}
    inputs = [value, locations, weights, *levels]
    scale, zero_point = int8.value_qparams(value)
    cores = {"first layout": first_layout, "today": int8.ms_deform_attn_core_int8}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: das._export(das._Core(functools.partial(core, value_scale=scale, value_zero_point=zero_point)),
                                   inputs, names, dynamic, Path(tmp) / f"core-{i}.onnx")
                 for i, (name, core) in enumerate(cores.items())}
        feed = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        timed = das.time_interleaved(paths, feed, "ort", 1, args.rounds, args.runs)
    base = statistics.median(timed["first layout"]["cpu_ms"])
    rows = [{"core": name, "queries": args.queries, "wall_ms": statistics.median(t["ms"]),
             "cpu_ms": statistics.median(t["cpu_ms"]), "speedup_cpu": base / statistics.median(t["cpu_ms"]),
             "max_abs_diff": t["max_abs_diff"]} for name, t in timed.items()]
    save(Path(args.out), rows, markdown(rows, list(rows[0])),
         "python benchmarks/int8_core_layout.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
