"""Insert fake quantizers where the annotated nodes read: weights, activations and attention operands.

Reads ``fxq.qspec``, ``fxq.role``, ``fxq.module``, ``fxq.shape``. Rewrites conv/linear ``call_module`` nodes
with a quantized weight into the functional op (``F.conv2d`` / ``F.linear`` on ``get_attr`` parameters, so the
state_dict keys do not change) and adds ``call_module`` quantizer nodes (role ``quantize``) under ``fxq_q.*``.
Writes on each quantizer node ``fxq.quantizer`` = {"kind": weight|activation|attention, "of": producer node
name, "param": weight name or None}, and on each quantized node ``fxq.quantized_inputs`` = {"weight": quantizer
node name or None, "inputs": [quantizer node names, in argument order]}.

One activation quantizer serves every consumer of the same tensor at the same settings. Quantizers start
uncalibrated: run :func:`fxq.passes.calibrate.calibrate` before using the graph.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, QSpec

QUANT_ROOT = "fxq_q"


def _new_quantizer_node(gm: torch.fx.GraphModule, src: torch.fx.Node, quantizer: FakeQuantizer, kind: str,
                        module: str, param: str | None = None) -> torch.fx.Node:
    name = f"{src.name}_{kind[0]}q{quantizer.bits}"
    gm.add_submodule(f"{QUANT_ROOT}.{name}", quantizer)
    with gm.graph.inserting_after(src):
        node = gm.graph.call_module(f"{QUANT_ROOT}.{name}", (src,))
    quantizer.name = f"{kind} quantizer {node.name!r} of node {src.name!r} ({module or 'root'})"
    node.meta.update({"fxq.role": "quantize", "fxq.module": module, "fxq.shape": src.meta.get("fxq.shape"),
                      "fxq.params": 0, "fxq.macs": 0,
                      "fxq.quantizer": {"kind": kind, "of": src.name, "param": param}})
    return node


def _functional(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module) -> None:
    """Turn a conv/linear call_module node into its functional form reading get_attr parameters."""
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    for attr in (weight, bias):
        if attr is not None:
            attr.meta.update({"fxq.role": "constant", "fxq.module": node.target, "fxq.params": 0, "fxq.macs": 0,
                              "fxq.shape": list(getattr(gm.get_submodule(node.target), attr.target.rsplit(".", 1)[1])
                                                .shape)})
    if isinstance(module, nn.Conv2d):
        node.target = F.conv2d
        node.args = (node.args[0], weight, bias, module.stride, module.padding, module.dilation, module.groups)
    else:
        node.target = F.linear
        node.args = (node.args[0], weight, bias)
    node.op = "call_function"


def _quantize_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, spec: QSpec) -> torch.fx.Node:
    modules = dict(gm.named_modules())
    if node.op == "call_module":
        _functional(gm, node, modules[node.target])
    weight = node.args[1]
    quantizer = FakeQuantizer.from_qspec(spec, "weight")
    qnode = _new_quantizer_node(gm, weight, quantizer, "weight", node.meta["fxq.module"], node.meta.get("fxq.weight"))
    node.replace_input_with(weight, qnode)
    return qnode


def _quantize_input(gm: torch.fx.GraphModule, node: torch.fx.Node, src: torch.fx.Node, spec: QSpec, kind: str,
                    shared: dict) -> torch.fx.Node:
    bits = spec.a_bits if kind == "activation" else spec.attn_bits
    key = (src.name, bits, spec.a_symmetric, spec.a_observer)
    if key not in shared:
        quantizer = FakeQuantizer.from_qspec(spec, kind)
        shared[key] = _new_quantizer_node(gm, src, quantizer, kind, node.meta["fxq.module"])
    node.replace_input_with(src, shared[key])
    return shared[key]


def insert_quantizers(gm: torch.fx.GraphModule) -> PassResult:
    """Insert the quantizers every node's ``fxq.qspec`` asks for (see the module docstring)."""
    shared: dict = {}
    counts = {"weight": 0, "activation": 0, "attention": 0}
    for node in [n for n in gm.graph.nodes if "fxq.qspec" in n.meta]:
        spec: QSpec = node.meta["fxq.qspec"]
        attention = node.meta["fxq.role"] in ("attn_qk", "attn_av")
        record = {"weight": None, "inputs": []}
        if not attention and spec.w_bits is not None:
            record["weight"] = _quantize_weight(gm, node, spec).name
            counts["weight"] += 1
        bits = spec.attn_bits if attention else spec.a_bits
        sources = node.args[:2] if attention else node.args[:1]
        for src in sources if bits is not None else ():
            kind = "attention" if attention else "activation"
            before = len(shared)
            record["inputs"].append(_quantize_input(gm, node, src, spec, kind, shared).name)
            counts[kind] += len(shared) - before
        node.meta["fxq.quantized_inputs"] = record
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, any(counts.values()), counts)


def quantizers(gm: torch.fx.GraphModule) -> dict[str, FakeQuantizer]:
    """Every fake quantizer of ``gm`` by its quantizer node's name."""
    return {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and n.meta.get("fxq.role") == "quantize"}
