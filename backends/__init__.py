"""Lowering and runtimes (imported as ``fxq.backends``): ONNX QDQ export, onnxruntime sessions, latency."""

from fxq.backends.bench import Timing, latency_table, profile_onnx, time_onnx, time_torch
from fxq.backends.capabilities import (
    PROVIDERS,
    RUNTIMES,
    RuntimeCapabilities,
    available_providers,
    available_runtimes,
    resolve_provider,
    runtime_capabilities,
)
from fxq.backends.errors import LoweringError
from fxq.backends.int4 import pack_int4, unpack_int4
from fxq.backends.lower_qdq import lower_to_onnx
from fxq.backends.report import LoweringReport
from fxq.backends.runtime_lower import lower_for_runtime
from fxq.backends.runtime_report import NodeExecution, RuntimeLoweringReport
from fxq.backends.session import OrtSession

__all__ = [
    "PROVIDERS",
    "RUNTIMES",
    "LoweringError",
    "LoweringReport",
    "NodeExecution",
    "OrtSession",
    "RuntimeCapabilities",
    "RuntimeLoweringReport",
    "Timing",
    "available_providers",
    "available_runtimes",
    "latency_table",
    "lower_for_runtime",
    "lower_to_onnx",
    "pack_int4",
    "profile_onnx",
    "resolve_provider",
    "runtime_capabilities",
    "time_onnx",
    "time_torch",
    "unpack_int4",
]
