"""Training configuration: what defines a run's trajectory and what only affects how it is run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TRAJECTORY_FIELDS = (
    "epochs", "batch_size", "lr", "lr_backbone", "lr_quant", "max_steps", "weight_decay", "clip_max_norm",
    "schedule", "lr_drop", "lr_gamma", "warmup_steps", "min_lr_ratio", "seed",
)
"""Fields that change the weights a run ends with; a checkpoint only resumes under equal values."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`fxq.train.train` (DETR's defaults for the optimizer and clipping).

    ``batch_size`` is the global batch (split evenly over ``torchrun`` processes); incomplete last batches
    are dropped. ``schedule`` is ``"step"`` (multiply the lr by ``lr_gamma`` at each epoch in ``lr_drop``,
    as DETR) or ``"cosine"`` (cosine decay to ``min_lr_ratio * lr`` at the last step); both start with
    ``warmup_steps`` of linear warm-up. ``lr_quant`` is the learning rate of fake quantizers' scales and zero-points
    (default: ``lr``). ``max_steps`` caps the run's length (and the schedule's) below ``epochs``, for
    fine-tuning in a fraction of an epoch. ``ckpt_every`` steps (and at the end or at ``stop_after``) the run
    writes ``out_dir/checkpoint.pt``; ``stop_after`` ends the run early after that many steps in total,
    without changing the schedule (for time-sliced training).
    """

    epochs: int = 1
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_quant: float | None = None
    max_steps: int | None = None
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    schedule: str = "step"
    lr_drop: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 1
    stop_after: int | None = None
    num_workers: int = 0
    progress: bool = True
    device: str = "cpu"

    def trajectory(self) -> dict:
        """The fields in :data:`TRAJECTORY_FIELDS` as plain types (``lr_quant`` and ``max_steps`` only when set,
        so runs of float models keep the fingerprint they had before those fields existed)."""
        values = asdict(self)
        fields = [k for k in TRAJECTORY_FIELDS if not (k in ("lr_quant", "max_steps") and values[k] is None)]
        return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in fields}

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: ``epochs * steps_per_epoch``, capped at ``max_steps``."""
        total = self.epochs * steps_per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)
