"""Training loop for fxq's detectors: AdamW, clipping, lr schedule, exact resume, torchrun (DDP).

Usage: ``train(model, criterion, dataset, TrainConfig(...), out_dir, resume=False, collate_fn=...)``.
"""

from fxq.train.checkpoint import load_checkpoint, save_checkpoint
from fxq.train.config import TRAJECTORY_FIELDS, TrainConfig
from fxq.train.sampler import EpochBatchSampler, derive_seed
from fxq.train.schedule import build_scheduler, lr_factor
from fxq.train.trainer import Trainer, TrainingDivergedError, TrainResult, train

__all__ = [
    "TRAJECTORY_FIELDS",
    "EpochBatchSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "build_scheduler",
    "derive_seed",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
    "train",
]
