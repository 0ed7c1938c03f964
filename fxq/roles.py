"""The role of every graph node (``node.meta["fxq.role"]``): what kind of computation it is.

Every role value is defined here: the classified modules and functions, the node-kind roles, and the roles of
the nodes quantization passes insert (:data:`QUANTIZE`, :data:`BIAS_QUANTIZE`, :data:`CONSTANT`). Reads
``fxq.role`` (:func:`quantizer_nodes`); the trace writes it with :func:`role_of`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxq import meta
from fxq.models.attention import attention_mix, attention_scores
from fxq.models.resnet import FrozenBatchNorm2d

#: Fake-quantizer nodes (``call_module`` of a FakeQuantizer), inserted by fxq.passes.insert_quant / runtime_prep.
QUANTIZE = "quantize"
#: int32 bias fake-quantizer nodes, inserted by fxq.passes.runtime_prep.
BIAS_QUANTIZE = "bias_quantize"
#: get_attr nodes (parameters and buffers read as values).
CONSTANT = "constant"
#: The attention matmuls Q·Kᵀ and A·V (their operands are quantized with ``attn_bits``).
ATTN_QK, ATTN_AV = "attn_qk", "attn_av"
ATTENTION_ROLES = (ATTN_QK, ATTN_AV)
#: Nodes with a parameter weight.
WEIGHT_ROLES = ("conv", "linear")
#: Nodes fxq can quantize (a QSpec applies to them).
QUANTIZABLE_ROLES = (*WEIGHT_ROLES, *ATTENTION_ROLES)
#: Roles of the nodes that are not computations.
OP_ROLES = {"placeholder": "input", "output": "output", "get_attr": CONSTANT}

MODULE_ROLES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"),
    (FrozenBatchNorm2d, "batchnorm"), (nn.BatchNorm2d, "batchnorm"), (nn.ReLU, "relu"),
    (nn.MaxPool2d, "maxpool"), (nn.Dropout, "dropout"), (nn.Embedding, "embedding"),
)

FUNCTION_ROLES: dict[object, str] = {
    F.linear: "linear", F.conv2d: "conv", attention_scores: ATTN_QK, attention_mix: ATTN_AV,
    torch.softmax: "softmax", F.softmax: "softmax", "softmax": "softmax",
    operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.sub: "sub", operator.truediv: "div",
    F.relu: "relu", torch.relu: "relu", "relu": "relu", torch.sigmoid: "sigmoid", "sigmoid": "sigmoid",
    F.grid_sample: "grid_sample", torch.bmm: "matmul", torch.matmul: "matmul", operator.matmul: "matmul",
    F.layer_norm: "layernorm", F.group_norm: "groupnorm", F.interpolate: "interpolate",
    torch.cat: "concat", torch.stack: "concat", "masked_fill": "mask", operator.getitem: "getitem",
    "reshape": "shape", "view": "shape", "flatten": "shape", "permute": "shape", "transpose": "shape",
    "unsqueeze": "shape", "repeat": "shape", "contiguous": "shape", "split": "shape", "size": "shape",
    getattr: "shape",
}


def role_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """The role of one node; ``other`` for computations fxq does not classify."""
    if node.op in OP_ROLES:
        return OP_ROLES[node.op]
    if node.op == "call_module":
        module = modules[node.target]
        return next((role for cls, role in MODULE_ROLES if isinstance(module, cls)), "module")
    return FUNCTION_ROLES.get(node.target, "other")


#: Every role value a node can have.
ROLES = frozenset({*(role for _, role in MODULE_ROLES), *FUNCTION_ROLES.values(), *OP_ROLES.values(), "module",
                   "other", QUANTIZE, BIAS_QUANTIZE})


def quantizer_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The fake-quantizer nodes of ``gm`` (role :data:`QUANTIZE`), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and meta.get(n, meta.ROLE) == QUANTIZE]


QUANT_ROOT = "fxq_q"
"""The submodule under which fxq.passes.insert_quant (and runtime_prep) add a graph's fake quantizers."""


def quantizers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """Every fake quantizer of ``gm`` by its quantizer node's name, in graph order."""
    return {n.name: gm.get_submodule(n.target) for n in quantizer_nodes(gm)}
