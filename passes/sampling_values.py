"""Quantize the value map of every quantized multi-scale deformable attention, for an int8 sampling core.

For a runtime whose profile says ``int8_sampling_core`` (ORT CPU), each sampling-core node
(:func:`fxq.models.ms_deform_attn_fast.sampling_core`) whose attention module's ``value_proj`` is quantized
gets an activation quantizer on its value input — the QSpec of that ``value_proj`` node with the attention
bit-width (``attn_bits``; ``a_bits`` when it has none), its symmetry and observer — and becomes
:func:`fxq.models.ms_deform_attn_int8.quantized_sampling_core` reading that quantizer. The quantizer is an
ordinary one of the graph: calibration, DetPTQ and QAT (learnable scale) treat it as any activation quantizer,
and the lowering places its Q/DQ. The exported core then gathers uint8 rows and sums them with MatMulInteger,
with the corner weights quantized per (query, head) row at run time, and the PyTorch node computes the same
numbers (see that module: formula, tolerance and speed). Attention quantized below 8 bits keeps its integers
(the uint8 table holds them shifted); a value quantizer of more than 8 bits leaves the core float.

Reads ``fxq.module`` and ``fxq.qspec``; writes the new quantizer nodes (role ``quantize``, ``fxq.quantizer``
kind ``attention``, through :func:`fxq.passes.insert_quant.annotate_quantizer`) and one ``get_attr`` node per
quantizer (role ``constant``), the module the core reads. Run after insert_quantizers and before calibration.
"""

from __future__ import annotations

import torch
import torch.fx

from fxq import meta
from fxq.models import ms_deform_attn_fast as fast
from fxq.models import ms_deform_attn_int8 as int8
from fxq.passes.insert_quant import annotate_quantizer
from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, QSpec
from fxq.roles import CONSTANT, QUANT_ROOT


def _value_spec(gm: torch.fx.GraphModule, core: torch.fx.Node) -> QSpec | None:
    """The QSpec of the core's module's ``value_proj``, with attention bits that fit uint8; None: stays float."""
    proj = f"{core.meta.get('fxq.module', '')}.value_proj"
    spec = next((meta.get(n, meta.QSPEC) for n in gm.graph.nodes
                 if n.meta.get("fxq.module") == proj and meta.get(n, meta.QSPEC) is not None), None)
    if spec is None:
        return None
    bits = spec.attn_bits if spec.attn_bits is not None else spec.a_bits
    return None if bits is None or bits > 8 else spec.replace(attn_bits=bits)


def _insert(gm: torch.fx.GraphModule, core: torch.fx.Node, spec: QSpec) -> None:
    value = core.args[0]
    module = core.meta.get("fxq.module", "")
    quantizer = FakeQuantizer.from_qspec(spec, "attention")
    target = f"{QUANT_ROOT}.{value.name}_vq{quantizer.bits}"
    gm.add_submodule(target, quantizer)
    with gm.graph.inserting_after(value):
        qnode = gm.graph.call_module(target, (value,))
    with gm.graph.inserting_before(core):
        handle = gm.graph.get_attr(target)
    quantizer.name = f"sampling-value quantizer {qnode.name!r} of node {value.name!r} ({module or 'root'})"
    annotate_quantizer(qnode, value, "attention", module)
    meta.annotate_inserted(handle, CONSTANT, module, None)
    core.target = int8.quantized_sampling_core
    core.args = (qnode, *core.args[1:4], handle)


def quantize_sampling_values(gm: torch.fx.GraphModule) -> PassResult:
    """Give every quantized deformable attention's sampling core a quantized value and the int8 core (module
    docstring); unmodified when no core's ``value_proj`` is quantized."""
    cores = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fast.sampling_core]
    done = 0
    for core in cores:
        spec = _value_spec(gm, core)
        if spec is not None:
            _insert(gm, core, spec)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, done > 0, {"cores": len(cores), "quantized": done})
