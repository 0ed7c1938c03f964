"""Multi-head attention decomposed into graph primitives, with ``nn.MultiheadAttention``'s parameter names.

The traced graph shows the q/k/v projections (``F.linear`` on slices of ``in_proj_weight``), ``Q·Kᵀ``
(:func:`attention_scores`), ``softmax``, ``A·V`` (:func:`attention_mix`) and the output projection
(``out_proj``), so that each can be quantized. The two matmuls are FX-wrapped functions so passes recognise
them by target; each is a single ``bmm``.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


@torch.fx.wrap
def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q·Kᵀ for q [N, L, d] and k [N, S, d] (q already scaled by 1/√d)."""
    return torch.bmm(q, k.transpose(1, 2))


@torch.fx.wrap
def attention_mix(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A·V for attention weights [N, L, S] and values [N, S, d]."""
    return torch.bmm(attn, v)


class MultiheadAttention(nn.Module):
    """Sequence-first multi-head attention, numerically equivalent to ``nn.MultiheadAttention`` (no dropout in
    eval) and loading its state_dict keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor, index: int) -> torch.Tensor:
        e = self.embed_dim
        rows = slice(index * e, (index + 1) * e)
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        length, batch = x.shape[0], x.shape[1]
        return x.reshape(length, batch * self.num_heads, self.head_dim).transpose(0, 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [L, B, E] for query [L, B, E], key/value [S, B, E]; ``key_padding_mask`` [B, S] and
        ``attn_mask`` [L, S], True = ignore."""
        length, batch = query.shape[0], query.shape[1]
        q = self._split_heads(self._project(query, 0)) * (1.0 / math.sqrt(self.head_dim))
        k = self._split_heads(self._project(key, 1))
        v = self._split_heads(self._project(value, 2))
        scores = attention_scores(q, k)
        if key_padding_mask is not None:
            scores = scores.reshape(batch, self.num_heads, length, -1)
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            scores = scores.reshape(batch * self.num_heads, length, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        attn = self.dropout(scores.softmax(dim=-1))
        out = attention_mix(attn, v).transpose(0, 1).reshape(length, batch, self.embed_dim)
        return self.out_proj(out)
