"""The end of ``fxq pipeline``: summary.json and the one summary screen, both from the stages' artifacts (so a
rerun that skipped stages shows the same numbers as the run that made them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fxq.cli.run_artifacts import EVAL_FP32, EVAL_QUANT, EXPORT, FRONTIER, LATENCY, PARITY, SUMMARY
from fxq.io import write_json


def write_summary(out: Path, run_id: str, args: argparse.Namespace, book) -> dict:
    """summary.json: the accuracy rows, the allocation, the deployment numbers and every stage's record."""
    rows = [_row(_read(out, name)) for name in (EVAL_FP32, EVAL_QUANT)]
    summary = {"run_id": run_id, "model": args.model, "policy": args.policy, "allocation": args.allocation,
               "budget": args.budget, "method": args.method, "rows": rows,
               "stages": {name: {**book.records[name], "ran": book.records[name]["run_id"] == run_id}
                          for name in book.stages}}
    frontier = _read(out, FRONTIER)
    if frontier is not None and frontier["chosen"] is not None:
        summary["allocation_chosen"] = frontier["chosen"]
    summary.update(_deployment(out))
    write_json(out / SUMMARY, summary)
    return summary


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    """The summary screen: accuracy, allocation, deployment, and what each stage did."""
    critical = " ".join(map(str, args.critical))
    print(f"\n{args.model} on {summary['rows'][0]['images']} validation images (critical: {critical})")
    print(f"{'graph':<28}{'AP':>8}{'AP50':>8}{'crit AP':>9}{'rest AP':>9}")
    for r in summary["rows"]:
        print(f"{r['graph']:<28}{r['AP']:>8.3f}{r['AP50']:>8.3f}{r['critical_AP']:>9.3f}{r['rest_AP']:>9.3f}")
    chosen = summary.get("allocation_chosen")
    if chosen:
        hist = ", ".join(f"{count} at {bits} bits" for bits, count in chosen["histogram"].items())
        print(f"allocation: {chosen['used']:.4g} of budget {chosen['budget']:.4g} ({args.budget_kind}), "
              f"{chosen['avg_bits']:.2f} average weight bits ({hist})")
    _print_deployment(summary)
    stages = summary["stages"]
    print("stages: " + ", ".join(f"{name} {'ran' if r['ran'] else 'kept'} {r['seconds']:.1f} s"
                                 for name, r in stages.items()))


def _print_deployment(found: dict) -> None:
    export, parity = found["export"], found["parity"]
    diff = parity["max_abs_diff"]
    print(f"ONNX ({export['runtime'] or 'plain QDQ'}): {export['quant_bytes']:,} bytes quantized vs "
          f"{export['fp32_bytes']:,} float; onnxruntime AP {parity['AP']:.3f} (critical {parity['critical_AP']:.3f}),"
          f" max |Δ| vs the graph: logits {diff['pred_logits']:.2e}, boxes {diff['pred_boxes']:.2e}")
    if "latency" in found:
        t = found["latency"]
        print(f"latency (onnxruntime, batch 1): fp32 {t['fp32_ms']:.1f} ms, quantized {t['quantized_ms']:.1f} ms "
              f"({t['speedup']:.2f}×)")


def _deployment(out: Path) -> dict:
    export, parity, latency = (_read(out, name) for name in (EXPORT, PARITY, LATENCY))
    found = {"export": {k: export[k] for k in ("runtime", "fp32_bytes", "quant_bytes")},
             "parity": {"max_abs_diff": parity["max_abs_diff"], "AP": parity["AP"],
                        "critical_AP": parity["critical_mAP"] or 0.0}}
    if latency is not None:
        found["latency"] = {"fp32_ms": latency["rows"]["fp32"]["median_ms"],
                            "quantized_ms": latency["rows"]["quantized"]["median_ms"], "speedup": latency["speedup"]}
    return found


def _row(record: dict) -> dict:
    return {"graph": record["graph"], "AP": record["AP"], "AP50": record["AP50"],
            "critical_AP": record["critical_mAP"] or 0.0, "rest_AP": record["rest_mAP"] or 0.0,
            "seconds": record.get("seconds"), "images": record["num_images"]}


def _read(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
