"""Latency measurement: timed runs (warm-up, N runs, p10 / median / p90), onnxruntime profiles as per-node time
tables, and the per-node latency table the allocation pass takes.

Timing: ``warmup`` untimed calls, then ``runs`` calls each timed with ``time.perf_counter`` around one
inference on the same input. Several models are compared by timing them in turns
(:func:`time_onnx_interleaved`), in a fresh process (:func:`in_fresh_process`); each model runs on its own
provider (an onnxruntime provider or "openvino", :func:`fxq.backends.runtime_session.open_session`).
Profiling (onnxruntime only): a separate session with ``SessionOptions.enable_profiling`` runs the model
``warmup + runs`` times; each ``Node`` event's ``dur`` (µs, the kernel time) is summed per node over the
last ``runs`` and divided by them. Profiling adds overhead, so the timed numbers never come from a profiled session.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch

from fxq.backends.node_map import runtime_name
from fxq.backends.runtime_session import feed_call, is_openvino, open_session
from fxq.backends.session import OrtSession, inference_session
from fxq.errors import InputError

T = TypeVar("T")


@dataclass
class Timing:
    """Wall-clock milliseconds of ``runs`` timed calls after ``warmup`` untimed ones (percentiles nearest-rank)."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    p10_ms: float = 0.0
    rounds: int = 1

    def to_dict(self) -> dict[str, float | int]:
        """Rounded values for JSON."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _check_counts(warmup: int, runs: int) -> None:
    if not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"runs={runs!r} and warmup={warmup!r}: give runs ≥ 1 and warmup ≥ 0 (integers)")


def time_calls(fn: Callable[[], object], warmup: int = 5, runs: int = 20) -> Timing:
    """Median, p90 (nearest rank), mean and min of ``runs`` timed calls of ``fn`` after ``warmup`` calls."""
    _check_counts(warmup, runs)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _timing(times, warmup)


def time_onnx(path: str | os.PathLike, images: torch.Tensor, provider: str = "cpu", threads: int | None = None,
              warmup: int = 5, runs: int = 20) -> Timing:
    """Timing of inference of the model at ``path`` on ``images`` (``provider``: onnxruntime's or "openvino")."""
    return time_calls(feed_call(open_session(path, provider, threads=threads), images), warmup, runs)


def time_torch(module: torch.nn.Module, images: torch.Tensor, threads: int | None = None, warmup: int = 5,
               runs: int = 20) -> Timing:
    """Timing of eager PyTorch inference (``torch.inference_mode``) with ``threads`` intra-op threads."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return time_calls(lambda: module(images), warmup, runs)
    finally:
        torch.set_num_threads(saved)


@dataclass
class NodeTime:
    """Mean kernel time of one node of the graph onnxruntime ran."""

    node: str
    op: str
    ms: float


def profile_onnx(path: str | os.PathLike, images: torch.Tensor, provider: str = "cpu", threads: int | None = None,
                 runs: int = 5, warmup: int = 1) -> list[NodeTime]:
    """Mean per-run kernel time of every node (names as in the model file), slowest first; the ``warmup``
    runs are profiled too but left out of the means."""
    _check_counts(warmup, runs)
    session = OrtSession(path, provider, threads=threads)
    options = session.session.get_session_options()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="fxq-profile-"), "profile")
    profiled = inference_session(os.fspath(path), options, session.provider)
    feed = {session.input_names[0]: np.ascontiguousarray(images.detach().cpu().float().numpy())}
    for _ in range(warmup + runs):
        profiled.run(None, feed)
    events_file = profiled.end_profiling()
    try:
        return node_times(events_file, runs, warmup)
    finally:
        shutil.rmtree(os.path.dirname(os.path.abspath(events_file)), ignore_errors=True)


def node_times(events_file: str | os.PathLike, runs: int, warmup: int = 0) -> list[NodeTime]:
    """Per-node mean kernel milliseconds per run from an onnxruntime profile of ``warmup + runs`` runs,
    the first ``warmup`` runs left out."""
    with open(events_file) as f:
        events = json.load(f)
    durations: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = runtime_name(event["name"][: -len("_kernel_time")])
        durations[name].append(event.get("dur", 0) / 1e3)
        ops[name] = event.get("args", {}).get("op_name", "?")
    rows = []
    for name, times in durations.items():
        per_run = max(1, len(times) // (runs + warmup))
        kept = times[warmup * per_run:] or times
        rows.append(NodeTime(name, ops[name], sum(kept) / max(1, len(kept) // per_run)))
    return sorted(rows, key=lambda r: -r.ms)


def op_times(nodes: list[NodeTime]) -> dict[str, float]:
    """Milliseconds per run by op type, largest first."""
    by_op: dict[str, float] = defaultdict(float)
    for n in nodes:
        by_op[n.op] += n.ms
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def time_onnx_interleaved(paths: Mapping[str, str | os.PathLike], images: torch.Tensor, provider: str = "cpu",
                          threads: int | None = None, warmup: int = 5, runs: int = 20, rounds: int = 5,
                          providers: Mapping[str, str] | None = None) -> dict[str, Timing]:
    """Timings of several models measured in turns: ``warmup`` calls each, then ``rounds`` rounds in which
    every model runs ``runs / rounds`` timed calls (rounded up), so that a machine whose speed drifts (as this
    2-core VM's does, by up to 40% within a minute) affects every model alike. ``providers`` overrides
    ``provider`` per model (e.g. "openvino" for some)."""
    _check_counts(warmup, runs)
    chosen = {name: (providers or {}).get(name, provider) for name in paths}
    calls = {name: feed_call(open_session(path, chosen[name], threads=threads), images)
             for name, path in paths.items()}
    for call in calls.values():
        time_calls(call, warmup, 1)
    per_round = -(-runs // max(1, rounds))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(1, rounds)):
        for name, call in calls.items():
            for _ in range(min(per_round, runs - len(times[name]))):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _timing(values, warmup, rounds) for name, values in times.items()}


def measure_models(paths: Mapping[str, str | os.PathLike], images: torch.Tensor, provider: str = "cpu",
                   threads: int | None = None, warmup: int = 5, runs: int = 20, rounds: int = 5,
                   profile_runs: int = 0, providers: Mapping[str, str] | None = None,
                   ) -> tuple[dict[str, Timing], dict[str, list[NodeTime]]]:
    """Timings of the models (in turns, :func:`time_onnx_interleaved`), then, when ``profile_runs``, each
    onnxruntime model's per-node profile (OpenVINO models are timed only)."""
    timings = time_onnx_interleaved(paths, images, provider, threads, warmup, runs, rounds, providers)
    chosen = {name: (providers or {}).get(name, provider) for name in paths}
    profiles = {name: profile_onnx(path, images, chosen[name], threads, profile_runs) for name, path in paths.items()
                if profile_runs and not is_openvino(chosen[name])}
    return timings, profiles


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def _timing(times: list[float], warmup: int, rounds: int = 1) -> Timing:
    ordered = sorted(times)
    return Timing(statistics.median(times), _nearest_rank(ordered, 0.9), statistics.fmean(times), ordered[0],
                  len(times), warmup, _nearest_rank(ordered, 0.1), rounds)


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` run in a new Python process (spawned, so no thread pool is inherited).

    Latency is measured this way because thread pools of the measuring process distort it: right after a
    PyTorch forward on 2 threads, onnxruntime inference on 2 threads ran 1.7× slower (DETR-R50, 512²) while
    torch's OpenMP workers still spun.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def fx_node_ms(nodes: list[NodeTime], names: Mapping[str, str]) -> dict[str, float]:
    """Milliseconds per FX node: the times of the ONNX nodes ``names`` maps to it ({ONNX name: FX name})."""
    out: dict[str, float] = defaultdict(float)
    for n in nodes:
        fx = names.get(n.node)
        if fx is not None:
            out[fx] += n.ms
    return dict(out)


def latency_table(per_bits: Mapping[int, Mapping[str, float]]) -> dict[str, dict[int, float]]:
    """``{fx_node: {bits: ms}}`` (the format of :func:`fxq.passes.allocate.load_latency_table`) from
    ``{bits: {fx_node: ms}}``, keeping the nodes measured at every bit-width."""
    common = set.intersection(*(set(v) for v in per_bits.values())) if per_bits else set()
    return {node: {bits: round(per_bits[bits][node], 4) for bits in sorted(per_bits)} for node in sorted(common)}
