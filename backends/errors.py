"""The backends' error: a graph that cannot be lowered, naming the FX node at fault."""

from fxq.errors import FxqError


class LoweringError(FxqError):
    """A graph node or quantizer has no ONNX form; the message names the FX node and what to do."""
