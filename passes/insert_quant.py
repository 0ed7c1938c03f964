"""Insert fake quantizers where the annotated nodes read: weights, activations and attention operands.

Reads ``fxq.qspec``, ``fxq.role``, ``fxq.module``, ``fxq.shape``. Rewrites conv/linear ``call_module`` nodes
with a quantized weight into the functional op (``F.conv2d`` / ``F.linear`` on ``get_attr`` parameters, so the
state_dict keys do not change) and adds ``call_module`` quantizer nodes (role ``quantize``) under ``fxq_q.*``.
Writes on each quantizer node ``fxq.quantizer`` = {"kind": weight|activation|attention, "of": producer node
name, "param": weight name or None}, and on each quantized node ``fxq.quantized_inputs`` = {"weight": quantizer
node name or None, "inputs": [quantizer node names, in argument order], "bias": None}; it is the one writer of
both (:func:`annotate_quantizer`, :func:`record_inputs`, which fxq.passes.runtime_prep calls too).

One activation quantizer serves every consumer of the same tensor at the same settings (bits, symmetry,
observer). Quantizer submodules are named ``<producer>_<w|a>q<bits>``; a second quantizer of the same tensor and
bits (other symmetry or observer) adds what tells it apart, ``_sym|_asym_<observer>`` (e.g.
``conv1_aq8_sym_minmax``). Quantizers start uncalibrated: run :func:`fxq.passes.calibrate.calibrate` before
using the graph.
"""

from __future__ import annotations

import re

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxq import meta
from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, QSpec
from fxq.roles import ATTENTION_ROLES, CONSTANT, QUANT_ROOT, QUANTIZE
from fxq.roles import quantizers as quantizers  # re-exported: the graph's quantizers by node name


def annotate_quantizer(node: torch.fx.Node, src: torch.fx.Node, kind: str, module: str,
                       param: str | None = None) -> None:
    """Annotate a new quantizer node reading ``src``: structural keys (role ``quantize``) and ``fxq.quantizer``."""
    meta.annotate_inserted(node, QUANTIZE, module, src.meta.get("fxq.shape"))
    node.meta["fxq.quantizer"] = {"kind": kind, "of": src.name, "param": param}


def record_inputs(node: torch.fx.Node, weight: str | None, inputs: list[str], bias: str | None = None) -> None:
    """Record the quantizer nodes ``node`` reads (``fxq.quantized_inputs``)."""
    node.meta["fxq.quantized_inputs"] = {"weight": weight, "inputs": list(inputs), "bias": bias}


def _quantizer_name(gm: torch.fx.GraphModule, src: torch.fx.Node, quantizer: FakeQuantizer, kind: str) -> str:
    """A submodule name under ``fxq_q`` no other quantizer has: the plain name, else one with the settings."""
    root = getattr(gm, QUANT_ROOT, None)
    taken = set() if root is None else {name for name, _ in root.named_children()}
    base = f"{src.name}_{kind[0]}q{quantizer.bits}"
    if base not in taken:
        return base
    qualified = f"{base}_{'sym' if quantizer.symmetric else 'asym'}_{re.sub(r'[^0-9A-Za-z]+', '_', quantizer.method)}"
    name, count = qualified, 1
    while name in taken:
        name, count = f"{qualified}_{count}", count + 1
    return name


def _new_quantizer_node(gm: torch.fx.GraphModule, src: torch.fx.Node, quantizer: FakeQuantizer, kind: str,
                        module: str, param: str | None = None) -> torch.fx.Node:
    name = _quantizer_name(gm, src, quantizer, kind)
    gm.add_submodule(f"{QUANT_ROOT}.{name}", quantizer)
    with gm.graph.inserting_after(src):
        node = gm.graph.call_module(f"{QUANT_ROOT}.{name}", (src,))
    quantizer.name = f"{kind} quantizer {node.name!r} of node {src.name!r} ({module or 'root'})"
    annotate_quantizer(node, src, kind, module, param)
    return node


def _functional(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module) -> None:
    """Turn a conv/linear call_module node into its functional form reading get_attr parameters."""
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    for attr in (weight, bias):
        if attr is not None:
            value = getattr(gm.get_submodule(node.target), attr.target.rsplit(".", 1)[1])
            meta.annotate_inserted(attr, CONSTANT, node.target, list(value.shape))
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
        attention = node.meta["fxq.role"] in ATTENTION_ROLES
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
        record_inputs(node, record["weight"], record["inputs"])
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, any(counts.values()), counts)

