"""The report's per-category figure: AP of the float and the quantized graph side by side, as inline SVG."""

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
