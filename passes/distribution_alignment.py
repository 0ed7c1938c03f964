"""Q-DETR's distribution alignment of the decoder's attention queries, as a rewrite of a (quantized) graph.

q* = (q − μ)/√(σ² + ε)·γ + β, with μ, σ² the mean and (biased) variance of each head's query vector over
head_dim — per head, per query, per image — ε = 1e-5 and learnable γ, β ∈ R^head_dim shared by the heads of one
attention. It is ``F.layer_norm`` over head_dim, so it exports as one ONNX LayerNormalization and stays in the
inference graph.

Choices where Q-DETR's text is silent (documented here and in docs/METHODS.md):

- **where**: the query operand q (after the 1/√d scaling, before its attention quantizer) of every decoder
  softmax attention — DETR's self- and cross-attention, Deformable DETR's self-attention (its cross-attention,
  multi-scale deformable attention, has no q·kᵀ);
- **initialisation**: γ = the mean of σ and β = the mean of μ over the calibration images' queries, so that
  q* keeps q's overall scale and offset and the quantizer calibrated on q still fits at the start of QAT
  (γ = 1, β = 0 would multiply the attention logits by about √d at step 0).

:func:`align_queries` inserts the modules (``fxq_align.<node>``) and, given images, initialises them;
``qat_structure``-style rebuilds insert them uninitialised and load γ, β from the state_dict. Reads
``fxq.module``, ``fxq.role``, ``fxq.shape``; writes the structural keys of the nodes it inserts
(:func:`fxq.meta.annotate_inserted`).
"""

from __future__ import annotations

import re

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fxq import meta
from fxq.errors import InputError
from fxq.roles import ATTN_QK, QUANTIZE

EPS = 1e-5
PREFIX = "fxq_align"
_DECODER_ATTN = re.compile(r"transformer\.decoder\.layers\.\d+\.(self_attn|multihead_attn)$")


class DistributionAlignment(nn.Module):
    """``F.layer_norm`` over the last dimension with learnable γ (``weight``) and β (``bias``)."""

    def __init__(self, dim: int, eps: float = EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dim, self.eps = dim, eps  # a Python int: ONNX export sees a constant normalized_shape

    def forward(self, q: Tensor) -> Tensor:
        return F.layer_norm(q, (self.dim,), self.weight, self.bias, self.eps)


def query_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The scaled-query nodes (first operand of each decoder attention's q·kᵀ, before its quantizer)."""
    found = []
    for node in gm.graph.nodes:
        if meta.get(node, meta.ROLE) == ATTN_QK and _DECODER_ATTN.match(meta.get(node, meta.MODULE, "")):
            q = node.args[0]
            if isinstance(q, torch.fx.Node) and meta.get(q, meta.ROLE) == QUANTIZE:
                q = q.args[0]
            found.append(q)
    return found


def align_queries(gm: torch.fx.GraphModule, images: Tensor | tuple | None = None) -> list[str]:
    """Insert distribution alignment on every decoder attention's queries of ``gm`` (in place); with
    ``images`` (the graph's positional inputs) initialise γ, β from them. Returns the inserted modules' names."""
    queries = query_nodes(gm)
    if not queries:
        raise InputError(f"the graph has no decoder softmax attention (nodes of role {ATTN_QK} in "
                         "transformer.decoder.layers.*.self_attn / multihead_attn): distribution alignment needs a "
                         "DETR or Deformable DETR traced by fxq.trace")
    names = []
    for q in queries:
        shape = meta.get(q, meta.SHAPE)
        if not shape:
            raise InputError(f"node {q.name} has no recorded shape (fxq.shape): trace with fxq.trace")
        name = f"{PREFIX}_{q.name}"
        gm.add_submodule(name, DistributionAlignment(shape[-1]))
        users = list(q.users)
        with gm.graph.inserting_after(q):
            aligned = gm.graph.call_module(name, (q,))
        meta.annotate_inserted(aligned, "layernorm", meta.get(q, meta.MODULE, ""), list(shape))
        for user in users:
            user.replace_input_with(q, aligned)
        names.append(name)
    gm.recompile()
    if images is not None:
        _initialise(gm, names, images if isinstance(images, tuple) else (images,))
    return names


@torch.no_grad()
def _initialise(gm: torch.fx.GraphModule, names: list[str], inputs: tuple) -> None:
    stats: dict[str, Tensor] = {}

    def record(name):
        def hook(module, args):
            q = args[0].float()
            stats[name] = torch.stack([q.mean(-1).mean(), q.var(-1, unbiased=False).add(EPS).sqrt().mean()])
        return hook

    handles = [gm.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        gm(*inputs)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        mean, std = stats[n].tolist()
        module = gm.get_submodule(n)
        module.weight.fill_(std)
        module.bias.fill_(mean)
