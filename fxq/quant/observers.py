"""Observers: streaming statistics plus an estimator, named by a calibration-method string.

Method names (as stored in :class:`fxq.quant.QSpec`): ``"minmax"``, ``"percentile"`` or
``"percentile:<p>"`` (default p = 99.99), ``"mse"``, ``"lp:<p>"`` (any p > 0), ``"lsq"`` (LSQ initial
step size, symmetric only).

What each keeps:
- minmax, lsq: exact running statistics (min/max, mean|x|) — O(channels) memory, exact over any stream.
- percentile: a seeded reservoir of at most ``capacity`` element positions — exact while the stream
  is smaller than the reservoir, a uniform random sample of it beyond.
- mse, lp: exact running min/max (the range searched) plus the seeded reservoir (the values the
  error is measured on).
"""

from __future__ import annotations

import math

import torch

from fxq.errors import InputError
from fxq.quant.calibration import (
    lp_error,
    lsq_init_scale,
    minmax_qparams,
    mse_error,
    percentile_range,
    search_clip_qparams,
)
from fxq.quant.numerics import IntRange, channel_view
from fxq.quant.statistics import Reservoir, RunningAbsMean, RunningMinMax

METHODS = ("minmax", "percentile", "mse", "lp", "lsq")
DEFAULT_PERCENTILE = 99.99
_HELP = 'use "minmax", "percentile", "percentile:99.99", "mse", "lp:<p>" with p > 0, or "lsq"'


def observer_fields(method: str, a_symmetric: bool = False) -> dict[str, str]:
    """The QSpec observer fields of a calibration ``method``: DetPTQ observes with lp:2 (its search starts
    there), mse/lp search the weights too, minmax/percentile take per-channel min-max weights, and ``lsq``
    (QAT's own initialisation) uses LSQ's step for weights and symmetric activations, min-max (LSQ+) for affine
    ones."""
    if method == "lsq":
        return {"w_observer": "lsq", "a_observer": "lsq" if a_symmetric else "minmax"}
    if method == "detptq":
        return {"a_observer": "lp:2", "w_observer": "lp:2"}
    kind, _ = parse_method(method)
    return {"a_observer": method, "w_observer": method if kind in ("lp", "mse") else "minmax"}


def parse_method(method: str) -> tuple[str, float | None]:
    """Split a calibration-method name into (kind, parameter), validating both."""
    if not isinstance(method, str):
        raise InputError(f"calibration method {method!r} is not a string; {_HELP}")
    kind, sep, arg = method.strip().lower().partition(":")
    if kind not in METHODS or (sep and kind not in ("percentile", "lp")):
        raise InputError(f"unknown calibration method {method!r}; {_HELP}")
    if kind == "lp" and not sep:
        raise InputError(f'calibration method "lp" needs its exponent, e.g. "lp:2.4"; {_HELP}')
    if not sep:
        return kind, DEFAULT_PERCENTILE if kind == "percentile" else None
    try:
        value = float(arg)
    except ValueError:
        raise InputError(f"calibration method {method!r}: {arg!r} is not a number; {_HELP}") from None
    if kind == "lp" and not (value > 0 and math.isfinite(value)):
        raise InputError(f"calibration method {method!r}: p must be a finite number > 0")
    if kind == "percentile" and not 0 < value <= 100:
        raise InputError(f"calibration method {method!r}: the percentile must be in (0, 100]")
    return kind, value


class Observer:
    """Records tensors (``update``) and turns them into (scale, zero_point) (``compute``).

    ``axis=None`` gives one scale (shape ()), an integer axis one scale per channel (shape (C,)).
    """

    def __init__(self, qrange: IntRange, symmetric: bool, axis: int | None = None, name: str = "") -> None:
        self.qrange = qrange
        self.symmetric = symmetric
        self.axis = axis
        self.name = name
        self.reset()

    @property
    def who(self) -> str:
        """How error messages name this observer's quantizer."""
        return f"quantizer {self.name!r}" if self.name else "quantizer"

    def reset(self) -> None:
        """Forget everything observed."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> None:
        """Record a tensor; NaN or inf values are refused."""
        if not torch.isfinite(x).all():
            raise InputError(
                f"{self.who}: observed NaN or inf values (shape {tuple(x.shape)}); keep masking and "
                f"positional-encoding normalisers float, or feed finite calibration data"
            )
        self._update(channel_view(x, self.axis, self.who))

    def _update(self, view: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as float32 tensors; InputError if nothing was observed."""
        if not self.has_data:
            raise InputError(f"{self.who}: nothing observed yet; run calibration data through it first")
        scale, zp = self._compute()
        if self.axis is None:
            return scale.reshape(()), zp.reshape(())
        return scale, zp

    @property
    def has_data(self) -> bool:
        """Whether anything has been observed since the last reset."""
        raise NotImplementedError

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Exact running minimum and maximum."""

    def reset(self) -> None:
        self.minmax = RunningMinMax()

    @property
    def has_data(self) -> bool:
        return self.minmax.min is not None

    def _update(self, view: torch.Tensor) -> None:
        self.minmax.update(view, self.who)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax_qparams(self.minmax.min, self.minmax.max, self.qrange, self.symmetric)


class _ReservoirObserver(Observer):
    def __init__(self, *args, capacity: int = 2**17, seed: int = 0, **kwargs) -> None:
        self.capacity, self.seed = capacity, seed
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        self.minmax = RunningMinMax()
        self.reservoir = Reservoir(self.capacity, self.seed)

    @property
    def has_data(self) -> bool:
        return self.reservoir.samples is not None

    def _update(self, view: torch.Tensor) -> None:
        self.minmax.update(view, self.who)
        self.reservoir.update(view, self.who)


class PercentileObserver(_ReservoirObserver):
    """Range from the p-th percentile of the (reservoir-sampled) values."""

    def __init__(self, *args, percentile: float = DEFAULT_PERCENTILE, **kwargs) -> None:
        self.percentile = percentile
        super().__init__(*args, **kwargs)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = percentile_range(self.reservoir.samples, self.percentile, self.symmetric)
        return minmax_qparams(lo, hi, self.qrange, self.symmetric)


class ClipSearchObserver(_ReservoirObserver):
    """Clipping ratio of the exact min-max range minimising Σ|x - Q(x)|^p (p = 2: MSE)."""

    def __init__(self, *args, p: float | None = None, num_candidates: int = 100, **kwargs) -> None:
        self.p, self.num_candidates = p, num_candidates
        self.error = mse_error if p is None else lp_error(p)
        super().__init__(*args, **kwargs)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return search_clip_qparams(
            self.reservoir.samples, self.minmax.min.cpu(), self.minmax.max.cpu(), self.qrange, self.symmetric,
            self.error, self.num_candidates,
        )


class LSQInitObserver(Observer):
    """LSQ's initial step size 2·mean|x|/sqrt(Qp) with zero-point 0 (symmetric quantizers only)."""

    def __init__(self, qrange: IntRange, symmetric: bool, *args, **kwargs) -> None:
        if not symmetric:
            raise InputError(
                'calibration method "lsq" initialises symmetric quantizers only; use "minmax" or "mse" '
                "to initialise an affine (learnable zero-point) quantizer"
            )
        super().__init__(qrange, symmetric, *args, **kwargs)

    def reset(self) -> None:
        self.abs_mean = RunningAbsMean()

    @property
    def has_data(self) -> bool:
        return self.abs_mean.total is not None

    def _update(self, view: torch.Tensor) -> None:
        self.abs_mean.update(view, self.who)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = lsq_init_scale(self.abs_mean.mean, self.qrange)
        return scale, torch.zeros_like(scale)


def make_observer(
    method: str,
    qrange: IntRange,
    symmetric: bool,
    axis: int | None = None,
    *,
    name: str = "",
    capacity: int = 2**17,
    seed: int = 0,
    num_candidates: int = 100,
) -> Observer:
    """The observer of a calibration-method name (see the module docstring for the names)."""
    kind, arg = parse_method(method)
    common = dict(axis=axis, name=name)
    sampled = dict(common, capacity=capacity, seed=seed)
    if kind == "minmax":
        return MinMaxObserver(qrange, symmetric, **common)
    if kind == "lsq":
        return LSQInitObserver(qrange, symmetric, **common)
    if kind == "percentile":
        return PercentileObserver(qrange, symmetric, percentile=arg, **sampled)
    return ClipSearchObserver(qrange, symmetric, p=arg, num_candidates=num_candidates, **sampled)
