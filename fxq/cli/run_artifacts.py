"""The files of a pipeline run folder, one per stage, and their checked reading.

``recipe.yaml`` (the effective options), ``environment.json`` (command, versions, machine: the last invocation),
``stages.json`` (which stages are done, by which run: :mod:`fxq.cli.stages`), ``model.json`` (the traced float
graph's size), ``eval_fp32.json`` and ``eval_quant.json`` (COCO metrics of the float and the quantized graph, per
category, without the detections), the analysis and deployment artifacts (:mod:`fxq.cli.pipeline_analysis`,
:mod:`fxq.cli.pipeline_deploy`), ``quantized.pt`` (the quantized graph's state_dict, for a rerun that skips PTQ)
and ``summary.json`` (the rows the pipeline prints). All are written atomically; :func:`read_run` gives the report
what it needs or one InputError naming the file and its fix.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from fxq.cli.stages import STAGES_FILE as STAGES
from fxq.cli.stages import read_stages
from fxq.errors import InputError
from fxq.io import write_atomic, write_json

RECIPE, ENVIRONMENT, MODEL = "recipe.yaml", "environment.json", "model.json"
EVAL_FP32, EVAL_QUANT, SUMMARY = "eval_fp32.json", "eval_quant.json", "summary.json"
REPORT = "report.html"
ONNX_FP32, ONNX_QUANT = "model_fp32.onnx", "model_quant.onnx"
EXPORT, PARITY, LATENCY = "export.json", "parity.json", "latency.json"
FISHER, FRONTIER, ALLOCATION = "fisher.json", "frontier.json", "allocation.json"
QUANT_STATE = "quantized.pt"
#: Artifacts the report shows when present (a run may leave them out).
OPTIONAL = (EXPORT, PARITY, LATENCY, FISHER, FRONTIER, ALLOCATION)
#: The stage that writes each JSON artifact the report reads (stages.json records the run that did).
WRITTEN_BY = {MODEL: "model", EVAL_FP32: "eval_fp32", EVAL_QUANT: "eval_quant", EXPORT: "export",
              PARITY: "parity", LATENCY: "latency", FRONTIER: "allocate"}

#: The keys the report reads from each JSON artifact.
REQUIRED: dict[str, tuple[str, ...]] = {
    ENVIRONMENT: ("run_id", "command", "started", "packages", "python", "platform", "cpu", "cpu_count"),
    MODEL: ("run_id", "model", "checkpoint", "size", "parameters", "macs", "graph_nodes"),
    EVAL_FP32: ("run_id", "graph", "AP", "AP50", "critical_mAP", "rest_mAP", "categories", "num_images"),
    EVAL_QUANT: ("run_id", "graph", "AP", "AP50", "critical_mAP", "rest_mAP", "categories", "num_images", "quantizers"),
    EXPORT: ("run_id", "runtime", "fp32_bytes", "quant_bytes", "report"),
    PARITY: ("run_id", "max_abs_diff", "AP", "AP50", "critical_mAP", "categories", "num_images"),
    LATENCY: ("run_id", "threads", "size", "rows", "speedup"),
    FISHER: ("format", "nodes"),
    FRONTIER: ("run_id", "budget_kind", "objective", "candidates", "points", "uniform", "chosen"),
    ALLOCATION: ("format", "nodes", "allocation"),
}
#: The keys of each per-category row of an evaluation artifact.
CATEGORY_KEYS = ("id", "name", "AP", "num_gt", "critical")


def write_recipe(run: Path, text: str) -> None:
    """Write the effective recipe (YAML text) to ``run/recipe.yaml``."""
    write_atomic(run / RECIPE, lambda f: f.write(text.encode("utf-8")), mode="wb")


def write_eval(run: Path, name: str, record: dict, metrics: dict) -> None:
    """Write ``record`` and :func:`fxq.evaluation.evaluate_model`'s ``metrics`` (less its detections) to
    ``run/name``."""
    write_json(run / name, {**record, **{k: v for k, v in metrics.items() if k != "detections"}})


def read_run(run: str | Path) -> dict[str, Any]:
    """{recipe, recipe_text, environment, stages, model, fp32, quant, export, parity, latency, fisher, frontier,
    allocation}: the artifacts of the run folder ``run``, checked (the last six None where the run has none)."""
    run = Path(run)
    if not run.is_dir():
        what = "a file" if run.exists() else "missing"
        raise InputError(f"run folder {run} is {what}: give the --out folder of an `fxq pipeline` run")
    missing = [n for n in (RECIPE, ENVIRONMENT, STAGES, MODEL, EVAL_FP32, EVAL_QUANT) if not (run / n).is_file()]
    if missing:
        raise InputError(f"{run} has no {', '.join(missing)}: {_remedy(run)}")
    recipe, recipe_text = _read_recipe(run)
    found = {"recipe": recipe, "recipe_text": recipe_text, "environment": _read_json(run, ENVIRONMENT),
             "model": _read_json(run, MODEL), "fp32": _read_json(run, EVAL_FP32), "quant": _read_json(run, EVAL_QUANT)}
    for name in OPTIONAL:
        found[name.removesuffix(".json")] = _read_json(run, name) if (run / name).is_file() else None
    found["stages"] = read_stages(run)
    _check_same_run(run, found)
    return found


def _check_same_run(run: Path, found: dict) -> None:
    """InputError unless every artifact is the one stages.json records (a run that stopped early, or a file
    copied in from another run, would mix runs)."""
    stages = found["stages"]
    for name, stage in WRITTEN_BY.items():
        record = found.get(_found_key(name))
        if record is None:
            continue
        expected = stages.get(stage, {}).get("run_id")
        if record["run_id"] != expected:
            raise InputError(f"{run / name} is not the one {run / STAGES} records for stage {stage} (run "
                             f"{record['run_id']}, recorded {expected}): {_remedy(run)}")


def _found_key(name: str) -> str:
    return {MODEL: "model", EVAL_FP32: "fp32", EVAL_QUANT: "quant"}.get(name, name.removesuffix(".json"))


def _read_json(run: Path, name: str) -> dict:
    path = run / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged (not valid JSON: {exc}): {_remedy(run)}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is damaged (a {type(data).__name__}, not a JSON object): {_remedy(run)}")
    absent = [key for key in REQUIRED[name] if key not in data]
    if absent:
        raise InputError(f"{path} lacks {', '.join(absent)} (damaged, or written by an older fxq): {_remedy(run)}")
    if "categories" in data:
        _check_categories(path, data["categories"], run)
    return data


def _check_categories(path: Path, rows: Any, run: Path) -> None:
    bad = not isinstance(rows, list) or any(not isinstance(r, dict) or any(k not in r for k in CATEGORY_KEYS)
                                            for r in rows)
    if bad:
        raise InputError(f"{path} is damaged (categories must be rows with {', '.join(CATEGORY_KEYS)}): "
                         f"{_remedy(run)}")


def _read_recipe(run: Path) -> tuple[dict, str]:
    import yaml

    path = run / RECIPE
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged (not valid YAML): {_remedy(run, recipe=False)}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is damaged (not a mapping of options): {_remedy(run, recipe=False)}")
    return data, text


def _remedy(run: Path, recipe: bool = True) -> str:
    """How to make a run folder's artifacts again (from its recipe when it has one and ``recipe``)."""
    source = ["--recipe", str(run / RECIPE)] if recipe and (run / RECIPE).is_file() else []
    return f"run `{shlex.join(['fxq', 'pipeline', *source, '--out', str(run)])}` to make it"
