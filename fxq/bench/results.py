"""Writing benchmark results: the JSON document and a markdown table, each written atomically."""

from __future__ import annotations

import os
from typing import Any

from fxq.io import write_atomic, write_json

COLUMNS = ("row", "runtime", "policy", "p10 ms", "median ms", "p90 ms", "× ORT fp32", "file MB", "integer kernels")
FLOAT_ROWS = ("torch", "ort-fp32", "openvino-fp32")


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "row":
        return row["name"]
    if column == "runtime":
        return row.get("runtime", "onnxruntime")
    if column == "policy":
        return row.get("policy", "fp32" if row["name"] in FLOAT_ROWS else "W8A8 (ORT)")
    if column == "p10 ms":
        return f"{row['p10_ms']:.1f}" if "p10_ms" in row else "–"
    if column == "median ms":
        return f"{row['median_ms']:.1f}"
    if column == "p90 ms":
        return f"{row['p90_ms']:.1f}"
    if column == "× ORT fp32":
        return "–" if row.get("speedup_vs_ort_fp32") is None else f"{row['speedup_vs_ort_fp32']:.2f}"
    if column == "file MB":
        return "–" if row.get("file_bytes") is None else f"{row['file_bytes'] / 1e6:.1f}"
    kernels = row.get("kernels") or {}
    return ", ".join(f"{n}×{k}" for k, n in kernels.items()) or "–"


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of a :func:`fxq.bench.suite.run_bench` result as a markdown table, with its setting."""
    lines = [f"`{result['command']}`", ""] if result.get("command") else []
    openvino = f", OpenVINO {result['openvino']}" if result.get("openvino") else ""
    turns = (f" in {result['rounds']} interleaved rounds (torch: in this process, before them)"
             if result.get("rounds") else "")
    lines += [f"{result['model']}, 1×3×{result['size'][0]}×{result['size'][1]}, {result['threads']} threads, "
             f"{result['provider']}, {result['runs']} timed runs per row after {result['warmup']} warm-up{turns}; "
             f"onnxruntime {result['onnxruntime']}{openvino}, torch {result['torch']}, {result['machine']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |" for row in result["rows"]]
    return "\n".join(lines)


def markdown_profiles(result: dict[str, Any], ops: int = 6) -> str:
    """Per row, the op types taking the most kernel time (ms per run, from onnxruntime's profile)."""
    lines = []
    for name, profile in result.get("profiles", {}).items():
        top = list(profile["by_op"].items())[:ops]
        lines.append(f"- **{name}**: " + ", ".join(f"{op} {ms:.1f}" for op, ms in top))
    return "\n".join(lines)


def markdown_top_nodes(result: dict[str, Any], row: str, count: int = 10) -> str:
    """The ``count`` slowest nodes of one row's profile as a markdown table (node names as in the model file;
    fxq rows name their compute nodes after the FX nodes)."""
    nodes = result.get("profiles", {}).get(row, {}).get("top_nodes", [])[:count]
    if not nodes:
        return ""
    lines = ["| node | op | ms |", "|---|---|---|"]
    lines += [f"| {n['node']} | {n['op']} | {n['ms']:.2f} |" for n in nodes]
    return "\n".join(lines)


def write_results(result: dict[str, Any], json_path: str | os.PathLike | None = None,
                  markdown_path: str | os.PathLike | None = None) -> str:
    """Write ``result`` as JSON and/or markdown (atomically); returns the markdown text."""
    text = markdown_table(result)
    profiles = markdown_profiles(result)
    if profiles:
        text += "\n\nKernel time by op type (ms per run, onnxruntime profile):\n\n" + profiles
    for row in ("fxq-int8", "ort-qdq"):
        top = markdown_top_nodes(result, row)
        if top:
            text += f"\n\nSlowest nodes of {row} (ms per run):\n\n{top}"
    if json_path is not None:
        write_json(json_path, result)
    if markdown_path is not None:
        write_atomic(markdown_path, lambda f: f.write(text + "\n"))
    return text
