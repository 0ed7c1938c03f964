"""fxq: compiler-style quantization for DETR-family detectors on torch.fx.

Entry points: :func:`fxq.trace` (model -> annotated GraphModule) and :func:`fxq.models.build`.
"""

from fxq.errors import CheckpointError, FxqError, InputError, TraceError

__all__ = ["CheckpointError", "FxqError", "InputError", "TraceError", "trace", "build"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "trace":
        from fxq.tracing import trace

        return trace
    if name == "build":
        from fxq.models import build

        return build
    if name in ("models", "data", "evaluation", "objectives", "quant", "train", "passes", "backends"):
        import importlib

        return importlib.import_module(f"fxq.{name}")
    raise AttributeError(f"module 'fxq' has no attribute {name!r}")
