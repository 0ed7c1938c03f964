"""Lowering and runtimes (imported as ``fxq.backends``): ONNX QDQ export, runtime-aware lowering, onnxruntime and
OpenVINO sessions (:func:`~fxq.backends.runtime_session.open_session` picks one by provider name), what each runtime
offers, and TensorRT's Q/DQ rules (:mod:`fxq.backends.tensorrt_rules`). Benchmarking lives above, in
:mod:`fxq.bench`; the runtimes' profiles are plain data in :mod:`fxq.targets`. This layer imports neither
:mod:`fxq.passes` nor :mod:`fxq.bench`.
"""

from fxq.backends.capabilities import (
    PROVIDERS,
    available_providers,
    available_runtimes,
    resolve_provider,
    runtime_capabilities,
)
from fxq.backends.lower_qdq import lower_to_onnx
from fxq.backends.openvino_session import OpenVinoSession
from fxq.backends.qtensor import pack_int4, unpack_int4
from fxq.backends.report import LoweringReport, NodeExecution, RuntimeLoweringReport
from fxq.backends.runtime_lower import lower_for_runtime
from fxq.backends.runtime_session import open_session
from fxq.backends.session import OrtSession
from fxq.backends.tensorrt_rules import check_tensorrt
from fxq.errors import LoweringError

__all__ = [
    "PROVIDERS",
    "LoweringError",
    "LoweringReport",
    "NodeExecution",
    "OpenVinoSession",
    "OrtSession",
    "RuntimeLoweringReport",
    "available_providers",
    "available_runtimes",
    "check_tensorrt",
    "lower_for_runtime",
    "lower_to_onnx",
    "open_session",
    "pack_int4",
    "resolve_provider",
    "runtime_capabilities",
    "unpack_int4",
]
