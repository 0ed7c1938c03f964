"""What a lowering produced: :class:`LoweringReport` (Q/DQ pairs, integer weights, sizes) and, for a
runtime-aware lowering, :class:`RuntimeLoweringReport` (per quantized FX node, the precision asked for and the
kernel and storage the runtime executes it with)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoweringReport:
    """Summary of one ONNX QDQ lowering.

    ``qdq_pairs``: activation/attention QuantizeLinear→DequantizeLinear pairs by declared bit-width;
    ``weights``: quantized weight initializers by ONNX storage type ("int8", "int4", ...);
    ``clips``: Clip nodes keeping 2/3/5/6/7-bit activations in their declared range;
    ``disabled``: quantizers in "disabled" mode (identity, nothing emitted);
    ``file_bytes``: the saved model (plus its external data file); ``float_bytes``: the same graph exported
    with float weights and no Q/DQ, for comparison.
    """

    path: str
    opset: int
    dynamic: bool
    qdq_pairs: dict[int, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    clips: int = 0
    disabled: int = 0
    file_bytes: int = 0
    float_bytes: int = 0
    external_data: str | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """float_bytes / file_bytes."""
        return self.float_bytes / self.file_bytes if self.file_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        data = asdict(self)
        data["qdq_pairs"] = {str(k): v for k, v in self.qdq_pairs.items()}
        data["compression"] = round(self.compression, 3)
        return data

    def __str__(self) -> str:
        pairs = ", ".join(f"{n}×{b}-bit" for b, n in sorted(self.qdq_pairs.items())) or "none"
        weights = ", ".join(f"{n}×{t}" for t, n in sorted(self.weights.items())) or "none (float)"
        lines = [
            f"ONNX QDQ model: {self.path} (opset {self.opset}, {'dynamic' if self.dynamic else 'static'} shapes)",
            f"  activation Q/DQ pairs: {pairs}" + (f"; {self.clips} with a range Clip" if self.clips else ""),
            f"  weights: {weights}" + (f"; {self.disabled} quantizer(s) disabled" if self.disabled else ""),
            f"  size: {self.file_bytes:,} bytes vs {self.float_bytes:,} float ({self.compression:.2f}× smaller)",
        ]
        if self.external_data:
            lines.append(f"  external data: {self.external_data}")
        return "\n".join(lines)


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
