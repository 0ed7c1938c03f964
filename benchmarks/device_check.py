"""DETR-R50 at 512² on an NVIDIA GPU: fp32, fp16 and fxq int8 QDQ (``--runtime tensorrt``) under onnxruntime's
CUDA and TensorRT execution providers, timed in interleaved rounds (p10 / median / p90), written to
benchmarks/results/device_check.{md,json}. Run it through ``benchmarks/device_check.sh`` (which checks for a GPU
first and bounds the whole run to 8 minutes); it is never a test requirement.

    benchmarks/device_check.sh [--size 512] [--rounds 5] [--runs 4]
    .venv/bin/python benchmarks/device_check.py --export-only --size 128   # the CPU-checkable part: build, export

Random weights (seed 0), calibrated on the COCO fixture images (the numbers are latency, not accuracy). Timed
calls are ``session.run`` on a host numpy input (host↔device copies included, the same for every row). CUDA rows
run the three files as they are (the QDQ file's Q/DQ as CUDA kernels); TensorRT rows: the fp32 file, the fp32
file with ``trt_fp16_enable``, and the int8 QDQ file with ``trt_int8_enable`` + ``trt_fp16_enable`` (explicit
quantization from its Q/DQ; layers without Q/DQ in fp16), with CUDA as the fallback for what TensorRT does not
take.
Engines are cached in the work folder, so a second run skips the builds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("fp32", "fp16", "int8-qdq")
PROVIDERS = ("cuda", "tensorrt")
ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="square input size (default 512)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5, at least 5 for the table)")
    p.add_argument("--runs", type=int, default=4, help="timed calls per row per round (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per row first (default 3)")
    p.add_argument("--calib-images", type=int, default=4, help="calibration images for the int8 file (default 4)")
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "coco-val2017-fixture"),
                   help="COCO folder for calibration and the timed image")
    p.add_argument("--work-dir", default=str(ROOT / "out" / "device_check"), help="ONNX files and engine caches")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check"),
                   help="results path without suffix (writes .md and .json)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new sessions after this many seconds (default 420)")
    p.add_argument("--export-only", action="store_true", help="build and export the three files, time nothing "
                                                             "(needs no GPU)")
    args = p.parse_args(argv)
    if args.size < 64 or args.rounds < 1 or args.runs < 1 or args.warmup < 0 or args.calib_images < 1:
        p.error("--size ≥ 64, --rounds ≥ 1, --runs ≥ 1, --warmup ≥ 0, --calib-images ≥ 1")
    return args


def check_gpu() -> str:
    """The GPU's name and driver from nvidia-smi; exits with one clear line when there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if not out:
        sys.exit("device_check: no NVIDIA GPU here (nvidia-smi missing or failing); run it on a CUDA machine, or "
                 "pass --export-only to check the export path on CPU")
    return out.splitlines()[0]


def export_files(args: argparse.Namespace, log) -> tuple[dict[str, Path], np.ndarray]:
    """fp32, fp16 and fxq int8 QDQ (tensorrt target) ONNX files of DETR-R50 at the size, and the timed image."""
    import onnx
    import torch
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    import fxq
    from fxq.backends import lower_for_runtime, lower_to_onnx
    from fxq.bench.suite import bench_images
    from fxq.ptq import float_graph, quantize_ptq

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    size = (args.size, args.size)
    torch.manual_seed(0)
    model = fxq.models.build("detr_r50", seed=0).eval()
    fgm = float_graph(model, size)
    images = bench_images(args.images, size, args.calib_images + 1)
    example, calib = images[:1], [images[i:i + 1] for i in range(1, len(images))]
    paths = {v: work / f"detr_r50-{args.size}-{v}.onnx" for v in VARIANTS}
    log("exporting fp32")
    lower_to_onnx(fgm, example, paths["fp32"], opset=17, dynamic=False)
    log("converting to fp16 (inputs and outputs stay fp32)")
    half = OnnxModel(convert_float_to_float16(onnx.load(paths["fp32"]), keep_io_types=True))
    half.topological_sort()  # the converter appends the input Casts last
    onnx.checker.check_model(half.model)
    onnx.save(half.model, paths["fp16"])
    log("quantizing W8A8 for the tensorrt target and lowering (TensorRT rules checked)")
    gm = quantize_ptq(fgm, calib, "W8A8", progress=False, target="tensorrt")
    lower_for_runtime(gm, example, paths["int8-qdq"], "tensorrt", opset=21, dynamic=False)
    return paths, np.ascontiguousarray(example.numpy())


def provider_options(provider: str, variant: str, work: Path) -> tuple[str, dict]:
    if provider == "cuda":
        return ORT_PROVIDERS[provider], {"device_id": 0}
    cache = work / "trt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    options = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
               "trt_fp16_enable": variant != "fp32", "trt_int8_enable": variant == "int8-qdq"}
    return ORT_PROVIDERS[provider], options


def _session(path: str, provider: str, options: dict):
    """An InferenceSession on one provider; without onnxruntime's CPU s8→u8 QDQ rewrite where that rewrite breaks
    the file (see fxq.backends.session.S8_TO_U8_REWRITE: nodes left on the CPU provider)."""
    import onnxruntime as ort

    from fxq.backends.session import S8_TO_U8_REWRITE

    providers = [(provider, options)]
    if provider == ORT_PROVIDERS["tensorrt"]:
        providers.append((ORT_PROVIDERS["cuda"], {"device_id": 0}))  # what TensorRT does not take runs on CUDA
    try:
        return ort.InferenceSession(path, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors
        if "does not match y_zero_point type" not in str(exc):
            raise
    return ort.InferenceSession(path, providers=providers, disabled_optimizers=[S8_TO_U8_REWRITE])


def open_sessions(paths: dict[str, Path], args: argparse.Namespace, log, start: float) -> tuple[dict, list[str]]:
    """{(provider, variant): session} for every provider present; lines saying what was skipped and why."""
    import onnxruntime as ort

    available, sessions, skipped = ort.get_available_providers(), {}, []
    for provider in PROVIDERS:
        if ORT_PROVIDERS[provider] not in available:
            skipped.append(f"{provider}: {ORT_PROVIDERS[provider]} is not in this onnxruntime ({ort.__version__}; "
                           f"available: {', '.join(available)}): install onnxruntime-gpu")
            continue
        for variant in VARIANTS:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{provider} {variant}: not started, the {args.budget_s:.0f} s budget was spent")
                continue
            name, options = provider_options(provider, variant, Path(args.work_dir))
            log(f"opening {provider} {variant} (TensorRT engines build on first use)")
            try:
                source = paths["fp32"] if (provider, variant) == ("tensorrt", "fp16") else paths[variant]
                session = _session(str(source), name, options)
            except Exception as exc:  # onnxruntime's pybind errors: a provider that rejects the file
                skipped.append(f"{provider} {variant}: {str(exc).strip().splitlines()[0][:200]}")
                continue
            if name not in session.get_providers()[:1]:
                skipped.append(f"{provider} {variant}: onnxruntime fell back to {session.get_providers()}")
                continue
            sessions[(provider, variant)] = session
    return sessions, skipped


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def time_interleaved(sessions: dict, feed: np.ndarray, args: argparse.Namespace, log) -> dict:
    """Per row: p10 / median / p90 ms of ``rounds × runs`` calls in turns, and max |Δ| vs CUDA fp32's outputs."""
    calls, outputs = {}, {}
    for key, session in sessions.items():
        name = session.get_inputs()[0].name
        calls[key] = (lambda s=session, n=name: s.run(None, {n: feed}))
        for _ in range(args.warmup):
            outputs[key] = calls[key]()
        if not args.warmup:
            outputs[key] = calls[key]()
    times = {key: [] for key in calls}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for key, call in calls.items():
            for _ in range(args.runs):
                t = time.perf_counter()
                call()
                times[key].append((time.perf_counter() - t) * 1e3)
    reference = outputs.get(("cuda", "fp32"))
    rows = {}
    for key, values in times.items():
        ordered = sorted(values)
        diff = None if reference is None else max(float(np.abs(np.asarray(a, np.float32) - b).max())
                                                  for a, b in zip(outputs[key], reference, strict=True))
        rows[key] = {"provider": key[0], "variant": key[1], "p10_ms": round(_percentile(ordered, 0.1), 3),
                     "median_ms": round(statistics.median(values), 3), "p90_ms": round(_percentile(ordered, 0.9), 3),
                     "runs": len(values), "max_abs_diff_vs_cuda_fp32": diff}
    return rows


def versions() -> dict[str, str | None]:
    import onnxruntime as ort
    import torch

    out = {"onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        out["tensorrt"] = None
    return out


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}`", "",
             f"DETR-R50 (random weights), 1×3×{result['size']}×{result['size']}, {result['gpu']}; "
             f"{result['rounds']} interleaved rounds × {result['runs']} calls per row after {result['warmup']} "
             f"warm-up; host↔device copies included; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()
                                                                     if v), "",
             "| provider | file | p10 ms | median ms | p90 ms | × CUDA fp32 | max abs Δ vs CUDA fp32 |",
             "|---|---|---|---|---|---|---|"]
    base = next((r["median_ms"] for r in result["rows"] if (r["provider"], r["variant"]) == ("cuda", "fp32")), None)
    for r in result["rows"]:
        speed = f"{base / r['median_ms']:.2f}" if base else "–"
        diff = "–" if r["max_abs_diff_vs_cuda_fp32"] is None else f"{r['max_abs_diff_vs_cuda_fp32']:.3g}"
        lines.append(f"| {r['provider']} | {r['variant']} | {r['p10_ms']:.2f} | {r['median_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {speed} | {diff} |")
    lines += [""] + [f"- skipped: {line}" for line in result["skipped"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[device_check {time.perf_counter() - start:5.0f}s] {message}", flush=True)

    gpu = None if args.export_only else check_gpu()
    paths, feed = export_files(args, log)
    if args.export_only:
        log("exported " + ", ".join(str(p) for p in paths.values()) + "; --export-only: nothing timed")
        return 0
    sessions, skipped = open_sessions(paths, args, log, start)
    for line in skipped:
        log(f"skipped {line}")
    if not sessions:
        sys.exit("device_check: no session could be opened (see the skipped lines); install onnxruntime-gpu")
    rows = time_interleaved(sessions, feed, args, log)
    command = "benchmarks/device_check.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "gpu": gpu, "size": args.size, "rounds": args.rounds, "runs": args.runs,
              "warmup": args.warmup, "versions": versions(), "rows": list(rows.values()), "skipped": skipped,
              "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
