"""The role of every graph node (``node.meta["fxq.role"]``): what kind of computation it is."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxq.models.attention import attention_mix, attention_scores
from fxq.models.frozen_bn import FrozenBatchNorm2d

MODULE_ROLES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"),
    (FrozenBatchNorm2d, "batchnorm"), (nn.BatchNorm2d, "batchnorm"), (nn.ReLU, "relu"),
    (nn.MaxPool2d, "maxpool"), (nn.Dropout, "dropout"), (nn.Embedding, "embedding"),
)

FUNCTION_ROLES: dict[object, str] = {
    F.linear: "linear", F.conv2d: "conv", attention_scores: "attn_qk", attention_mix: "attn_av",
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
    if node.op in ("placeholder", "output", "get_attr"):
        return {"placeholder": "input", "output": "output", "get_attr": "constant"}[node.op]
    if node.op == "call_module":
        module = modules[node.target]
        return next((role for cls, role in MODULE_ROLES if isinstance(module, cls)), "module")
    return FUNCTION_ROLES.get(node.target, "other")
