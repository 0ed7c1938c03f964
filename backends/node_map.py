"""Which FX node each ONNX compute node of a lowered model computes, and renaming them after it.

The TorchScript exporter names nodes after module scopes (``/gm/Conv_3``, ``/gm/MatMul_17``), which for a
rewritten FX graph says nothing about the FX node. The lowering does know where the graph's quantizers are:

- a conv / linear node reads its weight through ``<weight quantizer>/DequantizeLinear``; the ONNX node that
  consumes that DequantizeLinear output (Conv, MatMul or Gemm) computes the FX node;
- an attention matmul (``attn_qk`` / ``attn_av``) reads two quantized activations; the ONNX MatMul whose
  inputs lead (through Transpose / Reshape / Squeeze / Unsqueeze) to the DequantizeLinear nodes of exactly
  those quantizers computes it;
- a linear's bias is the ONNX ``Add`` that alone consumes the MatMul's output and reads an initializer.

Renamed nodes are called by their FX node name (the bias Add ``<name>/bias``); onnxruntime keeps a fused
node's name from the node it replaces, so its profiles name FX nodes. A weight's own nodes keep their names
(``<weight quantizer>/DequantizeLinear``, ``/Cast``) and map to the FX node reading the weight. Float
(unquantized) nodes are not renamed; :func:`float_node_names` maps the conv / linear nodes of a float export by
their weight tensors instead (an ONNX Conv / MatMul / Gemm whose weight initializer holds exactly the FX node's
weight, or for MatMul its transpose), with a linear's bias Add; onnxruntime's NCHWc transformer renames a float
Conv after its output tensor (``<output>_nchwc``, the output of the Add / Relu it fused), so those names map too.
At the "all" optimization level onnxruntime's NHWC transformer appends
``_token_<n>`` to the names of the nodes it re-lays out; :func:`runtime_name` strips it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import onnx
import torch
import torch.fx

from fxq.roles import ATTENTION_ROLES

#: Ops that only move data between a DequantizeLinear and the matmul that reads it.
_MOVES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
COMPUTE_OPS = {"Conv", "MatMul", "Gemm"}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For every tensor name, the nodes that read it."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _quantizer_behind(name: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    node = producers.get(name)
    while node is not None and node.op_type in _MOVES:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or "/" not in node.name:
        return None
    return node.name.rsplit("/", 1)[0]


def _fx_records(gm: torch.fx.GraphModule) -> tuple[dict[str, str], dict[tuple[str, ...], str]]:
    by_weight, by_inputs = {}, {}
    for node in gm.graph.nodes:
        record = node.meta.get("fxq.quantized_inputs") or {}
        if record.get("weight"):
            by_weight[record["weight"]] = node.name
        elif node.meta.get("fxq.role") in ATTENTION_ROLES and len(record.get("inputs", [])) == 2:
            by_inputs[tuple(record["inputs"])] = node.name
    return by_weight, by_inputs


def fx_node_names(model: onnx.ModelProto, gm: torch.fx.GraphModule) -> dict[str, str]:
    """{ONNX node name: FX node name} for the compute nodes of quantized conv/linear/attention FX nodes."""
    graph = model.graph
    producers, users = _producers(graph), consumers(graph)
    by_weight, by_inputs = _fx_records(gm)
    mapping: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.name.rsplit("/", 1)[0] in by_weight:
            readers = [u for u in users.get(node.output[0], []) if u.op_type in COMPUTE_OPS]
            if len(readers) == 1:
                mapping[readers[0].name] = by_weight[node.name.rsplit("/", 1)[0]]
        elif node.op_type == "MatMul" and node.name not in mapping:
            key = tuple(_quantizer_behind(i, producers) for i in node.input[:2])
            if key in by_inputs:
                mapping[node.name] = by_inputs[key]
    return mapping


def float_node_names(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{ONNX node name: FX node name} for the conv / linear nodes of a float export (and linear bias Adds),
    matched by weight bytes against ``weights`` ({FX node name: its weight}); a weight held by several FX nodes
    with different values is skipped."""
    from onnx import numpy_helper

    owners: dict[bytes, set[str]] = {}
    for name, weight in weights.items():
        weight = weight.detach().float().contiguous()
        keys = {weight.numpy().tobytes()}
        if weight.dim() == 2:
            keys.add(weight.t().contiguous().numpy().tobytes())
        for key in keys:
            owners.setdefault(key, set()).add(name)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    mapping: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        found = owners.get(numpy_helper.to_array(initializers[node.input[1]]).astype("float32").tobytes(), set())
        if len(found) == 1:
            mapping[node.name] = next(iter(found))
            if node.op_type == "Conv":
                mapping.update(dict.fromkeys(_nchwc_names(node, users), mapping[node.name]))
            add = _bias_add(node, users, set(initializers))
            if add is not None:
                mapping[add.name] = mapping[node.name]
    return mapping


#: Ops onnxruntime's CPU provider fuses into a float Conv (FusedConv: Conv + Add + activation).
_CONV_FUSED = {"Add", "Relu"}


def _nchwc_names(conv: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]]) -> list[str]:
    """The names onnxruntime's NCHWc Conv may take: ``<t>_nchwc`` for the Conv's output and for the outputs of
    the Add / Relu chain it can fuse."""
    names, node = [f"{conv.output[0]}_nchwc"], conv
    while True:
        readers = users.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type not in _CONV_FUSED:
            return names
        node = readers[0]
        names.append(f"{node.output[0]}_nchwc")


def _bias_add(node: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]], initializers: set[str]):
    readers = users.get(node.output[0], [])
    if node.op_type == "MatMul" and len(readers) == 1 and readers[0].op_type == "Add" \
            and any(i in initializers for i in readers[0].input):
        return readers[0]
    return None


def rename_to_fx(model: onnx.ModelProto, gm: torch.fx.GraphModule) -> dict[str, str]:
    """Rename (in place) the mapped compute nodes, and linear bias Adds, after their FX nodes; returns
    {ONNX node name: FX node name} for them and for the weights' DequantizeLinear nodes."""
    graph = model.graph
    mapping = fx_node_names(model, gm)
    users, initializers = consumers(graph), {t.name for t in graph.initializer}
    by_weight, _ = _fx_records(gm)
    renamed = {f"{q}/DequantizeLinear": fx for q, fx in by_weight.items()}
    for node in graph.node:
        fx_name = mapping.get(node.name)
        if fx_name is None:
            continue
        add = _bias_add(node, users, initializers)
        if add is not None:
            add.name = f"{fx_name}/bias"
            renamed[add.name] = fx_name
        node.name = fx_name
        renamed[fx_name] = fx_name
    return renamed



_TOKEN = re.compile(r"_token_\d+$")


def runtime_name(name: str) -> str:
    """The name a node had in the model file, from its name in onnxruntime's optimized graph or profile."""
    return _TOKEN.sub("", name)
