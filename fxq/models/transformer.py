"""DETR's encoder-decoder transformer (post-norm), with facebookresearch/detr's parameter names.

Sequences are [S, B, E] as in the official code. Attention is fxq's decomposed MultiheadAttention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq.models.attention import MultiheadAttention


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each followed by residual add and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=mask)))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class DecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory and feed-forward, each post-normed."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                pos: torch.Tensor, query_pos: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=query_mask)))
        tgt2 = self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
                                   key_padding_mask=memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class Encoder(nn.Module):
    """A stack of encoder layers (post-norm: no final norm)."""

    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class Decoder(nn.Module):
    """A stack of decoder layers returning every layer's normed output, stacked [L, Q, B, E]."""

    def __init__(self, layers: list[DecoderLayer], d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                pos: torch.Tensor, query_pos: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_mask, pos, query_pos, query_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """DETR's transformer: flattens the projected feature map, encodes it and decodes the object queries."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = Encoder([EncoderLayer(d_model, nhead, dim_feedforward, dropout)
                                for _ in range(num_encoder_layers)])
        self.decoder = Decoder([DecoderLayer(d_model, nhead, dim_feedforward, dropout)
                                for _ in range(num_decoder_layers)], d_model)
        self.d_model, self.nhead = d_model, nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, query_embed: torch.Tensor,
                pos: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder outputs [L, B, Q, E] for src/pos [B, E, h, w], mask [B, h, w] or None, queries [Q, E] and
        ``query_mask`` [Q, Q] (True = a query does not attend to another) or None."""
        batch = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)
        mask = None if mask is None else mask.flatten(1)
        memory = self.encoder(src, mask, pos)
        hs = self.decoder(torch.zeros_like(query_pos), memory, mask, pos, query_pos, query_mask)
        return hs.transpose(1, 2)
