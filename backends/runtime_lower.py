"""Runtime-aware lowering: an ONNX QDQ model whose quantized nodes run on the runtime's fast kernels at the
numerics of the fake-quant graph, and a report of what runs where.

On top of :func:`fxq.backends.lower_to_onnx` (same markers, same scales), for ``runtime="ort-cpu"``
(:data:`fxq.targets.TARGETS` and :mod:`fxq.backends.capabilities` say why):

- activations of 2–4 bits are stored uint8 / int8 with a Clip keeping their range (ORT has no 4-bit
  activation kernel; the integers are the same);
- 2–4-bit weights read with quantized activations stay int4 in the file and are cast to int8 at load, so the
  int8 kernels run them; weight-only 4-bit MatMul weights are blocked for MatMulNBits;
- a quantized Conv's bias is stored int32 with scale s_x·s_w;
- a strided conv on few input channels (the ResNet stem) runs as space-to-depth + a stride-1 conv
  (:mod:`fxq.backends.space_to_depth`, same integer sums, about twice as fast);
- a quantized linear whose output stays float runs as MatMulIntegerToFloat with its bias folded in
  (:mod:`fxq.backends.matmul_bias`, same numerics as onnxruntime's own fusion plus the Add);
- compute nodes are renamed after their FX nodes (:mod:`fxq.backends.node_map`), so profiles name FX nodes.

For ``runtime="openvino"`` the same rewrites apply (:data:`fxq.targets.TARGETS` says which; OpenVINO's executed
layers and their precisions are read from its runtime model). For ``runtime="tensorrt"`` the file follows
TensorRT's explicit-quantization rules instead: no int32 biases, no casts, no space-to-depth, 4-bit weights
stored int8; after writing, :func:`fxq.backends.tensorrt_rules.check_tensorrt` checks every rule (LoweringError
naming the node and the rule), and the report's kernels are the weighted ops TensorRT runs in int8.

On ORT CPU a Conv is fused only if the graph quantizes its output: run
:func:`fxq.passes.runtime_prep.insert_output_quantizers` before calibration (and
:func:`~fxq.passes.runtime_prep.quantize_biases` after it, so that the PyTorch graph adds the same int32
bias). The report's rows say, per quantized FX node, the requested precision, the stored weight type, the
kernel onnxruntime actually runs (read from its optimized graph when ``verify``) and what was changed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx

from fxq.backends.capabilities import runtime_capabilities
from fxq.backends.constants import constant_value
from fxq.backends.fusion_probes import optimized_model
from fxq.backends.lower_qdq import EXTERNAL_DATA_THRESHOLD, build_qdq_model, check_arguments, save_lowered
from fxq.backends.matmul_bias import fuse_matmul_bias
from fxq.backends.node_map import rename_to_fx, runtime_name
from fxq.backends.openvino_facts import FOLDED, executed_layers
from fxq.backends.qdq_commute import sink_qdq_below_movement
from fxq.backends.qdq_rewrite import prune
from fxq.backends.qtensor import type_name
from fxq.backends.quant_points import QuantPoint, collect_points
from fxq.backends.report import NodeExecution, RuntimeLoweringReport
from fxq.backends.runtime_rewrite import narrow_weights, quantize_conv_biases
from fxq.backends.space_to_depth import space_to_depth_convs
from fxq.backends.tensorrt_rules import check_tensorrt
from fxq.quant import format_policy
from fxq.roles import ATTENTION_ROLES
from fxq.targets import TargetProfile

#: Kernels that read narrow weights but compute in floating point (weight-only quantization).
WEIGHT_ONLY_KERNELS = ("MatMulNBits", "FullyConnected/i4")


def _widen(points: dict[str, QuantPoint], caps: TargetProfile) -> tuple[dict, list[str]]:
    """Points stored at the profile's activation / weight widths, and a note per kind widened."""
    widths = {"activation": caps.activation_storage_bits, "weight": caps.weight_storage_bits}
    out, widened = {}, {"activation": 0, "weight": 0}
    for name, p in points.items():
        kind = "weight" if p.kind == "weight" else "activation"
        width = widths[kind]
        if width is not None and p.enabled and p.storage_bits < width:
            p = dataclasses.replace(p, min_storage_bits=width)
            widened[kind] += 1
        out[name] = p
    notes = []
    if widened["activation"]:
        notes.append(f"{widened['activation']} activation quantizer(s) of ≤4 bits stored in "
                     f"{caps.activation_storage_bits}-bit types with a range Clip (same integers; {caps.name} has no "
                     "4-bit activation kernel)")
    if widened["weight"]:
        notes.append(f"{widened['weight']} weight quantizer(s) of ≤4 bits stored in {caps.weight_storage_bits}-bit "
                     f"types (same integers; {caps.name} runs 4-bit weights only weight-only)")
    return out, notes


def lower_for_runtime(gm: torch.fx.GraphModule, example_images: torch.Tensor, path: str | os.PathLike,
                      runtime: str | TargetProfile = "ort-cpu", *, opset: int = 21, dynamic: bool = True,
                      verify: bool = True,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> RuntimeLoweringReport:
    """Write ``gm`` to ``path`` as an ONNX QDQ model placed for ``runtime`` and report, per quantized node,
    the requested precision vs the executed kernel and storage (kernels read from onnxruntime when ``verify``).

    ``runtime`` is a name of :data:`fxq.targets.TARGETS` or a profile (e.g. one with a rewrite turned off by
    ``dataclasses.replace``, to compare files with and without it). InputError when the runtime's execution
    provider is not installed (naming the available ones).
    """
    caps = _profile(runtime)
    points = collect_points(gm)
    check_arguments(gm, example_images, opset, points)
    points, notes = _widen(points, caps)
    model, counts, float_bytes = build_qdq_model(gm, example_images, points, opset, dynamic)
    names = rename_to_fx(model, gm)
    changes: dict[str, list[str]] = {}
    rewrites = []
    if caps.cast_narrow_weights or caps.weight_only_nbits:
        rewrites.append(narrow_weights(model))
    if caps.int32_conv_bias:
        rewrites.append(quantize_conv_biases(model, _conv_biases(gm)))
    if caps.space_to_depth_convs:
        rewrites.append(space_to_depth_convs(model))
    if caps.qdq_on_weighted_inputs:
        rewrites.append(sink_qdq_below_movement(model))
    if caps.fused_matmul_bias:
        rewrites.append(fuse_matmul_bias(model))
    for done in rewrites:
        for node, what in done.items():
            changes.setdefault(node, []).extend(what)
    prune(model.graph)
    base = save_lowered(model, Path(path), external_data_threshold, counts, points, float_bytes, dynamic)
    if caps.provider == "TensorrtExecutionProvider":
        check_tensorrt(path)  # always: a file TensorRT would reject is never reported as lowered
    kernels = executed_kernels(path, caps) if verify else {}
    rows = [_row(gm, node, points, changes.get(node.name, []), kernels, caps, verify) for node in _compute_nodes(gm)]
    return RuntimeLoweringReport(**dataclasses.asdict(base), runtime=caps.name, nodes=rows, activation_changes=notes,
                                 node_names=names)


def _profile(runtime: str | TargetProfile) -> TargetProfile:
    if isinstance(runtime, TargetProfile):
        runtime_capabilities(runtime.name)  # installed here
        return runtime
    return runtime_capabilities(runtime)


def _conv_biases(gm: torch.fx.GraphModule) -> dict[str, np.ndarray]:
    """The (possibly fake-quantized) bias each weight-quantized conv adds, by FX node name."""
    return {n.name: constant_value(gm, n.args[2]).detach().cpu().numpy() for n in _compute_nodes(gm)
            if n.meta.get("fxq.role") == "conv" and len(n.args) > 2 and isinstance(n.args[2], torch.fx.Node)}


def executed_kernels(path: str | os.PathLike, caps: TargetProfile) -> dict[str, str]:
    """{node name: kernel} of what the runtime runs for the model at ``path``: onnxruntime's optimized graph's op
    types, OpenVINO's executed "layer/precision", or for TensorRT the weighted ops reading Q/DQ (which its
    explicit quantization runs in int8; the file has passed :func:`~fxq.backends.tensorrt_rules.check_tensorrt`)."""
    if caps.engine == "openvino":
        return executed_layers(path)
    if caps.engine == "tensorrt":
        return {n.name: n.op_type for n in onnx.load(os.fspath(path)).graph.node if n.op_type in caps.integer_kernels}
    return {runtime_name(n.name): n.op_type for n in optimized_model(Path(path), caps.provider).graph.node}


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if (n.meta.get("fxq.quantized_inputs") or {}).get("weight")
            or (n.meta.get("fxq.role") in ATTENTION_ROLES and (n.meta.get("fxq.quantized_inputs") or {})
                .get("inputs"))]


def _requested(node: torch.fx.Node) -> str:
    spec = node.meta.get("fxq.qspec")
    if spec is None:
        return "float"
    if node.meta.get("fxq.role") in ATTENTION_ROLES:
        return f"A{spec.attn_bits}"
    return format_policy(spec.replace(attn_bits=spec.a_bits))


def _row(gm: torch.fx.GraphModule, node: torch.fx.Node, points: dict[str, QuantPoint], changes: list[str],
         kernels: dict[str, str], caps: TargetProfile, verify: bool) -> NodeExecution:
    record = node.meta.get("fxq.quantized_inputs") or {}
    weight = points.get(record.get("weight") or "")
    storage = type_name(weight.qrange, weight.min_storage_bits) if weight is not None and weight.enabled else None
    kernel = kernels.get(node.name) if verify else None
    if verify and kernel is None:
        kernel = "unmapped"
    integer = None if not verify or kernel == FOLDED else kernel in caps.integer_kernels
    if not verify:
        executed = "unverified"
    elif kernel == FOLDED:
        executed = "constant-folded by the runtime"
    elif not integer:
        executed = "float"
    elif kernel in WEIGHT_ONLY_KERNELS:
        executed = f"{storage} weights, fp32 compute"
    else:
        executed = "int8" if storage in (None, "int8", "uint8") else f"{storage}→int8"
    return NodeExecution(node.name, node.meta.get("fxq.module", ""), node.meta.get("fxq.role", ""),
                         _requested(node), storage, executed, kernel, integer,
                         _output_notes(gm, node, caps, kernel) + list(changes))


def _output_notes(gm: torch.fx.GraphModule, node: torch.fx.Node, caps: TargetProfile,
                  kernel: str | None) -> list[str]:
    if node.meta.get("fxq.role") != "conv" or not caps.conv_needs_output_q:
        return []
    name = node.meta.get("fxq.output_quantizer")
    if name is None:
        return [] if kernel in caps.integer_kernels else [
            "no output quantizer, so no integer conv kernel: run fxq.passes.runtime_prep.insert_output_quantizers "
            "before calibration"]
    action = node.meta.get("fxq.output_quantizer_action")
    if action == "inserted":
        return [f"output quantized to {caps.output_quantizer_bits} bits by {name} (insert_output_quantizers)"]
    if action == "shared":
        return [f"all readers of its output read the quantized value of {name} (insert_output_quantizers)"]
    return []

