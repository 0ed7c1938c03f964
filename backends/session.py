"""An onnxruntime session over a lowered detector: batched image tensor in, named torch tensors out."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fxq.backends.capabilities import resolve_provider
from fxq.backends.tensorrt_rules import tensorrt_violations
from fxq.errors import InputError

#: Graph optimization levels by name.
OPTIMIZATIONS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: ORT fuses a weight-only DequantizeLinear→MatMul into MatMulNBits; at accuracy level 4 (ORT's default) that
#: kernel quantizes the activations to int8 on the fly, which is not the graph's numerics; 1 computes in fp32.
MATMULNBITS_ACCURACY_LEVEL = 1

#: On x86-64 CPUs without VNNI, ORT's u8×s8 kernels add pairs of products in int16 (VPMADDUBSW) and saturate
#: them, so a conv or matmul whose int8 weights leave [-64, 63] gives wrong integers (seen on AVX2 EPYCs: logit
#: errors of 0.4 and whole output steps). This session option makes ORT re-store such weights as u8 and use its
#: exact u8×u8 kernels. With VNNI (int32 accumulation) the u8×s8 kernels are exact already and the option only
#: costs time (1.8-2.8× on a Xeon with AVX-512 VNNI and AMX, same outputs bit for bit), so by default it is set
#: only where the CPU needs it (:func:`needs_exact_int8`).
EXACT_INT8_OPTION = "session.x64quantprecision"
#: /proc/cpuinfo flags of x86 CPUs whose u8×s8 dot products accumulate in int32 (no saturation).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def needs_exact_int8(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether ORT's u8×s8 CPU kernels can saturate here: an x86-64 CPU whose flags (``cpuinfo``: the text of
    /proc/cpuinfo, read when None) show no VNNI; True where the flags cannot be read, False off x86."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return not flags & set(VNNI_FLAGS)


def session_options(threads: int | None = None, optimization: str = "all", *,
                    matmulnbits_accuracy_level: int = MATMULNBITS_ACCURACY_LEVEL,
                    exact_int8: bool | None = None) -> ort.SessionOptions:
    """onnxruntime session options that run a QDQ graph with its own numerics (see ``EXACT_INT8_OPTION`` and
    ``MATMULNBITS_ACCURACY_LEVEL``); ``exact_int8`` None sets the option where the CPU needs it, False lets
    non-VNNI x86 CPUs saturate for speed."""
    if optimization not in OPTIMIZATIONS:
        raise InputError(f"optimization={optimization!r} is unknown; use one of {list(OPTIMIZATIONS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads={threads!r} must be a positive integer (or None for onnxruntime's default)")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATIONS[optimization]
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmulnbits_accuracy_level))
    exact = needs_exact_int8() if exact_int8 is None else exact_int8
    options.add_session_config_entry(EXACT_INT8_OPTION, "1" if exact else "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


#: onnxruntime 1.32 CPU's s8→u8 rewrite of QDQ graphs breaks the QuantizeLinear nodes its own QDQ propagation and
#: MatMul+Add→Gemm fusion create in signed int8 files ("output_dtype INT8 does not match y_zero_point type UINT8",
#: e.g. a static-shape tensorrt file); the rewrite only swaps s8 for u8 kernels, so leaving it out keeps the numerics.
S8_TO_U8_REWRITE = "QDQS8ToU8Transformer"
_S8_TO_U8_FAILURE = "does not match y_zero_point type"


def _create(model: str | bytes, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """``ort.InferenceSession``, without :data:`S8_TO_U8_REWRITE` where that rewrite makes the file fail to load."""
    try:
        return ort.InferenceSession(model, options, providers=[provider])
    except Exception as exc:  # onnxruntime's own pybind exception types
        if _S8_TO_U8_FAILURE not in str(exc):
            raise
    return ort.InferenceSession(model, options, providers=[provider], disabled_optimizers=[S8_TO_U8_REWRITE])


def inference_session(model: str | bytes, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """``ort.InferenceSession(model, options)``; where onnxruntime's exact-int8 rewrite (``EXACT_INT8_OPTION``) cannot
    handle the file (1.32 fails on quantize_static's QDQ files: "Attempt to replace the existing tensor"), the
    session with its default int8 kernels, and a warning saying so (and :data:`S8_TO_U8_REWRITE` left out where it
    breaks the file)."""
    try:
        return _create(model, options, provider)
    except Exception as exc:  # onnxruntime's own pybind exception types
        if options.get_session_config_entry(EXACT_INT8_OPTION) != "1":
            raise
        error = exc
    options.add_session_config_entry(EXACT_INT8_OPTION, "0")
    try:
        session = _create(model, options, provider)
    except Exception:
        raise error from None
    name = model if isinstance(model, str) else "a model"
    first = str(error).strip().splitlines()[0][-120:]
    warnings.warn(f"onnxruntime {ort.__version__} cannot apply {EXACT_INT8_OPTION} to {name} (...{first}); it runs "
                  "with the default int8 kernels, which saturate on x86 CPUs without VNNI", stacklevel=3)
    return session


def _open(path: Path, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    if not path.is_file():
        raise InputError(f"ONNX model {str(path)!r} does not exist; write one with fxq.backends.lower_to_onnx")
    try:
        return inference_session(str(path), options, provider)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{str(path)!r} is not an ONNX model onnxruntime can load ({first}); pass a .onnx file "
                         "written by fxq.backends.lower_to_onnx or torch.onnx.export") from None


def _check_tensorrt_placement(path: Path) -> None:
    """InputError naming the first node of the file at ``path`` that breaks a TensorRT Q/DQ rule (TensorRT would
    otherwise reject it mid-build, or run it with float fallbacks); a file onnx cannot read is left to onnxruntime."""
    try:
        violations = tensorrt_violations(path)
    except Exception:  # not an ONNX protobuf: _open names the problem
        return
    if violations:
        raise InputError(f"{path.name} cannot run under TensorRT: {violations[0]}; lower it with "
                         "fxq export --runtime tensorrt")


def image_array(images: torch.Tensor, input_names: list[str], session: str) -> np.ndarray:
    """``images`` [B, 3, H, W] as the contiguous float32 array a session feeds its one input; InputError for
    another shape or dtype, or a model with other inputs (``session``: the class named in the error)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a float tensor [B, 3, H, W], got {got}")
    if len(input_names) != 1:
        raise InputError(f"the model takes inputs {input_names}; {session}.run feeds images only")
    return np.ascontiguousarray(images.detach().cpu().to(torch.float32).numpy())


class OrtSession:
    """An onnxruntime InferenceSession on ``provider`` ("cpu", "cuda", "tensorrt") for an ONNX detector.

    ``threads`` sets the intra-op thread count (None = onnxruntime's default); ``optimization`` the graph
    optimization level ("disable", "basic", "extended", "all"); ``matmulnbits_accuracy_level`` the compute
    type of fused MatMulNBits kernels (1 = fp32, the graph's numerics; 4 = int8 activations, faster);
    ``exact_int8`` (``EXACT_INT8_OPTION``): None sets it where the CPU needs it, True always, False allows the
    saturating u8×s8 kernels of x86 CPUs without VNNI.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", *, threads: int | None = None,
                 optimization: str = "all", matmulnbits_accuracy_level: int = MATMULNBITS_ACCURACY_LEVEL,
                 exact_int8: bool | None = None) -> None:
        self.path = Path(path)
        self.provider = resolve_provider(provider)
        if self.provider == "TensorrtExecutionProvider" and self.path.is_file():
            _check_tensorrt_placement(self.path)
        options = session_options(threads, optimization, matmulnbits_accuracy_level=matmulnbits_accuracy_level,
                                  exact_int8=exact_int8)
        self.session = _open(self.path, options, self.provider)
        self.exact_int8 = options.get_session_config_entry(EXACT_INT8_OPTION) == "1"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs (``pred_logits``, ``pred_boxes``) as CPU torch tensors for images [B, 3, H, W]."""
        feed = {self.input_names[0]: image_array(images, self.input_names, "OrtSession")}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as exc:  # shape or type mismatches from onnxruntime
            raise InputError(f"onnxruntime could not run {self.path.name} on images {tuple(images.shape)}: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outputs, strict=True)}

    __call__ = run
