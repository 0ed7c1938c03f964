"""Small QDQ models, one per capability fact, and what onnxruntime's optimizer turns them into.

:func:`probe_model` builds a one-operator QDQ graph (Conv, MatMul with a constant weight, or MatMul of two
activations as in Q·Kᵀ) in a chosen storage; :func:`optimized_ops` returns the op types of the graph
onnxruntime actually runs (``SessionOptions.optimized_model_filepath``). The capability table
(:mod:`fxq.backends.capabilities`) states, for each fact, the kernel the probe must become; the tests run
every probe on the installed onnxruntime so the table cannot silently go stale.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fxq.backends.session import inference_session, session_options

_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint16": TensorProto.UINT16,
          "uint4": TensorProto.UINT4, "int4": TensorProto.INT4}
_RANGES = {"int8": (-127, 127), "int4": (-8, 7)}
CHANNELS, KERNEL, SIZE = 16, 3, 12
K, N, ROWS = 64, 48, 20


def _qdq(name: str, act: str, zero_point: int, inits: list) -> list[onnx.NodeProto]:
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), f"{name}_s"),
              helper.make_tensor(f"{name}_z", _TYPES[act], [], [zero_point])]
    return [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]


def _weight(values: np.ndarray, storage: str, axis: int, inits: list) -> list[onnx.NodeProto]:
    """DequantizeLinear of a constant per-channel weight; ``storage`` int8, int4, int4_cast or int4_blocked."""
    base = "int4" if storage.startswith("int4") else "int8"
    low, high = _RANGES[base]
    q = np.clip(np.round(values / 0.01), low, high).astype(np.int64)
    channels = q.shape[axis]
    inits.append(helper.make_tensor("w_q", _TYPES[base], q.shape, q.flatten().tolist()))
    zp_type, source, nodes = _TYPES[base], "w_q", []
    attrs: dict = {"axis": axis}
    scale_shape: tuple[int, ...] = (channels,)
    if storage == "int4_cast":
        nodes.append(helper.make_node("Cast", ["w_q"], ["w_c"], to=TensorProto.INT8))
        zp_type, source = TensorProto.INT8, "w_c"
    elif storage == "int4_blocked":
        attrs, scale_shape = {"axis": 0, "block_size": 16}, (q.shape[0] // 16, q.shape[1])
    count = int(np.prod(scale_shape))
    inits += [numpy_helper.from_array(np.full(scale_shape, 0.01, np.float32), "w_s"),
              helper.make_tensor("w_z", zp_type, scale_shape, [0] * count)]
    nodes.append(helper.make_node("DequantizeLinear", [source, "w_s", "w_z"], ["w_dq"], **attrs))
    return nodes


def _bias(kind: str | None, size: int, inits: list, nodes: list) -> list[str]:
    rng = np.random.default_rng(1)
    if kind == "float":
        inits.append(numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), "b"))
        return ["b"]
    if kind == "int32":
        inits += [numpy_helper.from_array(rng.integers(-999, 999, size).astype(np.int32), "b_q"),
                  numpy_helper.from_array(np.full(size, 5e-4, np.float32), "b_s"),
                  numpy_helper.from_array(np.zeros(size, np.int32), "b_z")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b_dq"], axis=0))
        return ["b_dq"]
    return []


def probe_model(op: str = "conv", act: str | None = "uint8", weight: str = "int8", output_q: bool = False,
                relu: bool = False, bias: str | None = None, static: bool = True) -> onnx.ModelProto:
    """A one-operator QDQ model: ``op`` "conv", "matmul" (constant weight) or "matmul_act" (two activations,
    the second transposed like Kᵀ); ``act`` the activation storage (None = float input); ``weight`` the weight
    storage; optional output Q/DQ, Relu before it, bias ("float" / "int32"; for matmul a float Add)."""
    rng = np.random.default_rng(0)
    inits: list = []
    zp = 0 if act is None or act.startswith("int") else 128 if act == "uint8" else 8
    nodes = _qdq("x", act, zp, inits) if act else [helper.make_node("Identity", ["x"], ["x_dq"])]
    if op == "conv":
        nodes += _weight(rng.standard_normal((CHANNELS, 8, KERNEL, KERNEL)).astype(np.float32) * 0.1, weight, 0,
                         inits)
        nodes.append(helper.make_node("Conv", ["x_dq", "w_dq", *_bias(bias, CHANNELS, inits, nodes)], ["y"],
                                      pads=[1, 1, 1, 1]))
        inputs = [("x", [1, 8, SIZE, SIZE] if static else ["B", 8, "H", "W"])]
    elif op == "matmul":
        nodes += _weight(rng.standard_normal((K, N)).astype(np.float32) * 0.1, weight, 1, inits)
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]))
        if bias:
            nodes.append(helper.make_node("Add", ["y", *_bias("float", N, inits, nodes)], ["y_b"]))
        inputs = [("x", [ROWS, 1, K] if static else ["L", "B", K])]
    else:
        nodes += _qdq("k", act, zp, inits)
        nodes += [helper.make_node("Transpose", ["k_dq"], ["k_t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["x_dq", "k_t"], ["y"])]
        inputs = [("x", [4, ROWS, 32]), ("k", [4, ROWS, 32])]
    out = "y_b" if op == "matmul" and bias else "y"
    if relu:
        nodes.append(helper.make_node("Relu", [out], ["y_r"]))
        out = "y_r"
    if output_q:
        nodes += _qdq(out, act or "uint8", 0 if relu else zp, inits)
        out = f"{out}_dq"
    nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(nodes, f"probe_{op}", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                     for n, s in inputs],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def optimized_model(model: onnx.ModelProto | str | os.PathLike, provider: str = "CPUExecutionProvider",
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> onnx.ModelProto:
    """The graph onnxruntime runs for ``model`` on ``provider`` after its graph optimizations."""
    options = session_options(threads=1)
    options.graph_optimization_level = level
    options.log_severity_level = 3  # the "hardware specific optimizations" notice when saving level "all"
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        inference_session(source, options, provider)
        return onnx.load(options.optimized_model_filepath)


def optimized_ops(model: onnx.ModelProto, provider: str = "CPUExecutionProvider") -> Counter:
    """Op types (with counts) of the optimized graph of ``model``."""
    return Counter(n.op_type for n in optimized_model(model, provider).graph.node)
