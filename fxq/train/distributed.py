"""Process-group set-up for ``torchrun``: gloo on CPU, nccl on CUDA; a no-op for a single process.

The group is created once per process and destroyed at interpreter exit, not after each run: destroying the
default group and creating it again in the same process can deadlock in the gloo rendezvous under torchrun
(observed: one rank connecting the new mesh while the other already waits in DDP's first collective).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, logs and the progress bar."""
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (env WORLD_SIZE > 1), or use an existing one."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    atexit.register(_destroy)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def gather_objects(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` for a single process)."""
    if info.world_size == 1:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
