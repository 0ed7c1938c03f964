"""The one exception family of fxq: every user-facing failure names its cause and its fix."""


class FxqError(Exception):
    """Base class of fxq's errors; the message says what went wrong and how to fix it."""


class TraceError(FxqError):
    """A model could not be traced to an FX graph."""


class CheckpointError(FxqError):
    """A checkpoint file could not be read or does not fit the model."""


class InputError(FxqError):
    """An input tensor, file or argument is not what the operation needs."""


class LoweringError(FxqError):
    """A graph node or quantizer has no ONNX form; the message names the FX node and what to do."""
