"""DETR (Carion et al. 2020) as facebookresearch/detr defines it, taking a batched image tensor.

Differences from the official forward, none numerical: images come as a tensor plus an optional padding mask
(True = padding) instead of a NestedTensor, and with no mask the positional encoding is computed from the
feature map's shape, so the model traces with torch.fx and the graph runs at any input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxq.models.backbone import Backbone, Joiner
from fxq.models.position_encoding import PositionEmbeddingSine
from fxq.models.resnet import ResNetBody
from fxq.models.transformer import Transformer
from fxq.objectives.heads import check_head

PRIOR_PROB = 0.01
TRAINING_ONLY = ("group_query_embed.",)
"""state_dict prefixes of weights used only in training (dropped from the weights a run publishes)."""


class DETR(nn.Module):
    """DETR with a ResNet backbone.

    ``head="softmax"`` (official): ``num_classes`` + 1 logits, the last one "no object".
    ``head="sigmoid"``: ``num_classes`` independent logits with a 0.01 prior bias, trained with the focal loss
    (as Deformable and Conditional DETR); fxq's detr_tiny uses it.
    ``query_groups=G`` > 1 (Group DETR, Chen et al. 2023; training only): G − 1 more groups of ``num_queries``
    queries (``group_query_embed``) decode beside the first in training mode, each attending only to its own
    group, and come back in ``group_outputs`` for one-to-one matching each; in eval mode (and in every traced
    or exported graph) only the first group runs, so the weights in :data:`TRAINING_ONLY` can be dropped.
    """

    def __init__(self, backbone_name: str = "resnet50", dilation: bool = False, base_width: int = 64,
                 hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100,
                 num_classes: int = 91, aux_loss: bool = True, backbone_norm: str = "frozen_bn",
                 head: str = "softmax", query_groups: int = 1) -> None:
        super().__init__()
        self.head = check_head(head)
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout)
        self.class_embed = nn.Linear(hidden_dim, num_classes + (head == "softmax"))
        if head == "sigmoid":
            nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        body = ResNetBody(backbone_name, ("layer4",), dilation, base_width, backbone_norm)
        self.input_proj = nn.Conv2d(body.channels["layer4"], hidden_dim, kernel_size=1)
        self.backbone = Joiner(Backbone(body), PositionEmbeddingSine(hidden_dim // 2))
        self.query_groups = query_groups
        if query_groups > 1:  # created last, so the other weights match a group-free model of the same seed
            self.group_query_embed = nn.Embedding(num_queries * (query_groups - 1), hidden_dim)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """``pred_logits`` [B, Q, K+1] (softmax) or [B, Q, K] (sigmoid), ``pred_boxes`` [B, Q, 4] (cx, cy, w, h
        in [0, 1]) and, when ``aux_loss``, ``aux_outputs`` for every decoder layer but the last; in training with
        ``query_groups`` > 1 also ``group_outputs``, one such dict per extra group."""
        features, masks, pos = self.backbone(images, mask)
        groups = self.query_groups if self.training else 1
        queries, query_mask = self.query_embed.weight, None
        if groups > 1:
            queries = torch.cat([queries, self.group_query_embed.weight])
            group = torch.arange(len(queries), device=queries.device) // self.num_queries
            query_mask = group[:, None] != group[None, :]
        hs = self.transformer(self.input_proj(features[-1]), masks[-1], queries, pos[-1], query_mask)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        if groups == 1:
            return self._outputs(logits, boxes)
        q = self.num_queries
        outs = [self._outputs(logits[:, :, g * q:(g + 1) * q], boxes[:, :, g * q:(g + 1) * q]) for g in range(groups)]
        return {**outs[0], "group_outputs": outs[1:]}

    def _outputs(self, logits: torch.Tensor, boxes: torch.Tensor) -> dict:
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]}
                                  for i in range(len(self.transformer.decoder.layers) - 1)]
        return out


class MLP(nn.Module):
    """The feed-forward box head of DETR and Deformable DETR (``bbox_embed.layers.*``): ``num_layers`` Linear
    layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
