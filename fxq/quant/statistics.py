"""Streaming statistics of observed tensors, kept per channel on (channels, elements) views.

- :class:`RunningMinMax`: exact running minimum and maximum, O(channels) memory.
- :class:`RunningAbsMean`: exact running mean of |x| (float64 accumulation), O(channels) memory.
- :class:`Reservoir`: a uniform random sample of at most ``capacity`` columns (element positions, the
  same positions for every channel), seeded, so percentiles and clipping searches are deterministic.
  While fewer than ``capacity`` columns have been seen it holds all of them, in order (exact statistics).
  The sample is kept in CPU memory whatever the device observed.
"""

from __future__ import annotations

import torch

from fxq.errors import InputError


def _check_channels(expected: int | None, view: torch.Tensor, who: str) -> int:
    if expected is not None and view.shape[0] != expected:
        raise InputError(
            f"{who}: observed {view.shape[0]} channels after {expected}; observe tensors with the same "
            f"channel count, or reset() the observer first"
        )
    return view.shape[0]


class RunningMinMax:
    """Exact per-channel minimum and maximum over everything observed."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, view: torch.Tensor, who: str = "observer") -> None:
        """Fold a (channels, elements) view into the running minimum and maximum."""
        _check_channels(None if self.min is None else self.min.numel(), view, who)
        lo, hi = torch.aminmax(view.detach(), dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class RunningAbsMean:
    """Exact per-channel mean of |x| over everything observed (float64 sums)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, view: torch.Tensor, who: str = "observer") -> None:
        """Fold a (channels, elements) view into the running sums."""
        _check_channels(None if self.total is None else self.total.numel(), view, who)
        part = view.detach().abs().sum(dim=1, dtype=torch.float64)
        self.total = part if self.total is None else self.total + part
        self.count += view.shape[1]

    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel mean of |x| (float64), or None before any update."""
        return None if self.total is None else self.total / self.count


class Reservoir:
    """Uniform sample of at most ``capacity`` columns of the observed (channels, elements) views.

    Algorithm R (each of the n columns seen so far is kept with probability capacity/n), vectorised per
    update, with a private generator seeded by ``seed``: the same stream gives the same sample.
    """

    def __init__(self, capacity: int = 2**17, seed: int = 0) -> None:
        if capacity < 1:
            raise InputError(f"reservoir capacity={capacity} must be at least 1")
        self.capacity = capacity
        self.seed = seed
        self.samples: torch.Tensor | None = None
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, view: torch.Tensor, who: str = "observer") -> None:
        """Offer every column of a (channels, elements) view to the sample."""
        _check_channels(None if self.samples is None else self.samples.shape[0], view, who)
        view = view.detach().to("cpu")
        room = self.capacity - (0 if self.samples is None else self.samples.shape[1])
        head, tail = view[:, :room], view[:, room:]
        self.samples = head.clone() if self.samples is None else torch.cat([self.samples, head], dim=1)
        self.seen += head.shape[1]
        if tail.shape[1]:
            self._replace(tail)

    def _replace(self, tail: torch.Tensor) -> None:
        m = tail.shape[1]
        index = torch.arange(self.seen, self.seen + m, dtype=torch.float64)  # 0-based stream positions
        slot = (torch.rand(m, dtype=torch.float64, generator=self._generator) * (index + 1)).floor().long()
        keep = torch.nonzero(slot < self.capacity).squeeze(1)
        # Several columns may draw the same slot: as in the sequential algorithm, the latest one wins.
        winner = torch.full((self.capacity,), -1, dtype=torch.long)
        winner.scatter_reduce_(0, slot[keep], keep, reduce="amax")
        filled = torch.nonzero(winner >= 0).squeeze(1)
        self.samples[:, filled] = tail[:, winner[filled]]
        self.seen += m
