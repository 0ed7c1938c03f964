"""Fold batch norm into the preceding convolution: conv(x)·s + t becomes conv'(x) with W' = W·s, b' = b·s + t.

Reads ``fxq.role``; erases ``batchnorm`` nodes whose input is a conv node used only by them, replacing the
conv module by a folded copy (the original model is not modified); a conv that gains a bias counts it in
``fxq.params`` (through :func:`fxq.costs.add_params`). Works for FrozenBatchNorm2d and BatchNorm2d in eval mode.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from fxq.costs import add_params
from fxq.models.resnet import FrozenBatchNorm2d
from fxq.passes.pass_manager import PassResult


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) = x·scale + shift in inference."""
    if isinstance(bn, FrozenBatchNorm2d):
        return bn.scale_shift()
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A copy of ``conv`` computing bn(conv(x))."""
    scale, shift = (t.detach() for t in bn_scale_shift(bn))
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        fused.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(shift)
        fused.bias = nn.Parameter(bias * scale + shift)
    return fused


def fold_batchnorm(gm: torch.fx.GraphModule) -> PassResult:
    """Fold every conv → batchnorm pair of ``gm``."""
    modules, folded = dict(gm.named_modules()), 0
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.args else None
        if node.meta.get("fxq.role") != "batchnorm" or not isinstance(src, torch.fx.Node):
            continue
        if src.op != "call_module" or not isinstance(modules[src.target], nn.Conv2d) or len(src.users) != 1:
            continue
        conv = modules[src.target]
        if conv.bias is None:
            add_params(src, conv.out_channels)
        gm.add_submodule(src.target, folded_conv(conv, modules[node.target]))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, folded > 0, {"folded": folded})
