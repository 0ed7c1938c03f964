"""Deformable DETR's encoder-decoder (fundamentalvision/Deformable-DETR layout and parameter names), FX-traceable.

Post-norm layers; the decoder's self-attention is :class:`fxq.models.attention.MultiheadAttention` (primitives in
the graph, ``nn.MultiheadAttention``'s keys). Level sizes are ``(H, W)`` values read from feature shapes, never a
tensor that is iterated, so a traced graph stays valid at other input sizes.

Without padding masks (``masks=None``) no masking op is emitted and every valid ratio is 1: reference points are
not rescaled (the official code multiplies them by 1.0, which changes nothing).

Two-stage (``two_stage=True``, official ``--two_stage``): every encoder token becomes a box proposal (its cell
centre, width and height 0.05·2^level, in logit space; proposals outside (0.01, 0.99) and padded tokens are
+inf and their memory is zeroed) scored and refined by the encoder's class and box heads (the last of the
detector's ``num_decoder_layers + 1`` heads, which the detector assigns to ``decoder.class_embed`` /
``decoder.bbox_embed``); the top ``two_stage_num_proposals`` by the first class logit, detached, are the decoder's
reference boxes, and their sine embedding through ``pos_trans`` + ``pos_trans_norm`` gives the query position and
content. Top-k and gather trace as ordinary FX nodes.

Deviations from the official code that do not change results: the decoder returns per-layer lists instead of
stacked tensors; every layer is built (and initialised) on its own instead of deep-copied from one prototype;
the proposals' sine embedding uses d_model/2 frequencies per coordinate (as Transformers; the official code
fixes 128, which is d_model/2 for its only working width, 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxq.errors import InputError
from fxq.models.attention import MultiheadAttention
from fxq.models.ms_deform_attn import MSDeformAttn, SpatialShapes


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 − x)) with x clamped to [0, 1] and both terms to at least ``eps`` (official)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Unpadded fraction (w, h) [B, 2] of each image for a padding mask [B, H, W] (True at padding)."""
    height, width = mask.shape[1], mask.shape[2]
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack((valid_w.float() / width, valid_h.float() / height), -1)


def _cells(n, device: torch.device, start: float = 0.0) -> torch.Tensor:  # start: 0 or 0.5
    """start, start + 1, ..., start + n − 1 in float32: the official code's ``linspace(0, n − 1, n)`` (start 0) and
    ``linspace(0.5, n − 0.5, n)`` (start 0.5) exactly, as one arange, which torch.onnx exports in float32 also at
    static shapes (its linspace then exports float64 constants that onnxruntime refuses to mix with float32).
    One node, as linspace was: the traced graph's node names, and so saved QAT runs' quantizer names, stay."""
    return torch.arange(start, n, 1.0, dtype=torch.float32, device=device)  # start < 1: n values


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor | None,
                             device: torch.device) -> torch.Tensor:
    """Centres (x, y) of every cell of every level, normalised by the valid size: [B, S, L, 2].

    With ``valid_ratios=None`` (no padding) the result is [1, S, 1, 2], broadcasting over batch and levels.
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(_cells(h, device, 0.5), _cells(w, device, 0.5), indexing="ij")
        if valid_ratios is None:
            ref_y, ref_x = ref_y.reshape(-1)[None] / h, ref_x.reshape(-1)[None] / w
        else:
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)[:, :, None]
    return reference_points if valid_ratios is None else reference_points * valid_ratios[:, None]


def decoder_reference_input(reference_points: torch.Tensor, valid_ratios: torch.Tensor | None,
                            box_reference: bool) -> torch.Tensor:
    """Per-level reference [B, Q, L, 2|4] (or [B, Q, 1, 2|4] without padding) scaled to each level's valid area."""
    if valid_ratios is None:
        return reference_points[:, :, None]
    ratios = torch.cat((valid_ratios, valid_ratios), -1) if box_reference else valid_ratios
    return reference_points[:, :, None] * ratios[:, None]


def encoder_proposals(spatial_shapes: SpatialShapes, masks: list[torch.Tensor] | None, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage proposals: one box per encoder token in logit space [B, S, 4] (+inf where unusable) and whether
    it is usable [B, S, 1] (centre and size inside (0.01, 0.99), not padding).

    The box is the cell centre normalised by the valid (unpadded) size, width and height 0.05·2^level. ``masks``:
    one [B, H_l, W_l] per level (True at padding), or None for unpadded images (then B is 1, broadcasting).
    """
    proposals = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(_cells(h, device), _cells(w, device), indexing="ij")
        grid_x, grid_y = (grid_x + 0.5)[None], (grid_y + 0.5)[None]
        if masks is None:
            grid = torch.stack((grid_x / w, grid_y / h), -1)
        else:
            valid_h = torch.sum(~masks[level][:, :, 0], 1)
            valid_w = torch.sum(~masks[level][:, 0, :], 1)
            grid = torch.stack((grid_x / valid_w[:, None, None], grid_y / valid_h[:, None, None]), -1)
        size = torch.full_like(grid, 0.05 * 2.0 ** level)
        proposals.append(torch.cat((grid, size), -1).flatten(1, 2))
    boxes = torch.cat(proposals, 1)
    usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    if masks is not None:
        usable = usable & ~torch.cat([mask.flatten(1) for mask in masks], 1)[..., None]
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~usable, float("inf"))
    return logits, usable


def proposal_pos_embed(box_logits: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding [B, Q, 4·num_feats] of boxes given as logits [B, Q, 4]: per coordinate (sigmoid · 2π),
    ``num_feats`` frequencies, sine and cosine interleaved (official ``get_proposal_pos_embed``)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=box_logits.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = (box_logits.sigmoid() * (2 * math.pi))[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: SpatialShapes, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Updated tokens [B, S, d_model]."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers sharing the cell-centre reference points."""

    def __init__(self, layers: list[DeformableTransformerEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)

    def forward(self, src: torch.Tensor, spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor | None,
                pos: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Memory [B, S, d_model] for flattened multi-level tokens ``src`` [B, S, d_model]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the memory, feed-forward (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, spatial_shapes: SpatialShapes, padding_mask: torch.Tensor | None = None,
                box_reference: bool = False) -> torch.Tensor:
        """Updated queries [B, Q, d_model]."""
        q = (tgt + query_pos).transpose(0, 1)
        tgt2 = self.self_attn(q, q, tgt.transpose(0, 1)).transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask,
                               box_reference)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers; with ``bbox_embed`` set (iterative box refinement, assigned by the detector as in
    the official code) each layer refines the reference boxes, which are detached before the next layer.
    ``class_embed`` is set (by the detector) only for two-stage, whose encoder head is its last entry."""

    def __init__(self, layers: list[DeformableTransformerDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor | None, query_pos: torch.Tensor,
                padding_mask: torch.Tensor | None = None, box_reference: bool = False
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: output queries [B, Q, d_model] and the reference after that layer ([B, Q, 2], or [B, Q, 4]
        boxes once refined). ``box_reference``: the initial ``reference_points`` are boxes [B, Q, 4] (two-stage)
        rather than points [B, Q, 2]."""
        output = tgt
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            reference_input = decoder_reference_input(reference_points, valid_ratios, box_reference)
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, padding_mask, box_reference)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                reference_points = refine_reference(delta, reference_points, box_reference).detach()
                box_reference = True
            outputs.append(output)
            references.append(reference_points)
        return outputs, references


def refine_reference(delta: torch.Tensor, reference: torch.Tensor, box_reference: bool) -> torch.Tensor:
    """sigmoid(delta + inverse_sigmoid(reference)) as a box [..., 4]; a point reference [..., 2] only shifts the
    centre logits."""
    return add_reference_logits(delta, inverse_sigmoid(reference), box_reference).sigmoid()


def add_reference_logits(delta: torch.Tensor, reference_logits: torch.Tensor, box_reference: bool) -> torch.Tensor:
    """``delta`` [..., 4] plus the reference in logit space ([..., 4], or [..., 2] added to the centre)."""
    if box_reference:
        return delta + reference_logits
    return torch.cat((delta[..., :2] + reference_logits, delta[..., 2:]), -1)


class DeformableTransformer(nn.Module):
    """Multi-scale encoder over flattened feature levels and a decoder of learned queries (single-stage) or of the
    encoder's top-scoring proposals (``two_stage``: ``two_stage_num_proposals`` queries)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300) -> None:
        super().__init__()
        self.d_model, self.nhead, self.num_feature_levels = d_model, nhead, num_feature_levels
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        self.encoder = DeformableTransformerEncoder([
            DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                              enc_n_points) for _ in range(num_encoder_layers)])
        self.decoder = DeformableTransformerDecoder([
            DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                              dec_n_points) for _ in range(num_decoder_layers)])
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: Xavier for every matrix, then the deformable-attention, reference-point and
        level-embedding schemes."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor] | None, pos_embeds: list[torch.Tensor],
                query_embed: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor] | None]:
        """Decoder outputs per layer, the initial reference ([B, Q, 2] points, or [B, Q, 4] boxes for two-stage),
        the reference after each layer, and for two-stage the encoder's proposal logits [B, S, num_classes] and
        box logits [B, S, 4] (None for single-stage).

        ``srcs``/``pos_embeds``: one [B, d_model, H_l, W_l] per level; ``masks``: one [B, H_l, W_l] per level
        (True at padding) or None for unpadded images; ``query_embed`` [Q, 2·d_model] (position ‖ content),
        single-stage only.
        """
        spatial_shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                                 for level, pos in enumerate(pos_embeds)], 1)
        mask_flatten = valid_ratios = None
        if masks is not None:
            mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
            valid_ratios = torch.stack([valid_ratio(mask) for mask in masks], 1)
        memory = self.encoder(src_flatten, spatial_shapes, valid_ratios, pos_flatten, mask_flatten)

        proposals = None
        if self.two_stage:
            query_pos, tgt, reference_points, proposals = self.proposal_queries(memory, spatial_shapes, masks)
        else:
            if query_embed is None:
                raise ValueError("a single-stage DeformableTransformer needs query_embed [Q, 2·d_model]")
            query_pos, tgt, reference_points = self.learned_queries(query_embed, memory.shape[0])
        outputs, references = self.decoder(tgt, reference_points, memory, spatial_shapes, valid_ratios, query_pos,
                                           mask_flatten, self.two_stage)
        return outputs, reference_points, references, proposals

    def learned_queries(self, query_embed: torch.Tensor, batch: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Single-stage: query position, content [B, Q, d_model] and reference points [B, Q, 2] from the learned
        ``query_embed`` [Q, 2·d_model]."""
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
        # repeat, not expand: under no_grad a view of a parameter passed to a submodule breaks module hooks
        # (FlopCounterMode's module tracker); the copy is a few hundred kB.
        query_pos = query_pos.unsqueeze(0).repeat(batch, 1, 1)
        tgt = tgt.unsqueeze(0).repeat(batch, 1, 1)
        return query_pos, tgt, self.reference_points(query_pos).sigmoid()

    def proposal_queries(self, memory: torch.Tensor, spatial_shapes: SpatialShapes,
                         masks: list[torch.Tensor] | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Two-stage: query position, content [B, K, d_model] and reference boxes [B, K, 4] of the K =
        ``two_stage_num_proposals`` encoder proposals with the highest first-class logit, and the encoder's
        (class logits [B, S, C], box logits [B, S, 4]) over all S tokens."""
        tokens, k = memory.shape[1], self.two_stage_num_proposals
        if isinstance(tokens, int) and tokens < k:
            raise InputError(f"two-stage Deformable DETR keeps {k} proposals but the image gives only {tokens} "
                             "encoder tokens: use larger images or fewer queries (num_queries)")
        proposal_logits, usable = encoder_proposals(spatial_shapes, masks, memory.device)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~usable, 0.0)))
        head = self.decoder.num_layers
        enc_class = self.decoder.class_embed[head](output_memory)
        enc_boxes = self.decoder.bbox_embed[head](output_memory) + proposal_logits
        top = torch.topk(enc_class[..., 0], k, dim=1)[1]
        box_logits = torch.gather(enc_boxes, 1, top.unsqueeze(-1).repeat(1, 1, 4)).detach()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(box_logits, self.d_model // 2)))
        query_pos, tgt = torch.split(pos_trans_out, self.d_model, dim=2)
        return query_pos, tgt, box_logits.sigmoid(), (enc_class, enc_boxes)
