"""The training graph of a traced detector: the same submodules and parameters, with training-only structure.

:func:`training_graph` returns a new GraphModule that shares every submodule, parameter and buffer of the
graph it is given (nothing is copied; an optimiser step on one is a step on the other) and whose graph adds

- **intermediate outputs** under ``outputs[TRAIN_KEY]``: ``decoder_features`` (each decoder layer's output
  queries, its last LayerNorm), ``cross_attention`` (each decoder layer's cross-attention output: DETR's
  ``multihead_attn.out_proj``, Deformable DETR's ``cross_attn.output_proj``), both [B, Q, E], and
  ``encoder_attention`` (each encoder layer's attention distribution: DETR's softmax over keys [B·H, S, S],
  Deformable DETR's sampling weights, a softmax over levels × points [B, S, H, L·P]); tensors are taken before
  their quantizers (the distributions the student computes, differentiable);
- **auxiliary query groups** (``query_groups`` G > 1, AQ-DETR / Group DETR): G − 1 more groups of Q queries
  (``group_embed``, [(G − 1)·Q, E'], a parameter the caller owns) concatenated to ``query_embed.weight``, each
  decoder self-attention masked so that a group attends only to itself; every output then has G·Q queries and
  :func:`split_query_groups` cuts them into the first group plus ``group_outputs``.

The graph it was given (the exported student) does not change: what is exported is what was trained, without
auxiliary queries or extra outputs. Reads ``fxq.module``, ``fxq.role``, ``fxq.shape``; writes no meta key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.fx
from torch import Tensor, nn

from fxq import meta
from fxq.errors import InputError
from fxq.roles import ATTN_QK
from fxq.tracing import TRAIN_OUTPUTS as TRAIN_KEY
from fxq.tracing import DetectorGraph

QUERY_EMBED = "query_embed.weight"
GROUP_EMBED, GROUP_MASK = "fxq_group_query_embed", "fxq_group_query_mask"
_ENCODER_ATTN = re.compile(r"transformer\.encoder\.layers\.(\d+)\.self_attn$")
_DECODER_SELF = re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn$")
_DECODER_OUT = re.compile(r"transformer\.decoder\.layers\.(\d+)\.norm3$")
LAYERNORM, LINEAR, SOFTMAX = "layernorm", "linear", "softmax"
_CROSS_OUT = re.compile(r"transformer\.decoder\.layers\.(\d+)\.(multihead_attn\.out_proj|cross_attn\.output_proj)$")


def training_graph(gm: torch.fx.GraphModule, *, query_groups: int = 1,
                   group_embed: nn.Parameter | None = None) -> torch.fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules and parameters whose graph also returns the intermediate tensors
    (``outputs[TRAIN_KEY]``) and, with ``query_groups`` > 1, decodes the auxiliary groups of ``group_embed``."""
    if not isinstance(query_groups, int) or query_groups < 1:
        raise InputError(f"query_groups={query_groups!r}: use an integer >= 1 (1 = no auxiliary queries)")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    nodes = {old: env[old] for old in gm.graph.nodes if old in env}
    root = {n.target: _attr(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    if query_groups > 1:
        _add_query_groups(graph, gm, nodes, query_groups, group_embed, root)
    _add_outputs(graph, nodes)
    view = DetectorGraph(root, graph) if isinstance(gm, DetectorGraph) else torch.fx.GraphModule(root, graph)
    view.meta = dict(gm.meta)
    return view


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _add_outputs(graph: torch.fx.Graph, nodes: Mapping) -> None:
    found: dict[str, dict[int, torch.fx.Node]] = {"decoder_features": {}, "cross_attention": {},
                                                  "encoder_attention": {}}
    for old, new in nodes.items():
        module, role = meta.get(old, meta.MODULE, ""), meta.get(old, meta.ROLE)
        if (m := _DECODER_OUT.match(module)) and role == LAYERNORM:
            found["decoder_features"][int(m.group(1))] = _batch_first(graph, old, new)
        elif (m := _CROSS_OUT.match(module)) and role == LINEAR:
            found["cross_attention"][int(m.group(1))] = _batch_first(graph, old, new)
        elif (m := _ENCODER_ATTN.match(module)) and role == SOFTMAX:
            found["encoder_attention"][int(m.group(1))] = new
    missing = [k for k, v in found.items() if not v]
    if missing:
        raise InputError(f"the graph has no {missing} nodes (decoder layers' norm3, cross-attention outputs, "
                         "encoder self-attention softmax): training outputs need a DETR or Deformable DETR "
                         "traced by fxq.trace")
    result = {k: [v[i] for i in sorted(v)] for k, v in found.items()}
    (out_node,) = [n for n in graph.nodes if n.op == "output"]
    value = out_node.args[0]
    if not isinstance(value, dict):
        raise InputError("the graph's output is not a dict of pred_logits / pred_boxes: trace with fxq.trace")
    out_node.args = ({**value, TRAIN_KEY: result},)


def _batch_first(graph: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node) -> torch.fx.Node:
    """``new`` as [B, Q, E]: DETR's transformer is sequence-first ([Q, B, E]; ``fxq.shape`` of a batch-1 trace
    is [Q, 1, E])."""
    shape = meta.get(old, meta.SHAPE)
    if not (isinstance(shape, list | tuple) and len(shape) == 3):
        raise InputError(f"node {old.name} has no recorded [*, *, E] shape (fxq.shape): trace with fxq.trace")
    if shape[1] == 1 and shape[0] != 1:
        with graph.inserting_after(new):
            return graph.call_method("transpose", (new, 0, 1))
    return new


def _add_query_groups(graph: torch.fx.Graph, gm: torch.fx.GraphModule, nodes: Mapping, groups: int,
                      group_embed: nn.Parameter | None, root: dict) -> None:
    embeds = [new for old, new in nodes.items() if old.op == "get_attr" and old.target == QUERY_EMBED]
    if not embeds:
        raise InputError(f"the graph reads no {QUERY_EMBED!r}: auxiliary queries need a DETR or Deformable DETR "
                         "traced by fxq.trace (with its learned query embedding)")
    queries = _attr(gm, QUERY_EMBED)
    want = ((groups - 1) * queries.shape[0], queries.shape[1])
    if group_embed is None or tuple(group_embed.shape) != want:
        got = None if group_embed is None else tuple(group_embed.shape)
        raise InputError(f"{groups} query groups need a group_embed parameter of shape {want}, got {got}")
    total = groups * queries.shape[0]
    group = torch.arange(total) // queries.shape[0]
    root[GROUP_EMBED] = group_embed
    root[GROUP_MASK] = group[:, None] != group[None, :]
    (embed,) = embeds
    with graph.inserting_after(embed):
        extra = graph.get_attr(GROUP_EMBED)
    with graph.inserting_after(extra):
        joined = graph.call_function(torch.cat, ([embed, extra],))
    embed.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)
    scores = [new for old, new in nodes.items() if _DECODER_SELF.match(meta.get(old, meta.MODULE, ""))
              and meta.get(old, meta.ROLE) == ATTN_QK]
    if not scores:
        raise InputError(f"the graph has no decoder self-attention scores (role {ATTN_QK}): auxiliary query groups "
                         "need fxq's decomposed attention")
    for node in scores:
        with graph.inserting_after(node):
            mask = graph.get_attr(GROUP_MASK)
        with graph.inserting_after(mask):
            masked = graph.call_method("masked_fill", (node, mask, float("-inf")))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)


def split_query_groups(outputs: Mapping, num_queries: int, groups: int) -> dict:
    """Outputs of a G-group training graph as the first group's outputs plus ``group_outputs`` (one dict of
    ``pred_logits`` / ``pred_boxes`` / ``aux_outputs`` per auxiliary group); training outputs keep the first
    group only."""
    if groups == 1:
        return dict(outputs)

    def cut(value, g: int):
        if isinstance(value, Tensor):
            return value[:, g * num_queries:(g + 1) * num_queries]
        if isinstance(value, list):
            return [cut(v, g) for v in value]
        return {k: cut(v, g) for k, v in value.items()}

    heads = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes", "aux_outputs")}
    first = {k: v for k, v in outputs.items() if k not in heads} | cut(heads, 0)
    if TRAIN_KEY in outputs:
        train = dict(outputs[TRAIN_KEY])
        train.update({k: cut(train[k], 0) for k in ("decoder_features", "cross_attention")})
        first[TRAIN_KEY] = train
    return {**first, "group_outputs": [cut(heads, g) for g in range(1, groups)]}
