"""LoweringReport: what a lowering produced (Q/DQ pairs, integer weights, sizes)."""

from __future__ import annotations

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
