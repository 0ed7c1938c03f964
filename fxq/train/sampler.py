"""Seeded epoch-wise batch sampling, sharded over processes, resumable mid-epoch.

Epoch e's order is a permutation drawn from a ``torch.Generator`` seeded with (seed, e). Global batch j is
``perm[j*B : (j+1)*B]``; process r of W gets the r-th contiguous slice of B/W indices, so the union of the
processes' batches is exactly the single-process batch. The last incomplete batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from fxq.errors import InputError


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (e.g. (seed, epoch))."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this process's index lists for the batches ``start..`` of one epoch."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, epoch: int,
        rank: int = 0, world_size: int = 1, start: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise InputError(
                f"global batch_size {batch_size} does not split over {world_size} processes; "
                "use a multiple of the process count"
            )
        if num_samples < batch_size:
            raise InputError(
                f"dataset has {num_samples} samples, fewer than one batch of {batch_size}; "
                "lower batch_size or use a larger dataset"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size, self.start = seed, epoch, rank, world_size, start

    @property
    def num_batches(self) -> int:
        """Batches in a whole epoch."""
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        local = self.batch_size // self.world_size
        for j in range(self.start, self.num_batches):
            first = j * self.batch_size + self.rank * local
            yield order[first : first + local]
