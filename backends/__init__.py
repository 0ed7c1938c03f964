"""Lowering and runtimes (imported as ``fxq.backends``): ONNX QDQ export, onnxruntime sessions, latency."""

from fxq.backends.capabilities import PROVIDERS, available_providers, resolve_provider
from fxq.backends.errors import LoweringError
from fxq.backends.int4 import pack_int4, unpack_int4
from fxq.backends.lower_qdq import lower_to_onnx
from fxq.backends.report import LoweringReport
from fxq.backends.session import OrtSession

__all__ = [
    "PROVIDERS",
    "LoweringError",
    "LoweringReport",
    "OrtSession",
    "available_providers",
    "lower_to_onnx",
    "pack_int4",
    "resolve_provider",
    "unpack_int4",
]
