"""Deformable DETR (fundamentalvision/Deformable-DETR layout: official state_dict keys, order and initialisation).

Takes a batched image tensor and an optional padding mask instead of a NestedTensor, so that
``torch.fx.symbolic_trace(model, concrete_args={"mask": None})`` gives a graph valid at any input size
(``mask=None`` means unpadded images: no masking op at all, valid ratios 1).

Deviations from the official code:
- GroupNorm in ``input_proj`` uses gcd(32, hidden_dim) groups: 32 for every width the official code accepts,
  and still valid for small widths that 32 does not divide (e.g. 48 → 16).
- ``num_feature_levels`` 2 takes layer3 and layer4 (the official code only supports 1, which takes layer4, or
  ≥ 3); levels beyond the backbone's are 3×3 stride-2 convolutions as in the official code.
- With ``aux_loss=False`` only the last decoder layer's heads are computed (the official code computes all and
  discards them); two-stage's ``enc_outputs`` (the encoder's proposals, which only training's loss reads) are
  returned with the auxiliary outputs, i.e. only with ``aux_loss``.
- Two-stage refuses a configuration without box refinement (the official code fails at its first forward on
  it; Transformers refuses it too).
- The box update ``tmp[..., :2] += reference`` is written out of place (concatenation) for tracing and export.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fxq.models.backbone import Backbone, Joiner, downsample_mask
from fxq.models.deformable_transformer import DeformableTransformer, add_reference_logits, inverse_sigmoid
from fxq.models.detr import MLP
from fxq.models.position_encoding import PositionEmbeddingSine
from fxq.models.resnet import ResNetBody

BACKBONE_LAYERS = ("layer2", "layer3", "layer4")


class DeformableDETR(nn.Module):
    """Deformable DETR detector (optional iterative box refinement; optional two-stage, which needs refinement)
    with sigmoid classification over ``num_classes`` (no no-object logit).

    Two-stage decodes the encoder's ``num_queries`` best proposals instead of learned queries (no
    ``query_embed``); its class and box heads have one more entry, the encoder's (official layout).
    """

    head = "sigmoid"

    def __init__(self, backbone_name: str = "resnet50", base_width: int = 64, dilation: bool = False,
                 hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_queries: int = 300, num_classes: int = 91,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 with_box_refine: bool = False, aux_loss: bool = True, backbone_norm: str = "frozen_bn",
                 two_stage: bool = False) -> None:
        super().__init__()
        if num_feature_levels < 1:
            raise ValueError(f"num_feature_levels must be at least 1, got {num_feature_levels}")
        if two_stage and not with_box_refine:
            raise ValueError("two_stage=True needs with_box_refine=True (the encoder's proposal head is the extra "
                             "box-refinement head, as in the official code and Transformers): pass both")
        self.num_queries, self.num_classes, self.num_feature_levels = num_queries, num_classes, num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.transformer = DeformableTransformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward,
                                                 dropout, num_feature_levels, dec_n_points, enc_n_points,
                                                 two_stage, num_queries)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.class_embed, self.bbox_embed = class_embed, bbox_embed  # registered here for the official key order
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        return_layers = BACKBONE_LAYERS[-num_feature_levels:] if num_feature_levels < 3 else BACKBONE_LAYERS
        body = ResNetBody(backbone_name, return_layers=return_layers, dilation=dilation, base_width=base_width,
                          norm=backbone_norm)
        backbone = Backbone(body)
        self.input_proj = build_input_proj(backbone.num_channels, hidden_dim, num_feature_levels)
        self.backbone = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, offset=-0.5))
        init_heads(class_embed, bbox_embed, self.input_proj)
        self.class_embed, self.bbox_embed = replicate_heads(class_embed, bbox_embed, dec_layers + int(two_stage),
                                                            with_box_refine)
        if with_box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            with torch.no_grad():  # official: every box head starts at size logit 0 (the proposals set the size)
                for head in self.bbox_embed:
                    head.layers[-1].bias[2:] = 0.0

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """``pred_logits`` [B, Q, num_classes], ``pred_boxes`` [B, Q, 4] (normalised cx, cy, w, h) and, with
        ``aux_loss``, ``aux_outputs`` for every decoder layer but the last and, for two-stage, ``enc_outputs``
        (the encoder's class logits and boxes for all S tokens: [B, S, num_classes], [B, S, 4]).

        ``images`` [B, 3, H, W]; ``mask`` [B, H, W] True at padding, or None for unpadded images.
        """
        srcs, masks, pos = self.multi_scale_features(images, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        outputs, init_reference, references, proposals = self.transformer(
            srcs, None if mask is None else masks, pos, query_embed)
        num_layers = len(outputs)
        layers = range(num_layers) if self.aux_loss else [num_layers - 1]
        logits, boxes = [], []
        for lid in layers:
            reference = init_reference if lid == 0 else references[lid - 1]
            logits.append(self.class_embed[lid](outputs[lid]))
            delta = self.bbox_embed[lid](outputs[lid])
            box_reference = self.two_stage or (self.with_box_refine and lid > 0)
            boxes.append(add_reference_logits(delta, inverse_sigmoid(reference), box_reference).sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
        if self.aux_loss and proposals is not None:
            out["enc_outputs"] = {"pred_logits": proposals[0], "pred_boxes": proposals[1].sigmoid()}
        return out

    def multi_scale_features(self, images: torch.Tensor, mask: torch.Tensor | None
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]:
        """Per level: projected feature [B, hidden_dim, h, w], padding mask (None without ``mask``), position."""
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(feature) for proj, feature in zip(self.input_proj, features, strict=False)]
        for level in range(len(features), self.num_feature_levels):
            src = self.input_proj[level](features[-1] if level == len(features) else srcs[-1])
            level_mask = downsample_mask(mask, src)
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](src, level_mask))
        return srcs, masks, pos


def build_input_proj(in_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """1×1 conv + GroupNorm per backbone level, then 3×3 stride-2 conv + GroupNorm per extra level."""
    groups = math.gcd(32, hidden_dim)
    projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(groups, hidden_dim))
             for c in in_channels]
    channels = in_channels[-1]
    for _ in range(len(in_channels), num_feature_levels):
        projs.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                   nn.GroupNorm(groups, hidden_dim)))
        channels = hidden_dim
    return nn.ModuleList(projs)


def init_heads(class_embed: nn.Linear, bbox_embed: MLP, input_proj: nn.ModuleList, prior_prob: float = 0.01
               ) -> None:
    """Official initialisation: classification prior ``prior_prob``, zero last box layer, Xavier projections."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.zeros_(bbox_embed.layers[-1].weight)
    nn.init.zeros_(bbox_embed.layers[-1].bias)
    for proj in input_proj:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)


def replicate_heads(class_embed: nn.Linear, bbox_embed: MLP, num_pred: int, with_box_refine: bool
                    ) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``num_pred`` (class, box) heads, one per decoder layer (plus the encoder's, two-stage): independent copies
    with box refinement, otherwise the same module repeated (its keys appear once per layer in the state_dict,
    its parameters once in ``parameters()``).

    The initial box size logit −2 is set on the first box head only with refinement, on the shared one otherwise.
    """
    if with_box_refine:
        class_embeds = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
        bbox_embeds = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
    else:
        class_embeds = nn.ModuleList([class_embed] * num_pred)
        bbox_embeds = nn.ModuleList([bbox_embed] * num_pred)
    with torch.no_grad():
        bbox_embeds[0].layers[-1].bias[2:] = -2.0
    return class_embeds, bbox_embeds
