"""RuntimeLoweringReport: a lowering report plus, per quantized FX node, the precision asked for and the
kernel and storage the runtime executes it with."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fxq.backends.report import LoweringReport


@dataclass
class NodeExecution:
    """One quantized conv / linear / attention FX node on the runtime.

    ``requested``: the node's policy ("W4A8", "A8" for attention matmuls); ``weight_storage``: the weight's
    type in the file; ``executed``: the precision the kernel computes in ("int8", "int4→int8", "float", ...);
    ``kernel``: the op type onnxruntime runs for it (None when not verified); ``changes``: what the
    runtime-aware lowering did differently from the plain QDQ lowering.
    """

    node: str
    module: str
    role: str
    requested: str
    weight_storage: str | None
    executed: str
    kernel: str | None
    integer: bool | None
    changes: list[str] = field(default_factory=list)


@dataclass
class RuntimeLoweringReport(LoweringReport):
    """:class:`LoweringReport` of a runtime-aware lowering; ``nodes`` one row per quantized compute node;
    ``node_names`` maps the model's ONNX node names to the FX nodes they compute (profiles use them)."""

    runtime: str = ""
    nodes: list[NodeExecution] = field(default_factory=list)
    activation_changes: list[str] = field(default_factory=list)
    node_names: dict[str, str] = field(default_factory=dict)

    @property
    def kernels(self) -> dict[str, int]:
        """How many quantized FX nodes run on each kernel."""
        return dict(Counter(n.kernel or "unverified" for n in self.nodes).most_common())

    @property
    def float_nodes(self) -> list[str]:
        """Quantized FX nodes the runtime executes with a float kernel."""
        return [n.node for n in self.nodes if n.integer is False]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["nodes"] = [asdict(n) for n in self.nodes]
        data["kernels"] = self.kernels
        return data

    def __str__(self) -> str:
        lines = [super().__str__(), f"  runtime {self.runtime}: kernels of the quantized nodes: "
                 + ", ".join(f"{n}×{k}" for k, n in self.kernels.items())]
        changed = [n for n in self.nodes if n.changes]
        if changed:
            lines.append(f"  changed for the runtime ({len(changed)} nodes):")
            lines += [f"    {n.node} ({n.module}, {n.requested}): {'; '.join(n.changes)} → {n.kernel}"
                      for n in changed[:12]]
            if len(changed) > 12:
                lines.append(f"    ... {len(changed) - 12} more (see to_dict()['nodes'])")
        lines += [f"  {line}" for line in self.activation_changes]
        if self.float_nodes:
            lines.append(f"  run by float kernels: {', '.join(self.float_nodes[:8])}"
                         + (f" and {len(self.float_nodes) - 8} more" if len(self.float_nodes) > 8 else ""))
        return "\n".join(lines)
