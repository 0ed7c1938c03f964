"""Make a quantized graph's numerics those of a runtime's integer kernels (for runtime-aware lowering).

ORT CPU fuses a quantized convolution into QLinearConv only when its output is quantized too (an output
QuantizeLinear, possibly behind a Relu that the quantizer's zero-point makes redundant), and it then adds the
bias in int32 with scale s_x·s_w (:mod:`fxq.backends.capabilities` lists these facts, verified by tests). A
target's profile (:class:`fxq.targets.TargetProfile`) says which of this it needs: ``conv_needs_output_q``
(with ``output_quantizer_bits``, B below) and ``int32_conv_bias``; each pass refuses a target that does not.
fxq's default quantizer placement quantizes the inputs of conv/linear/attention nodes only, so the lowering
alone cannot give such convolutions an integer kernel at the graph's numerics. Two passes change the graph so
that it can, and so that the PyTorch fake-quant graph stays the exact reference of what the runtime computes:

- :func:`insert_output_quantizers` (before calibration): every weight-quantized conv whose output (or the
  output of its one Relu) does not go to a single B-bit activation quantizer gets one (B = 8 on ORT CPU;
  "B-bit" counts every quantizer stored in the same integer type, e.g. 5–8 bits for B = 8): an existing
  B-bit quantizer of that tensor is shared by all its readers, otherwise a new unsigned B-bit quantizer is
  inserted (``<node>_oq<B>``; signed when the conv's QSpec has symmetric activations). With ``residual_adds``
  (default) every add reading such an output quantizer gets both inputs and its (Relu's) output quantized
  the same way, so that ORT runs it as QLinearAdd and the backbone stays in u8 NHWC from conv to conv
  (measured on DETR-R50 at 256², 1 thread: 9% faster than without). Residual adds then read quantized
  values, as in ORT's own quantize_static placement.
- :func:`quantize_biases` (after calibration): the bias of every conv with quantized input and weight is
  fake-quantized to int32 with scale s_x·s_w, as ORT's fused kernel adds it (``<node>_bq32`` nodes).

Reads ``fxq.role``, ``fxq.qspec``, ``fxq.quantizer``, ``fxq.quantized_inputs``, ``fxq.module``. Writes new
quantizer nodes (role ``quantize``, ``fxq.quantizer`` kind ``activation``), bias quantizer nodes (role
``bias_quantize``, ``fxq.bias_quantizer`` = {"of", "input", "weight"}), and on the conv nodes
``fxq.output_quantizer`` (its node name), ``fxq.output_quantizer_action`` ("kept": it already had one;
"shared": other readers now read it too; "inserted") and ``fxq.quantized_inputs["bias"]`` (the quantizer
annotations through :func:`fxq.passes.insert_quant.annotate_quantizer` / ``record_inputs``).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from fxq import meta
from fxq.errors import InputError
from fxq.passes.insert_quant import annotate_quantizer, record_inputs
from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, QSpec, QuantMode
from fxq.quant.numerics import bias_scale, int32_bias
from fxq.roles import BIAS_QUANTIZE, QUANT_ROOT, QUANTIZE
from fxq.targets import TARGETS, TargetProfile, target_profile


def _profile(target: str | TargetProfile, flag: str) -> TargetProfile:
    """The profile of ``target``; InputError when its ``flag`` says it needs no such preparation."""
    profile = target_profile(target)
    if not getattr(profile, flag):
        needing = [name for name, p in TARGETS.items() if getattr(p, flag)]
        raise InputError(f"runtime target {profile.name!r} needs no such graph preparation ({flag} is False); "
                         f"it is for {', '.join(needing) or 'no known target'}")
    return profile


def _is_quantizer(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and node.meta.get("fxq.role") == QUANTIZE


def _output_width(gm: torch.fx.GraphModule, node: torch.fx.Node, bits: int) -> bool:
    """Whether ``node`` is an activation quantizer stored in the ``bits``-bit type (ONNX's integer types
    double in width: 4, 8, 16, so bits // 2 < its bits <= bits)."""
    if not _is_quantizer(node) or node.meta.get("fxq.quantizer", {}).get("kind") == "weight":
        return False
    q = gm.get_submodule(node.target)
    return isinstance(q, FakeQuantizer) and bits // 2 < q.qrange.bits <= bits


def _unsigned(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return not gm.get_submodule(node.target).qrange.signed


def _quantized_convs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("fxq.role") == "conv"
            and (n.meta.get("fxq.quantized_inputs") or {}).get("weight")
            and (n.meta.get("fxq.quantized_inputs") or {}).get("inputs")]


def _terminal(node: torch.fx.Node, spec: QSpec) -> torch.fx.Node:
    """The node's one Relu when its quantizers would be unsigned (ORT drops such a Relu), else the node."""
    users = list(node.users)
    if len(users) == 1 and users[0].meta.get("fxq.role") == "relu" and not spec.a_symmetric:
        return users[0]
    return node


def _already_fused(gm: torch.fx.GraphModule, terminal: torch.fx.Node, bits: int) -> bool:
    users = list(terminal.users)
    return len(users) == 1 and _output_width(gm, users[0], bits) and (
        terminal.meta.get("fxq.role") != "relu" or _unsigned(gm, users[0]))


def _new_quantizer(gm: torch.fx.GraphModule, owner: torch.fx.Node, src: torch.fx.Node, spec: QSpec,
                   bits: int) -> torch.fx.Node:
    quantizer = FakeQuantizer(bits, symmetric=spec.a_symmetric, observer=spec.a_observer)
    name = f"{src.name}_oq{bits}"
    gm.add_submodule(f"{QUANT_ROOT}.{name}", quantizer)
    with gm.graph.inserting_after(src):
        node = gm.graph.call_module(f"{QUANT_ROOT}.{name}", (src,))
    module = owner.meta.get("fxq.module", "")
    quantizer.name = f"output quantizer {node.name!r} of node {src.name!r} ({module or 'root'})"
    annotate_quantizer(node, src, "activation", module)
    return node


def _shared_quantizer(gm: torch.fx.GraphModule, src: torch.fx.Node, bits: int) -> torch.fx.Node | None:
    """A ``bits``-bit activation quantizer already reading ``src`` (unsigned when ``src`` is a Relu)."""
    relu = src.meta.get("fxq.role") == "relu"
    return next((u for u in src.users if _output_width(gm, u, bits) and (not relu or _unsigned(gm, u))), None)


def _quantize_output(gm: torch.fx.GraphModule, node: torch.fx.Node, spec: QSpec, bits: int) -> str:
    """Give ``node`` one ``bits``-bit output quantizer that all readers of its (Relu's) output share."""
    terminal = _terminal(node, spec)
    if _already_fused(gm, terminal, bits):
        node.meta.update({"fxq.output_quantizer": next(iter(terminal.users)).name,
                          "fxq.output_quantizer_action": "kept"})
        return "kept"
    q = _shared_quantizer(gm, terminal, bits)
    action = "shared" if q is not None else "inserted"
    if q is None:
        q = _new_quantizer(gm, node, terminal, spec, bits)
    for user in [u for u in terminal.users if u is not q]:
        user.replace_input_with(terminal, q)
    node.meta.update({"fxq.output_quantizer": q.name, "fxq.output_quantizer_action": action})
    return action


def _residual_adds(gm: torch.fx.GraphModule, specs: dict[str, QSpec]) -> list[tuple[torch.fx.Node, QSpec]]:
    """Adds reading a conv's output quantizer, with that conv's QSpec."""
    found = []
    for node in gm.graph.nodes:
        args = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if node.meta.get("fxq.role") != "add" or len(args) != 2:
            continue
        spec = next((specs[a.name] for a in args if a.name in specs), None)
        if spec is not None:
            found.append((node, spec))
    return found


def _quantize_add(gm: torch.fx.GraphModule, add: torch.fx.Node, spec: QSpec, bits: int) -> str:
    """Quantize both inputs and the output of a residual add, as QLinearAdd reads and writes them."""
    for src in [a for a in add.args[:2] if isinstance(a, torch.fx.Node)]:
        if not _output_width(gm, src, bits):
            q = _shared_quantizer(gm, src, bits) or _new_quantizer(gm, add, src, spec, bits)
            add.replace_input_with(src, q)
    return _quantize_output(gm, add, spec, bits)


def insert_output_quantizers(gm: torch.fx.GraphModule, target: str | TargetProfile = "ort-cpu",
                             residual_adds: bool = True) -> PassResult:
    """Quantize the output of every weight-quantized conv to the ``target``'s output-quantizer bits and, with
    ``residual_adds``, the inputs and output of the adds that read such outputs (see the module docstring);
    run before calibration. InputError for a target that fuses convs without output quantizers."""
    bits = _profile(target, "conv_needs_output_q").output_quantizer_bits
    counts = {"kept": 0, "shared": 0, "inserted": 0, "adds": 0}
    specs = {}
    for conv in _quantized_convs(gm):
        spec = conv.meta["fxq.qspec"]
        counts[_quantize_output(gm, conv, spec, bits)] += 1
        specs[conv.meta["fxq.output_quantizer"]] = spec
    if residual_adds:
        for add, spec in _residual_adds(gm, specs):
            _quantize_add(gm, add, spec, bits)
            counts["adds"] += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, counts["shared"] + counts["inserted"] + counts["adds"] > 0, counts)


class BiasQuantizer(nn.Module):
    """Fake-quantizes a bias to int32 with scale s_x·s_w taken from the input and weight quantizers.

    Holds the two quantizers by reference (not as submodules, so the state_dict does not change).
    """

    def __init__(self, input_quantizer: FakeQuantizer, weight_quantizer: FakeQuantizer) -> None:
        super().__init__()
        self._sources = (input_quantizer, weight_quantizer)

    def scale(self) -> torch.Tensor:
        """The per-output-channel bias scale s_x·s_w (float32, as ORT computes it)."""
        x_q, w_q = self._sources
        if not (x_q.is_calibrated and w_q.is_calibrated):
            raise InputError("bias quantization needs calibrated input and weight quantizers: run "
                             "fxq.passes.calibrate.calibrate(gm, loader) before quantize_biases")
        return bias_scale(x_q.scale.detach(), w_q.scale.detach())

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        return int32_bias(bias, scale) * scale


def _bias_sources(gm: torch.fx.GraphModule, conv: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    record = conv.meta.get("fxq.quantized_inputs") or {}
    bias = conv.args[2] if len(conv.args) > 2 else None
    if not isinstance(bias, torch.fx.Node) or bias.op != "get_attr" or record.get("bias"):
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    return nodes[record["inputs"][0]], nodes[record["weight"]]


def _active(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return gm.get_submodule(node.target).mode is QuantMode.QUANTIZE


def quantize_biases(gm: torch.fx.GraphModule, target: str | TargetProfile = "ort-cpu") -> PassResult:
    """Fake-quantize the bias of every conv whose input and weight are quantized to int32 (scale s_x·s_w);
    run after calibration. InputError for a target that does not add conv biases in int32."""
    _profile(target, "int32_conv_bias")
    done = 0
    for conv in _quantized_convs(gm):
        sources = _bias_sources(gm, conv)
        if sources is None or not all(_active(gm, s) for s in sources):
            continue
        x_node, w_node = sources
        module = BiasQuantizer(gm.get_submodule(x_node.target), gm.get_submodule(w_node.target))
        module.scale()  # refuses uncalibrated quantizers now, not at the next forward
        name = f"{conv.name}_bq32"
        gm.add_submodule(f"{QUANT_ROOT}.{name}", module)
        bias = conv.args[2]
        with gm.graph.inserting_before(conv):
            node = gm.graph.call_module(f"{QUANT_ROOT}.{name}", (bias,))
        meta.annotate_inserted(node, BIAS_QUANTIZE, conv.meta.get("fxq.module", ""), bias.meta.get("fxq.shape"))
        node.meta["fxq.bias_quantizer"] = {"of": conv.name, "input": x_node.name, "weight": w_node.name}
        conv.replace_input_with(bias, node)
        record = conv.meta["fxq.quantized_inputs"]
        record_inputs(conv, record["weight"], record["inputs"], bias=node.name)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, done > 0, {"biases": done})
