"""Per-role summary of a traced graph: node counts, parameters and multiply-accumulates."""

from __future__ import annotations

from collections import defaultdict

import torch.fx


def role_summary(gm: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """``{role: {"nodes", "params", "macs"}}`` summed over the graph's nodes, roles sorted by name."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"nodes": 0, "params": 0, "macs": 0})
    for node in gm.graph.nodes:
        row = table[node.meta["fxq.role"]]
        row["nodes"] += 1
        row["params"] += node.meta.get("fxq.params", 0)
        row["macs"] += node.meta.get("fxq.macs", 0)
    return dict(sorted(table.items()))


def format_summary(summary: dict[str, dict[str, int]], title: str) -> str:
    """A fixed-width text table of :func:`role_summary`, with a total row."""
    lines = [title, f"{'role':<14}{'nodes':>8}{'params':>14}{'GMACs':>12}"]
    for role, row in summary.items():
        lines.append(f"{role:<14}{row['nodes']:>8}{row['params']:>14,}{row['macs'] / 1e9:>12.3f}")
    total = {k: sum(r[k] for r in summary.values()) for k in ("nodes", "params", "macs")}
    lines.append(f"{'total':<14}{total['nodes']:>8}{total['params']:>14,}{total['macs'] / 1e9:>12.3f}")
    return "\n".join(lines)
