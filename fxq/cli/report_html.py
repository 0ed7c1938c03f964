"""The run report as one self-contained HTML page: inline style and figures, no scripts, nothing fetched."""

from __future__ import annotations

import html
import shlex
from collections import Counter
from typing import Any

from fxq.cli.report_chart import category_ap_svg, fisher_svg, frontier_svg

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0 auto; max-width: 1100px;
       padding: 16px 28px; line-height: 1.4; }
h1 { font-size: 1.5em; margin: 0.2em 0; }
h2 { font-size: 1.15em; margin: 1.3em 0 0.4em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin: 0 0 0.8em; }
table { border-collapse: collapse; font-size: 0.92em; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 18px; margin: 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
tr.critical td:first-child { color: #c44e52; font-weight: bold; } tr.delta td { color: #555; font-style: italic; }
figure { margin: 0.5em 0; } figure svg { max-width: 100%; height: auto; } figcaption { color: #666; font-size: 0.9em; }
summary { cursor: pointer; margin: 0.4em 0; }
pre { background: #f6f6f6; padding: 8px 10px; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
footer { color: #888; font-size: 0.85em; margin-top: 2em; }
"""


def render_report(run: dict[str, Any], title: str) -> str:
    """The HTML page of a run's artifacts (as :func:`fxq.cli.run_artifacts.read_run` gives them)."""
    model, fp32, quant = run["model"], run["fp32"], run["quant"]
    sections = [
        f"<h1>{_e(model['model'])}: fp32 vs {_e(quant['graph'])}</h1>",
        f"<p class=\"sub\">{_e(title)} · started {_e(run['environment']['started'])}</p>",
        "<h2>Model and recipe</h2>", _summary(run),
        "<h2>Accuracy</h2>", _accuracy(fp32, quant),
        "<h2>Deployment</h2>", _deployment(run),
        "<h2>Per-category AP</h2>", _figure(fp32, quant),
        "<h2>Fisher and allocation</h2>", _analysis(run),
        "<h2>Quantized layers</h2>", _layers(run.get("export")),
        "<h2>Latency by op type</h2>", _latency_profile(run.get("latency")),
        "<h2>Stages</h2>", _stages(run.get("stages") or {}),
        "<h2>Reproduce</h2>", _reproduce(run),
        "<h2>Environment</h2>", _environment(run["environment"]),
        "<h2>Per-category table</h2>", _categories(fp32, quant),
        "<footer>Built by <code>fxq report</code> from the run folder's recipe.yaml, environment.json, stages.json, "
        "model.json, eval_fp32.json, eval_quant.json, fisher.json, frontier.json, allocation.json, export.json, "
        "parity.json and latency.json alone.</footer>",
    ]
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>fxq report: {_e(model['model'])} {_e(quant['graph'])}</title>\n<style>{STYLE}</style>\n"
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")


def _summary(run: dict) -> str:
    recipe, model, quant = run["recipe"], run["model"], run["quant"]
    critical = [row["name"] for row in run["fp32"]["categories"] if row["critical"]]
    asked = " ".join(map(str, recipe.get("critical") or []))
    size = "×".join(str(s) for s in model["size"])
    facts = [
        ("model", model["model"]),
        ("weights", model["checkpoint"] or "fxq's embedded weights"),
        ("parameters", f"{model['parameters']:,}"),
        ("MACs", f"{model['macs'] / 1e9:.3f} G at {size} (batch 1, {model['graph_nodes']} graph nodes)"),
        ("quantization", f"policy {recipe.get('policy')}, calibration {recipe.get('method')}, "
                         f"{quant['quantizers']} fake quantizers"),
        ("data", recipe.get("data") or f"synthetic set (seed {recipe.get('seed')}) in the run folder"),
        ("images", f"{run['fp32']['num_images']} evaluated, {recipe.get('calib_images')} for calibration"),
        ("critical", f"{', '.join(critical) or 'none'} (--critical {asked})"),
    ]
    return _facts(facts)


def _accuracy(fp32: dict, quant: dict) -> str:
    keys = ("AP", "AP50", "critical_mAP", "rest_mAP")
    head = "".join(f"<th class=\"num\">{h}</th>" for h in ("AP", "AP50", "critical AP", "rest AP", "images",
                                                             "detections", "PTQ s"))
    rows = []
    for record in (fp32, quant):
        cells = "".join(f"<td class=\"num\">{_ap(record[k])}</td>" for k in keys)
        rows.append(f"<tr><td>{_e(record['graph'])}</td>{cells}<td class=\"num\">{record['num_images']}</td>"
                    f"<td class=\"num\">{record.get('num_detections', '')}</td>"
                    f"<td class=\"num\">{_seconds(record.get('seconds'))}</td></tr>")
    deltas = "".join(f"<td class=\"num\">{_delta(fp32[k], quant[k])}</td>" for k in keys)
    rows.append(f"<tr class=\"delta\"><td>Δ quantized − fp32</td>{deltas}<td></td><td></td><td></td></tr>")
    return (f"<table id=\"accuracy\"><tr><th>graph</th>{head}</tr>\n" + "\n".join(rows) + "</table>\n"
            "<p class=\"sub\">COCO AP@[.50:.95]; critical / rest AP: mean per-category AP over the critical "
            "categories / the others with ground truth.</p>")


def _deployment(run: dict) -> str:
    """Export, onnxruntime parity and latency facts; a note where the run has none of them."""
    export, parity, latency = run.get("export"), run.get("parity"), run.get("latency")
    if export is None:
        return "<p id=\"deployment\">This run has no export stage (no export.json).</p>"
    facts = [("ONNX file", f"{export['quant_bytes']:,} bytes quantized vs {export['fp32_bytes']:,} float "
                           f"({export['fp32_bytes'] / export['quant_bytes']:.2f}× smaller), prepared for "
                           f"{export['runtime'] or 'plain QDQ (no runtime)'}")]
    nodes = _lowered_nodes(export)
    if nodes:
        kinds = Counter(str(node.get("executed")) for node in nodes)
        facts.append(("quantized nodes run as", ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))))
    if parity is not None:
        diff = parity["max_abs_diff"]
        facts.append(("onnxruntime vs fake-quant graph", f"max |Δ| logits {diff['pred_logits']:.2e}, boxes "
                      f"{diff['pred_boxes']:.2e} over {parity['num_images']} images"))
        facts.append(("onnxruntime accuracy", f"AP {_ap(parity['AP'])}, AP50 {_ap(parity['AP50'])}, critical AP "
                                               f"{_ap(parity['critical_mAP'])}"))
    if latency is not None:
        rows = latency["rows"]
        facts.append(("latency (batch 1, interleaved)",
                      f"fp32 {rows['fp32']['median_ms']:.1f} ms (p90 {rows['fp32']['p90_ms']:.1f}), quantized "
                      f"{rows['quantized']['median_ms']:.1f} ms (p90 {rows['quantized']['p90_ms']:.1f}): "
                      f"{latency['speedup']:.2f}× at {'×'.join(map(str, latency['size']))}, "
                      f"{latency['threads'] or 'default'} threads, {rows['fp32']['runs']} runs each"))
    return f"<div id=\"deployment\">{_facts(facts)}</div>"


def _layers(export: dict | None) -> str:
    """The quantized nodes in graph order: requested precision, weight storage, how and on which kernel they run."""
    nodes = _lowered_nodes(export)
    if not nodes:
        return "<p id=\"layers\">No per-node lowering report in this run (plain QDQ export, or no export).</p>"
    cols = ("node", "role", "requested", "weight_storage", "executed", "kernel")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    rows = "\n".join("<tr>" + "".join(f"<td>{_e(n.get(c) or '')}</td>" for c in cols) + "</tr>" for n in nodes)
    return (f"<details><summary>{len(nodes)} quantized nodes, in graph order</summary>"
            f"<table id=\"layers\"><tr>{head}</tr>\n{rows}</table></details>")


def _lowered_nodes(export: dict | None) -> list[dict]:
    """The per-node rows of a runtime-aware lowering report (none for a plain QDQ export or no export)."""
    report = (export or {}).get("report")
    return report.get("nodes") or [] if isinstance(report, dict) else []


def _analysis(run: dict) -> str:
    """The Fisher trace of every layer (overall vs critical), the budget frontier and the per-layer table."""
    fisher, frontier, allocation = run.get("fisher"), run.get("frontier"), run.get("allocation")
    if fisher is None:
        return "<p id=\"analysis\">This run has no Fisher analysis (no fisher.json).</p>"
    layers = [{"name": name, **{k: rec["fxq.fisher"][k] for k in ("overall", "critical")}}
              for name, rec in fisher["nodes"].items() if "fxq.fisher" in rec]
    parts = [f"<figure id=\"fisher-figure\">{fisher_svg(layers)}<figcaption>Empirical Fisher trace per weight of "
             f"each of the {len(layers)} quantizable layers: overall loss L_A (blue) and critical loss L_F (red), "
             "on the calibration images.</figcaption></figure>"]
    if frontier is not None:
        chosen = frontier["chosen"]
        what = (f"the chosen allocation (star) uses {chosen['used']:.4g} of budget {chosen['budget']:.4g}"
                if chosen else "this run uses a uniform policy (no --budget)")
        parts.append(f"<figure id=\"frontier-figure\">{frontier_svg(frontier)}<figcaption>Budget frontier: the "
                     f"smallest Σ Ω ({_e(frontier['objective'])} Fisher × weight quantization error) the MILP "
                     f"reaches at each {_e(frontier['budget_kind'])} budget, against the uniform choices; {_e(what)}."
                     "</figcaption></figure>")
    parts.append(_layer_table(layers, (allocation or {}).get("nodes") or {}))
    return "\n".join(parts)


def _layer_table(layers: list[dict], allocated: dict) -> str:
    cols = "".join(f"<th class=\"num\">{c}</th>" for c in ("Fisher overall", "Fisher critical", "critical / overall",
                                                           "weight bits", "Ω at those bits"))
    rows = []
    for layer in layers:
        record = allocated.get(layer["name"], {})
        bits = (record.get("fxq.qspec") or {}).get("w_bits")
        omega = (record.get("fxq.sensitivity") or {}).get(str(bits)) if bits is not None else None
        ratio = layer["critical"] / layer["overall"] if layer["overall"] else float("nan")
        rows.append(f"<tr><td>{_e(layer['name'])}</td><td class=\"num\">{layer['overall']:.3e}</td>"
                    f"<td class=\"num\">{layer['critical']:.3e}</td><td class=\"num\">{ratio:.2f}</td>"
                    f"<td class=\"num\">{'' if bits is None else bits}</td>"
                    f"<td class=\"num\">{'' if omega is None else f'{omega:.3e}'}</td></tr>")
    note = "" if allocated else " (weight bits: the run's uniform policy)"
    return (f"<details><summary>{len(layers)} quantizable layers, in graph order{note}</summary>"
            f"<table id=\"fisher-layers\"><tr><th>node</th>{cols}</tr>\n" + "\n".join(rows) + "</table></details>")


#: Op types the latency table lists one by one (the slowest in either file); the rest are summed.
OP_ROWS = 12


def _latency_profile(latency: dict | None) -> str:
    """Kernel milliseconds per op type of both ONNX files, and the quantized file's slowest nodes."""
    profile = (latency or {}).get("profile")
    if not profile:
        return "<p id=\"latency-profile\">This run has no latency profile (--latency-runs 0).</p>"
    fp32, quant = profile["fp32"], profile["quantized"]
    ops = sorted(set(fp32["by_op"]) | set(quant["by_op"]),
                 key=lambda op: -max(fp32["by_op"].get(op, 0.0), quant["by_op"].get(op, 0.0)))
    shown, rest = ops[:OP_ROWS], ops[OP_ROWS:]
    rows = "".join(f"<tr><td>{_e(op)}</td><td class=\"num\">{_ms(fp32['by_op'].get(op))}</td>"
                   f"<td class=\"num\">{_ms(quant['by_op'].get(op))}</td></tr>" for op in shown)
    if rest:
        rows += (f"<tr><td>{len(rest)} other op types</td><td class=\"num\">"
                 f"{_ms(sum(fp32['by_op'].get(op, 0.0) for op in rest))}</td><td class=\"num\">"
                 f"{_ms(sum(quant['by_op'].get(op, 0.0) for op in rest))}</td></tr>")
    slow = "".join(f"<tr><td>{_e(n['node'])}</td><td>{_e(n['op'])}</td><td class=\"num\">{n['ms']:.3f}</td></tr>"
                   for n in quant["slowest"])
    return (f"<table id=\"op-types\"><tr><th>op type</th><th class=\"num\">fp32 ms</th>"
            f"<th class=\"num\">quantized ms</th></tr>{rows}<tr><td>all kernels</td><td class=\"num\">"
            f"{fp32['kernel_ms']:.2f}</td><td class=\"num\">{quant['kernel_ms']:.2f}</td></tr></table>"
            f"<p class=\"sub\">onnxruntime's profiler, mean of {quant['runs']} runs per file after a warm-up; "
            "kernel time only (the timed medians above include the session's overhead).</p>"
            f"<details><summary>the quantized file's {len(quant['slowest'])} slowest nodes</summary>"
            f"<table id=\"slowest-nodes\"><tr><th>node</th><th>op</th><th class=\"num\">ms</th></tr>{slow}"
            "</table></details>")


def _stages(stages: dict) -> str:
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{_e(r['run_id'])}</td><td class=\"num\">{r['seconds']:.1f}</td>"
                   f"<td>{_e(', '.join(r.get('artifacts') or []))}</td></tr>" for name, r in stages.items())
    return (f"<table id=\"stages\"><tr><th>stage</th><th>run</th><th class=\"num\">seconds</th><th>artifacts"
            f"</th></tr>{rows}</table><p class=\"sub\">A rerun with the same recipe keeps the stages whose inputs "
            "did not change; the run column says which invocation made each.</p>")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _figure(fp32: dict, quant: dict) -> str:
    svg = category_ap_svg(fp32["categories"], quant["categories"], quant["graph"])
    return (f"<figure id=\"per-category-figure\">{svg}<figcaption>AP per category, fp32 (dark) vs "
            f"{_e(quant['graph'])} (light); critical categories in red on a shaded band.</figcaption></figure>")


def _reproduce(run: dict) -> str:
    env = run["environment"]
    return (f"<p>Command (every option spelled out):</p><pre id=\"command\">{_e(_shell_lines(env['command']))}</pre>"
            f"<details><summary>Recipe: <code>recipe.yaml</code> of the run folder, for <code>fxq pipeline --recipe"
            f"</code></summary><pre id=\"recipe\">{_e(run['recipe_text'])}</pre></details>"
            f"<p>Process command line: <code>{_e(shlex.join(env.get('argv', [])))}</code></p>")


def _shell_lines(command: str) -> str:
    """``command`` with one option per line, joined by backslash-newlines (it pastes into a shell as it is)."""
    words, lines = shlex.split(command), []
    for word in words:
        if word.startswith("--") or not lines:
            lines.append([word])
        else:
            lines[-1].append(word)
    return " \\\n    ".join(shlex.join(line) for line in lines)


def _environment(env: dict) -> str:
    facts = [("python", env["python"]), ("platform", env["platform"]), ("CPU", env["cpu"]),
             ("CPUs", f"{env['cpu_count']} ({env.get('cpus_available', env['cpu_count'])} available to the run, "
                      f"{env.get('torch_threads', '?')} torch threads)")]
    packages = "".join(f"<tr><td>{_e(name)}</td><td>{_e(version or 'not installed')}</td></tr>"
                       for name, version in env["packages"].items())
    return _facts(facts) + f"<table id=\"packages\"><tr><th>package</th><th>version</th></tr>{packages}</table>"


def _categories(fp32: dict, quant: dict) -> str:
    quant_ap = {row["name"]: row["AP"] for row in quant["categories"]}
    rows = []
    for row in fp32["categories"]:
        q = quant_ap.get(row["name"], -1.0)
        cls = " class=\"critical\"" if row["critical"] else ""
        rows.append(f"<tr{cls}><td>{_e(row['name'])}</td><td class=\"num\">{row['num_gt']}</td>"
                    f"<td class=\"num\">{_ap(row['AP'])}</td><td class=\"num\">{_ap(q)}</td>"
                    f"<td class=\"num\">{_delta(row['AP'], q)}</td></tr>")
    head = ("<tr><th>category</th><th class=\"num\">GT boxes</th><th class=\"num\">fp32 AP</th>"
            f"<th class=\"num\">{_e(quant['graph'])} AP</th><th class=\"num\">Δ</th></tr>")
    return f"<table id=\"per-category\">{head}\n" + "\n".join(rows) + "</table>"


def _facts(pairs: list[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs)
    return f"<dl class=\"facts\">{items}</dl>"


def _ap(value: float | None) -> str:
    """An AP as shown: three decimals, "—" when undefined (None), "n/a" without ground truth (negative)."""
    if value is None:
        return "—"
    return "n/a" if value < 0 else f"{value:.3f}"


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or a < 0 or b < 0:
        return ""
    return f"{b - a:+.3f}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _e(value: Any) -> str:
    return html.escape(str(value))
