"""Reports of a Fisher analysis and bit allocation: a text table and a PNG plot.

Reads ``fxq.fisher``, ``fxq.qspec``, ``fxq.module``, ``fxq.weight`` (and ``gm.meta["fxq.allocation"]``);
writes nothing on the graph. Works on a graph whose annotations came from :func:`load_analysis`.
"""

from __future__ import annotations

import math
import os

import torch.fx

from fxq.errors import InputError
from fxq.io import write_atomic
from fxq.passes.weights import parameter, weight_nodes

COLUMNS = ("node", "module", "numel", "fisher_overall", "fisher_critical", "bits")


def allocation_rows(gm: torch.fx.GraphModule) -> list[dict]:
    """One row per conv/linear weight node: node, module, numel, Fisher overall/critical, chosen weight bits."""
    rows = []
    for node, ref in weight_nodes(gm):
        fisher = node.meta.get("fxq.fisher") or {}
        spec = node.meta.get("fxq.qspec")
        rows.append({"node": node.name, "module": node.meta.get("fxq.module", ""),
                     "numel": ref.select(parameter(gm, ref, node)).numel(),
                     "fisher_overall": fisher.get("overall"), "fisher_critical": fisher.get("critical"),
                     "bits": spec.w_bits if spec is not None and spec.w_bits is not None else None})
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3e}" if isinstance(value, float) else str(value)


def allocation_table(gm: torch.fx.GraphModule) -> str:
    """The allocation as a fixed-width text table (bits "float" = weight kept float), with a summary line."""
    rows = allocation_rows(gm)
    cells = [[_fmt(r[c]) if c != "bits" else (str(r["bits"]) if r["bits"] else "float") for c in COLUMNS]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    right = {"numel", "fisher_overall", "fisher_critical", "bits"}
    line = [" ".join(c.rjust(w) if c in right else c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    for row in cells:
        line.append(" ".join(v.rjust(w) if c in right else v.ljust(w)
                             for c, v, w in zip(COLUMNS, row, widths, strict=True)))
    summary = getattr(gm, "meta", {}).get("fxq.allocation")
    if summary:
        line.append(f"{summary['budget_kind']} budget {summary['budget']:.6g}, used {summary['used']:.6g} "
                    f"(smallest feasible {summary['min_budget']:.6g}); Σ sensitivity ({summary['objective']}) "
                    f"{summary['objective_value']:.4e}")
    return "\n".join(line)


def plot_allocation(gm: torch.fx.GraphModule, path: str | os.PathLike, title: str = "Fisher trace and bits") -> None:
    """Write a PNG (atomically): Fisher trace per node on a log axis above the chosen weight bits."""
    from matplotlib.figure import Figure

    rows = allocation_rows(gm)
    if not any(r["fisher_overall"] is not None or r["fisher_critical"] is not None for r in rows):
        raise InputError("no node has a Fisher trace to plot; run fisher_traces (or load_analysis) first")
    fig = Figure(figsize=(max(6.0, 0.12 * len(rows)), 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    x = list(range(len(rows)))
    for key, marker in (("fisher_overall", "o"), ("fisher_critical", "s")):
        ys = [r[key] if r[key] is not None and r[key] > 0 else math.nan for r in rows]
        if any(not math.isnan(y) for y in ys):
            top.plot(x, ys, marker=marker, markersize=3, linewidth=0.8, label=key.replace("_", " "))
    top.set_yscale("log")
    top.set_ylabel("Fisher trace / numel")
    top.legend(loc="best", fontsize=8)
    top.set_title(title)
    bits = [r["bits"] if r["bits"] is not None else 0 for r in rows]
    bottom.bar(x, bits, color=["tab:gray" if b == 0 else "tab:blue" for b in bits])
    bottom.set_ylabel("weight bits (0 = float)")
    bottom.set_xlabel("conv/linear node (graph order)")
    bottom.set_xticks(x, [r["node"] for r in rows], rotation=90, fontsize=5)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
