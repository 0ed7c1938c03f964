"""Estimators: observed values -> (scale, zero_point) for an integer range, per channel.

All functions work on per-channel vectors (``lo``, ``hi``: shape (C,)) and (C, N) sample matrices
(one row per channel; per-tensor quantization is C = 1). They return float32 scales of shape (C,)
and integer-valued float32 zero-points of shape (C,).

- :func:`minmax_qparams`: the range [lo, hi] (widened to contain 0 when affine) maps onto [qmin, qmax];
  symmetric: scale = max(|lo|, |hi|) / qmax, zero-point 0.
- :func:`percentile_range`: the p-th percentile (and the (100 - p)-th when affine), linear interpolation
  as ``numpy.percentile``.
- :func:`candidate_qparams`: the qparams of the clipped ranges [r*lo, r*hi] for the ratios of :func:`clip_ratios`.
- :func:`search_clip_qparams`: clipping-ratio search minimising an error of x - Q(x) computed with
  :func:`fxq.quant.numerics.fake_quantize` (the exported numerics); :func:`mse_error` and
  :func:`lp_error` are the errors. The ratio 1 (min-max) is always a candidate, and ties keep the
  larger ratio, so the result is never worse than min-max on the samples searched.
- :func:`lsq_init_scale`: LSQ's initial step size 2 * mean|x| / sqrt(Qp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxq.errors import InputError
from fxq.quant.numerics import IntRange, fake_quantize

ErrorFn = Callable[[torch.Tensor], torch.Tensor]

_TINY = torch.finfo(torch.float32).tiny


def _zero_point(lo: torch.Tensor, scale: torch.Tensor, qrange: IntRange) -> torch.Tensor:
    zp = torch.round(qrange.qmin - lo / scale.double())
    return zp.clamp(qrange.qmin, qrange.qmax).float()


def minmax_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qrange: IntRange, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) mapping the range [lo, hi] onto ``qrange`` (a zero range gives scale 1)."""
    lo, hi = lo.double().reshape(-1), hi.double().reshape(-1)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qrange.qmax).float()
        scale = torch.where(scale >= _TINY, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qrange.qmax - qrange.qmin)).float()
    scale = torch.where(scale >= _TINY, scale, torch.ones_like(scale))
    return scale, _zero_point(lo, scale, qrange)


def _percentile(sorted_rows: torch.Tensor, q: float) -> torch.Tensor:
    n = sorted_rows.shape[1]
    pos = torch.tensor(q / 100.0 * (n - 1), dtype=torch.float64)
    below = int(pos.floor())
    above = min(below + 1, n - 1)
    frac = pos - below
    lo_v, hi_v = sorted_rows[:, below].double(), sorted_rows[:, above].double()
    return lo_v + (hi_v - lo_v) * frac


def percentile_range(
    samples: torch.Tensor, percentile: float, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lo, hi): the ``percentile``-th of |x| as ±hi when symmetric, else (100-p, p)-th of x."""
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"percentile={percentile} must be in (0, 100]; 99.99 is a common choice")
    if symmetric:
        hi = _percentile(samples.abs().sort(dim=1).values, percentile)
        return -hi, hi
    rows = samples.sort(dim=1).values
    return _percentile(rows, 100.0 - percentile), _percentile(rows, percentile)


def mse_error(diff: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squared errors (summed in float64)."""
    return diff.square().sum(dim=1, dtype=torch.float64)


def lp_error(p: float) -> ErrorFn:
    """Per-row sum of |error|^p (summed in float64), for any p > 0."""
    if not (isinstance(p, int | float) and 0.0 < p < float("inf")):
        raise InputError(f"Lp error needs a finite p > 0, got p={p!r}; DetPTQ uses p in 1.0 ... 4.0")

    def error(diff: torch.Tensor) -> torch.Tensor:
        return diff.abs().pow(p).sum(dim=1, dtype=torch.float64)

    return error


def clip_ratios(num_candidates: int) -> list[float]:
    """Candidate clipping ratios 1, 1 - 1/n, ..., 1/n (the min-max range first)."""
    if num_candidates < 1:
        raise InputError(f"num_candidates={num_candidates} must be at least 1")
    return [(num_candidates - i) / num_candidates for i in range(num_candidates)]


def candidate_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qrange: IntRange, symmetric: bool, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero_points) of shape (num_candidates, C): the clipped ranges [r*lo, r*hi] for the ratios r of
    :func:`clip_ratios` (largest first), as :func:`minmax_qparams` maps them."""
    ratios = torch.tensor(clip_ratios(num_candidates), dtype=torch.float64).reshape(-1, 1)
    lo, hi = lo.double().reshape(1, -1), hi.double().reshape(1, -1)
    scales, zps = minmax_qparams((ratios * lo).reshape(-1), (ratios * hi).reshape(-1), qrange, symmetric)
    return scales.reshape(num_candidates, -1), zps.reshape(num_candidates, -1)


def search_clip_qparams(
    samples: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    qrange: IntRange,
    symmetric: bool,
    error: ErrorFn = mse_error,
    num_candidates: int = 100,
    chunk_elements: int = 2**22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero_point) of the clipped range [r*lo, r*hi] whose Q(samples) minimises ``error``.

    Candidates are evaluated in batches of at most ``chunk_elements`` quantized values (memory bound).
    """
    samples = samples.float()
    channels = samples.shape[0]
    scales, zps = (v.reshape(-1) for v in candidate_qparams(lo, hi, qrange, symmetric, num_candidates))
    per_chunk = max(1, chunk_elements // max(1, samples.numel()))
    errors = []
    for start in range(0, num_candidates, per_chunk):
        rows = slice(start * channels, min(start + per_chunk, num_candidates) * channels)
        tiled = samples.repeat((rows.stop - rows.start) // channels, 1)
        errors.append(error(tiled - fake_quantize(tiled, scales[rows], zps[rows], qrange, axis=0)))
    best = torch.cat(errors).reshape(num_candidates, channels).argmin(dim=0)  # first minimum: larger ratio
    pick = best * channels + torch.arange(channels)
    return scales[pick], zps[pick]


def lsq_init_scale(abs_mean: torch.Tensor, qrange: IntRange) -> torch.Tensor:
    """LSQ's initial step size 2 * mean|x| / sqrt(Qp), Qp = qmax (a zero mean gives scale 1)."""
    scale = (2.0 * abs_mean.double().reshape(-1) / qrange.qmax**0.5).float()
    return torch.where(scale >= _TINY, scale, torch.ones_like(scale))
