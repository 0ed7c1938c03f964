"""The training loop: AdamW, gradient clipping, lr schedule, seeded sampling, atomic checkpoints, exact resume.

``train(model, criterion, dataset, cfg, out_dir)`` trains ``model`` in place on batches
``(images, mask, targets)`` with ``criterion(model(*inputs), targets)["loss"]`` (``criterion(..., step=step)``
when the criterion has ``takes_step = True``). ``model`` is an eager detector (``inputs`` = images, mask) or a
traced graph (a :class:`fxq.tracing.DetectorGraph` or a wrapper of one), which takes images only unless it was
traced with a mask; :func:`fxq.tracing.model_batch` makes the inputs. A graph that takes no mask refuses padded
batches (InputError): it would see the padding as image and its boxes would not match the targets; train it on
same-size images (the synthetic sets are fixed-size) or trace it with ``(images, mask)``.

Under ``torchrun`` it joins the process group (gloo on CPU) and gives every process an equal contiguous slice of
each global batch; before each forward pass rank 0's buffers are broadcast and after each backward pass the
gradients are averaged over the processes (one all-reduce), which is what DistributedDataParallel does, but
also defined for objectives that differentiate inside the loss (the Fisher-trace regularizer's double backprop),
which DDP's documentation excludes (it supports gradients accumulated in ``.grad`` only). Rank 0 writes the log, the
progress bar and the checkpoints.

Resuming (``resume=True`` / a path / ``"auto"``) restores model, optimizer, scheduler, step, epoch, the
position within the epoch and every rank's torch/numpy/python RNG state, so the resumed run ends
bit-identical to an uninterrupted one (for datasets that draw randomness in worker processes this holds only
when resuming at an epoch boundary, since workers are re-seeded per epoch). A fresh run seeds the global RNGs
from (seed, rank); the model is initialised by the caller, before ``train``.

A ``before_step`` hook (``hook(step)`` before each step's forward pass, with ``hook.config()`` in the run
fingerprint) changes the model by the step number alone, so a resumed run sees what an uninterrupted one saw:
:class:`fxq.passes.float_stage.FloatStage` (Q-DETR's two-stage schedule) is one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fxq.errors import CheckpointError, FxqError, InputError
from fxq.tracing import model_batch
from fxq.train.checkpoint import load_checkpoint, save_checkpoint
from fxq.train.config import TrainConfig
from fxq.train.distributed import DistInfo, gather_objects, init_distributed
from fxq.train.fingerprint import fingerprint_diff, run_fingerprint
from fxq.train.log import JsonlLog
from fxq.train.optim import build_optimizer
from fxq.train.rng import capture_rng, restore_rng, seed_everything
from fxq.train.sampler import EpochBatchSampler, derive_seed
from fxq.train.schedule import build_scheduler

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


class StepHook(Protocol):
    """Changes the model before a step, by the step number alone."""

    def __call__(self, step: int) -> None: ...

    def config(self) -> dict:
        """Plain-type settings (for the run fingerprint)."""


class TrainingDivergedError(FxqError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: total steps done, epoch, last loss and the checkpoint written."""

    step: int
    epoch: int
    loss: float
    checkpoint: Path


def train(
    model: nn.Module,
    criterion: Callable[[dict, list[dict]], dict],
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool | str | Path = False,
    collate_fn: Callable | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; see the module docstring. ``on_step(step, losses)`` runs after each step."""
    trainer = Trainer(model, criterion, dataset, cfg, out_dir, collate_fn, init_distributed(cfg.device))
    trainer.restore(resume)
    return trainer.fit(on_step)


class Trainer:
    """State of one run (model, optimizer, scheduler, position); :func:`train` is the usual entry point."""

    def __init__(
        self, model: nn.Module, criterion: Callable, dataset: Dataset, cfg: TrainConfig,
        out_dir: str | Path, collate_fn: Callable | None = None, info: DistInfo | None = None,
        before_step: StepHook | None = None,
    ) -> None:
        self.model, self.criterion, self.dataset, self.cfg = model.to(cfg.device), criterion, dataset, cfg
        self.before_step = before_step
        self.info = info or DistInfo()
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.collate_fn = collate_fn or _default_collate()
        self.steps_per_epoch = self._sampler(0, 0).num_batches
        self.total_steps = cfg.total_steps(self.steps_per_epoch)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.fingerprint = run_fingerprint(model, self._settings())
        self.step = self.epoch = self.position = 0
        self.elapsed, self.last_loss = 0.0, math.nan
        self.log: JsonlLog | None = None

    @property
    def checkpoint_path(self) -> Path:
        """``out_dir/checkpoint.pt``."""
        return self.out_dir / CHECKPOINT_NAME

    def restore(self, resume: bool | str | Path) -> None:
        """Start fresh (``False``), or resume from out_dir's checkpoint (``True``, ``"auto"`` if present) or a path."""
        path = self._resume_path(resume)
        if path is None:
            seed_everything(derive_seed(self.cfg.seed, self.info.rank))
        else:
            self._load(load_checkpoint(path), path)
        if self.info.is_main:
            self.log = JsonlLog(self.out_dir / LOG_NAME, None if path is None else self.step)

    def fit(self, on_step: Callable | None = None) -> TrainResult:
        """Run until the last step (or ``cfg.stop_after``); checkpoint and return where it ended."""
        net = self.model
        end = self.total_steps if self.cfg.stop_after is None else min(self.total_steps, self.cfg.stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.info.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        saved_at = -1
        with bar:
            while self.step < end:
                for batch in self._loader():
                    losses = self._train_step(net, batch)
                    bar.update(1)
                    self._after_step(losses, bar, on_step)
                    if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                        self.save()
                        saved_at = self.step
                    if self.step >= end:
                        break
        if saved_at != self.step:
            self.save()
        return TrainResult(self.step, self.epoch, self.last_loss, self.checkpoint_path)

    def save(self) -> None:
        """Write the checkpoint of the current state (every rank must call it; rank 0 writes)."""
        rng = gather_objects(capture_rng(), self.info)
        if self.info.is_main:
            save_checkpoint(self.checkpoint_path, {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "elapsed": self.elapsed, "rng": rng,
                "fingerprint": self.fingerprint, "config": _plain(asdict(self.cfg)),
            })
        if self.info.world_size > 1:
            dist.barrier()

    def _train_step(self, net: nn.Module, batch) -> dict[str, Tensor]:
        start = time.perf_counter()
        if self.before_step is not None:
            self.before_step(self.step)
        inputs, targets = model_batch(self.model, batch, need_targets=True, index=self.step)
        self._sync_buffers()
        losses = self._losses(net(*inputs), targets)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1
                   and not torch.isfinite(v)]
            terms = f" (non-finite terms: {', '.join(bad)})" if bad else ""
            raise TrainingDivergedError(
                f"loss is {loss.item()} at step {self.step}{terms}; lower lr, raise warmup_steps or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        losses["grad_norm"] = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.elapsed += time.perf_counter() - start
        return losses

    def _losses(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        if getattr(self.criterion, "takes_step", False):
            return self.criterion(outputs, targets, step=self.step)
        return self.criterion(outputs, targets)

    def _clip(self) -> Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip_max_norm and self.cfg.clip_max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def _after_step(self, losses: dict[str, Tensor], bar: tqdm, on_step: Callable | None) -> None:
        if not (self.cfg.log_every and self.step % self.cfg.log_every == 0) and on_step is None:
            return
        scalars = self._reduce_scalars(losses)
        self.last_loss = scalars["loss"]
        if self.cfg.log_every and self.step % self.cfg.log_every == 0 and self.info.is_main:
            lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
            self.log.write({"step": self.step, "epoch": self.epoch, **scalars, **lrs, "time": self.elapsed})
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            on_step(self.step, scalars)

    def _reduce_scalars(self, losses: dict[str, Tensor]) -> dict[str, float]:
        keys = [k for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1]
        values = torch.stack([losses[k].detach().float().reshape(()).cpu() for k in keys])
        if self.info.world_size > 1:
            dist.all_reduce(values)
            values /= self.info.world_size
        return dict(zip(keys, values.tolist(), strict=True))

    def _loader(self) -> DataLoader:
        sampler = self._sampler(self.epoch, self.position)
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, 1))
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, generator=generator)

    def _sampler(self, epoch: int, start: int) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, epoch,
                                 self.info.rank, self.info.world_size, start)

    def _sync_buffers(self) -> None:
        if self.info.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def _average_gradients(self) -> None:
        """Mean of every trainable parameter's gradient over the processes (a missing one counts as 0; one
        missing on every process stays missing)."""
        if self.info.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(present)
        params = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.info.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()

    def _settings(self) -> dict:
        criterion = self.criterion.config() if hasattr(self.criterion, "config") else _qualname(self.criterion)
        frozen = sum(not p.requires_grad for p in self.model.parameters())
        settings = {**self.cfg.trajectory(), "dataset_len": len(self.dataset),
                    "world_size": self.info.world_size, "criterion": criterion, "frozen_parameters": frozen}
        if self.before_step is not None:  # only then: runs without a hook keep their fingerprint
            settings["before_step"] = self.before_step.config()
        return settings

    def _resume_path(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            return self.checkpoint_path
        if resume == "auto":
            return self.checkpoint_path if self.checkpoint_path.is_file() else None
        return Path(resume)

    def _load(self, ckpt: dict, path: Path) -> None:
        diffs = fingerprint_diff(ckpt["fingerprint"], self.fingerprint)
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was written by another run configuration: {'; '.join(diffs)}; "
                "resume with the model and TrainConfig that wrote it, or start without resume"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch, self.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        self.elapsed = ckpt["elapsed"]
        restore_rng(ckpt["rng"][self.info.rank])


def _default_collate() -> Callable:
    try:
        from fxq.data import collate
    except ImportError as exc:
        raise InputError(
            "no collate_fn given and fxq.data.collate is not available; pass collate_fn=... to train()"
        ) from exc
    return collate


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _qualname(obj) -> str:
    kind = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"
