"""The report's figures as inline SVG: per-category AP of the float and the quantized graph, the Fisher trace of
every layer (overall vs critical), and the allocation's budget frontier."""

from __future__ import annotations

import io
import re

#: Bar colours: (float, quantized) for the rest, then for the critical categories.
REST_COLORS = ("#4c72b0", "#a6bddb")
CRITICAL_COLORS = ("#c44e52", "#f4a582")


def category_ap_svg(fp32_rows: list[dict], quant_rows: list[dict], quant_label: str) -> str:
    """An ``<svg>`` element: per category, float and quantized AP bars; critical categories in red with a shaded
    background and a bold label; categories without ground truth marked "no GT" and drawn without bars."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    quant = {row["name"]: row["AP"] for row in quant_rows}
    names = [row["name"] for row in fp32_rows]
    critical = [bool(row["critical"]) for row in fp32_rows]
    with rc_context({"svg.hashsalt": "fxq-report", "svg.fonttype": "path", "font.size": 9}):
        fig = Figure(figsize=(max(7.0, 0.42 * len(names) + 1.5), 4.2), layout="constrained")
        ax = fig.add_subplot()
        for i, row in enumerate(fp32_rows):
            colors = CRITICAL_COLORS if critical[i] else REST_COLORS
            if critical[i]:
                ax.axvspan(i - 0.5, i + 0.5, color="#fde0dd", zorder=0)
            if row["AP"] < 0:
                ax.text(i, 0.02, "no GT", rotation=90, ha="center", va="bottom", fontsize=7, color="#777777")
                continue
            ax.bar(i - 0.2, row["AP"], 0.4, color=colors[0], zorder=2)
            ax.bar(i + 0.2, max(quant.get(row["name"], 0.0), 0.0), 0.4, color=colors[1], zorder=2)
        _axes(ax, names, critical)
        ax.legend(handles=[Patch(color=REST_COLORS[0], label="fp32"), Patch(color=REST_COLORS[1], label=quant_label),
                           Patch(color=CRITICAL_COLORS[0], label="critical fp32"),
                           Patch(color=CRITICAL_COLORS[1], label=f"critical {quant_label}")],
                  ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        return _svg(fig)


def fisher_svg(layers: list[dict]) -> str:
    """An ``<svg>`` element: each layer's (``name``, ``overall``, ``critical``) Fisher trace in graph order, log
    scale; a layer with a zero trace (no gradient reaches it) is a gap."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    x = range(len(layers))
    with rc_context({"svg.hashsalt": "fxq-report", "svg.fonttype": "path", "font.size": 9}):
        fig = Figure(figsize=(9.0, 3.6), layout="constrained")
        ax = fig.add_subplot()
        ax.semilogy(x, [_positive(r["overall"]) for r in layers], "o-", ms=6, lw=3, alpha=0.45,
                    color=REST_COLORS[0], label="overall (L_A)")  # wide and pale: L_F often lies on top of it
        ax.semilogy(x, [_positive(r["critical"]) for r in layers], "s-", ms=3, lw=1, color=CRITICAL_COLORS[0],
                    label="critical (L_F)")
        ax.set_xlabel("quantizable layer, in graph order")
        ax.set_ylabel("Fisher trace per weight")
        ax.legend(frameon=False)
        ax.grid(color="#eeeeee")
        return _svg(fig)


def _positive(value: float) -> float:
    """``value``, or NaN (a gap in the line) where a log axis cannot show it."""
    return value if value > 0 else float("nan")


def frontier_svg(frontier: dict) -> str:
    """An ``<svg>`` element: the minimal Σ Ω against the budget actually used, the uniform choices and the
    chosen allocation marked."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    points = frontier["points"]
    with rc_context({"svg.hashsalt": "fxq-report", "svg.fonttype": "path", "font.size": 9}):
        fig = Figure(figsize=(6.5, 3.6), layout="constrained")
        ax = fig.add_subplot()
        ax.plot([p["used"] for p in points], [max(p["omega"], 1e-30) for p in points], "o-", ms=3,
                color=REST_COLORS[0], label="optimal allocation (MILP)")
        for bits, p in frontier["uniform"].items():
            ax.plot(p["used"], max(p["omega"], 1e-30), "D", color="#777777")
            ax.annotate(f"uniform {bits}-bit", (p["used"], max(p["omega"], 1e-30)), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        if frontier["chosen"]:
            c = frontier["chosen"]
            ax.plot(c["used"], max(c["omega"], 1e-30), "*", ms=12, color=CRITICAL_COLORS[0], label="chosen")
        ax.set_yscale("log")
        ax.set_xlabel(f"budget used ({frontier['budget_kind']})")
        ax.set_ylabel(f"Σ Ω ({frontier['objective']} Fisher)")
        ax.legend(frameon=False)
        ax.grid(color="#eeeeee")
        return _svg(fig)


def _svg(fig) -> str:
    """``fig`` as an ``<svg>`` element without its metadata block (the same figure gives the same bytes)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], count=1, flags=re.S)


def _axes(ax, names: list[str], critical: list[bool]) -> None:
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("AP @[.50:.95]")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor")
    for label, is_critical in zip(ax.get_xticklabels(), critical, strict=True):
        if is_critical:
            label.set_color(CRITICAL_COLORS[0])
            label.set_fontweight("bold")
    ax.grid(axis="y", color="#dddddd", zorder=1)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
