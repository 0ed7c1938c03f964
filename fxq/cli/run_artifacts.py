"""The files of a pipeline run folder, one per stage, and their checked reading.

``recipe.yaml`` (the effective options), ``environment.json`` (command, versions, machine), ``model.json`` (the
traced float graph's size), ``eval_fp32.json`` and ``eval_quant.json`` (COCO metrics of the float and the quantized
graph, per category, without the detections) and ``summary.json`` (the rows the pipeline prints). All are written
atomically; :func:`read_run` gives the report what it needs or one InputError naming the file and its fix.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from fxq.errors import InputError
from fxq.io import write_atomic, write_json

RECIPE, ENVIRONMENT, MODEL = "recipe.yaml", "environment.json", "model.json"
EVAL_FP32, EVAL_QUANT, SUMMARY = "eval_fp32.json", "eval_quant.json", "summary.json"
REPORT = "report.html"
ONNX_FP32, ONNX_QUANT = "model_fp32.onnx", "model_quant.onnx"
EXPORT, PARITY, LATENCY = "export.json", "parity.json", "latency.json"
#: Artifacts of the deployment stages: the report shows them when present (a run may skip them).
OPTIONAL = (EXPORT, PARITY, LATENCY)

#: The keys the report reads from each JSON artifact.
REQUIRED: dict[str, tuple[str, ...]] = {
    ENVIRONMENT: ("run_id", "command", "started", "packages", "python", "platform", "cpu", "cpu_count"),
    MODEL: ("run_id", "model", "checkpoint", "size", "parameters", "macs", "graph_nodes"),
    EVAL_FP32: ("run_id", "graph", "AP", "AP50", "critical_mAP", "rest_mAP", "categories", "num_images"),
    EVAL_QUANT: ("run_id", "graph", "AP", "AP50", "critical_mAP", "rest_mAP", "categories", "num_images", "quantizers"),
    EXPORT: ("run_id", "runtime", "fp32_bytes", "quant_bytes", "report"),
    PARITY: ("run_id", "max_abs_diff", "AP", "AP50", "critical_mAP", "categories", "num_images"),
    LATENCY: ("run_id", "threads", "size", "rows", "speedup"),
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
    """{recipe, recipe_text, environment, model, fp32, quant, export, parity, latency}: the artifacts of the run
    folder ``run``, checked (the last three None where the run has none)."""
    run = Path(run)
    if not run.is_dir():
        what = "a file" if run.exists() else "missing"
        raise InputError(f"run folder {run} is {what}: give the --out folder of an `fxq pipeline` run")
    missing = [n for n in (RECIPE, ENVIRONMENT, MODEL, EVAL_FP32, EVAL_QUANT) if not (run / n).is_file()]
    if missing:
        raise InputError(f"{run} has no {', '.join(missing)}: {_remedy(run)}")
    recipe, recipe_text = _read_recipe(run)
    found = {"recipe": recipe, "recipe_text": recipe_text, "environment": _read_json(run, ENVIRONMENT),
             "model": _read_json(run, MODEL), "fp32": _read_json(run, EVAL_FP32), "quant": _read_json(run, EVAL_QUANT)}
    for name in OPTIONAL:
        found[name.removesuffix(".json")] = _read_json(run, name) if (run / name).is_file() else None
    _check_same_run(run, found)
    return found


def _check_same_run(run: Path, found: dict) -> None:
    """InputError unless every artifact comes from the run environment.json describes (a run that stopped early
    leaves the previous run's later files behind)."""
    run_id = found["environment"]["run_id"]
    named = [("model", MODEL), ("fp32", EVAL_FP32), ("quant", EVAL_QUANT),
             *((name.removesuffix(".json"), name) for name in OPTIONAL)]
    for key, name in named:
        if found[key] is not None and found[key]["run_id"] != run_id:
            raise InputError(f"{run / name} is from an earlier run than {run / ENVIRONMENT} (the last run stopped "
                             f"before writing it): {_remedy(run)}")


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
