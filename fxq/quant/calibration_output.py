"""Output-fitted clipping: the qparams of a layer's quantizers minimising Σ|O − Ô|^p of the layer's output.

O is the float layer's output on cached calibration inputs, Ô the same layer with its operands fake-quantized
(:func:`fxq.quant.numerics.fake_quantize`, the exported numerics). Each searched operand's candidates are the
clip ratios of :func:`fxq.quant.calibration.clip_ratios` applied to its observed range, as in the input-fitted
search (:func:`fxq.quant.calibration.search_clip_qparams`), so both fits choose from the same grid.

The search is coordinate-wise: one operand at a time, the others held at their current qparams, for ``rounds``
sweeps over the operands in order. A per-channel operand whose channels index one output dimension (a conv or
linear weight: ``channel_dim``) picks each channel's ratio on that channel's output error alone, which is exact
for those layers (output channel c depends on weight channel c only); otherwise one ratio is picked for the
whole operand on the total error. The operand's starting qparams are always a candidate and ties keep them, so
the output error never rises above the start's (e.g. the input-fitted qparams) on the cached data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fxq.quant.calibration import candidate_qparams
from fxq.quant.numerics import IntRange, fake_quantize

QParams = tuple[torch.Tensor, torch.Tensor]
#: ``layer(batch, operands)``: the layer's output on cached batch ``batch`` given its operands' values.
LayerFn = Callable[[int, list[torch.Tensor]], torch.Tensor]


@dataclass
class Operand:
    """One quantized operand of a layer: its float values, integer range, searched range and start qparams.

    ``values`` holds one tensor per cached batch, or a single tensor used for every batch (a weight);
    ``lo``/``hi`` (one value per channel, or one) is the range the clip ratios scale; ``search=False``
    keeps ``start`` (a quantizer another layer fits); ``channel_dim`` is the output dimension indexing this
    per-channel operand's channels (None: one ratio for the whole operand)."""

    values: Sequence[torch.Tensor]
    qrange: IntRange
    symmetric: bool
    axis: int | None
    lo: torch.Tensor
    hi: torch.Tensor
    start: QParams
    search: bool = True
    channel_dim: int | None = None

    def value(self, batch: int) -> torch.Tensor:
        """The float value of cached batch ``batch``."""
        return self.values[0] if len(self.values) == 1 else self.values[batch]

    def quantized(self, batch: int, qparams: QParams) -> torch.Tensor:
        """The value of cached batch ``batch`` fake-quantized with ``qparams``."""
        return fake_quantize(self.value(batch), qparams[0], qparams[1], self.qrange, self.axis)


def output_error(diff: torch.Tensor, p: float, channel_dim: int | None) -> torch.Tensor:
    """Σ|diff|^p (summed in float64): per index of ``channel_dim`` (shape (C,)), or in total (shape (1,))."""
    powered = diff.abs().pow(p)
    if channel_dim is None:
        return powered.sum(dtype=torch.float64).reshape(1)
    dim = channel_dim % diff.dim()
    return powered.sum(dim=[d for d in range(diff.dim()) if d != dim], dtype=torch.float64)


def fit_output_qparams(layer: LayerFn, reference: Sequence[torch.Tensor], operands: Sequence[Operand], p: float,
                       num_candidates: int = 100, rounds: int = 1) -> list[QParams]:
    """Per operand, the qparams (from its start and its clip-ratio grid) minimising Σ|O − Ô|^p over the
    cached batches (``reference[b]`` = O of batch b), by coordinate-wise search (module docstring)."""
    current = [(op.start[0].reshape(-1).float(), op.start[1].reshape(-1).float()) for op in operands]
    for _ in range(rounds):
        for i, op in enumerate(operands):
            if op.search:
                current[i] = _fit_operand(layer, reference, operands, current, i, p, num_candidates)
    return [_shaped(q, op) for q, op in zip(current, operands, strict=True)]


def _fit_operand(layer: LayerFn, reference: Sequence[torch.Tensor], operands: Sequence[Operand],
                 current: list[QParams], index: int, p: float, num_candidates: int) -> QParams:
    """Operand ``index``'s best qparams with the other operands held at ``current``."""
    op = operands[index]
    scales, zps = candidate_qparams(op.lo, op.hi, op.qrange, op.symmetric, num_candidates)
    scales = torch.cat([current[index][0].expand(1, scales.shape[1]), scales])  # the start first: ties keep it
    zps = torch.cat([current[index][1].expand(1, zps.shape[1]), zps])
    per_channel = op.axis is not None and op.channel_dim is not None
    errors = torch.zeros(len(scales), scales.shape[1] if per_channel else 1, dtype=torch.float64)
    for b, ref in enumerate(reference):
        fixed = [o.quantized(b, q) for o, q in zip(operands, current, strict=True)]
        for k in range(len(scales)):
            fixed[index] = op.quantized(b, (_squeeze(scales[k], op), _squeeze(zps[k], op)))
            errors[k] += output_error(layer(b, fixed) - ref, p, op.channel_dim if per_channel else None)
    best = errors.argmin(dim=0)  # the first minimum: the start, else the larger ratio
    if not per_channel:
        best = best.expand(scales.shape[1])
    pick = torch.arange(scales.shape[1])
    return scales[best, pick], zps[best, pick]


def _squeeze(v: torch.Tensor, op: Operand) -> torch.Tensor:
    return v.reshape(()) if op.axis is None else v


def _shaped(q: QParams, op: Operand) -> QParams:
    return _squeeze(q[0], op), _squeeze(q[1], op)
