"""fxq.train: schedule, sampling, exact resume, fingerprint checks, logging, torchrun (2 processes).

Run as a script (``torchrun ... tests/test_trainer.py OUT``) this file is the per-rank worker of the
torchrun test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fxq.errors import CheckpointError, InputError
from fxq.objectives import CriticalObjective, SetCriterion, build_criterion
from fxq.train import EpochBatchSampler, TrainConfig, load_checkpoint, lr_factor, train
from fxq.train.checkpoint import save_checkpoint

NUM_CLASSES = 5


class TinyDetector(nn.Module):
    """Conv backbone + pooled features + per-query MLP layers, each emitting DETR-style outputs."""

    def __init__(self, head: str = "softmax", queries: int = 6, hidden: int = 16, layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.head, self.num_classes = head, NUM_CLASSES
        self.backbone = nn.Sequential(
            nn.Conv2d(3, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.query_embed = nn.Embedding(queries, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.class_embed = nn.Linear(hidden, NUM_CLASSES + (head == "softmax"))
        self.bbox_embed = nn.Linear(hidden, 4)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        feat = self.backbone(images)
        valid = F.interpolate(mask[:, None].float(), size=feat.shape[-2:])[:, 0] < 0.5
        pooled = (feat * valid[:, None]).sum((2, 3)) / valid.sum((1, 2)).clamp(min=1)[:, None]
        x = self.query_embed.weight[None] + pooled[:, None]
        outs = []
        for layer in self.layers:
            x = x + self.dropout(torch.relu(layer(x)))
            outs.append({"pred_logits": self.class_embed(x), "pred_boxes": self.bbox_embed(x).sigmoid()})
        return {**outs[-1], "aux_outputs": outs[:-1]}


class SyntheticBoxes(Dataset):
    """Random 16x16 images with 0-3 random boxes each (fixed by the seed)."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            count = int(torch.randint(0, 4, (), generator=g))
            cxcy = torch.rand(count, 2, generator=g) * 0.6 + 0.2
            wh = torch.rand(count, 2, generator=g) * 0.3 + 0.05
            target = {"boxes": torch.cat([cxcy, wh], 1), "labels": torch.randint(0, NUM_CLASSES, (count,), generator=g)}
            self.items.append((torch.randn(3, 16, 16, generator=g), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
    return images, mask, [b[1] for b in batch]


def make_model(seed: int = 0, **kwargs) -> TinyDetector:
    torch.manual_seed(seed)
    return TinyDetector(**kwargs)


CFG = TrainConfig(epochs=2, batch_size=4, lr=1e-3, lr_backbone=1e-4, ckpt_every=2, progress=False,
                  schedule="cosine", warmup_steps=2)


def run(out_dir, cfg=CFG, resume=False, model_kwargs=None, **kwargs):
    model = make_model(**(model_kwargs or {"dropout": 0.2}))
    result = train(model, SetCriterion(), SyntheticBoxes(), cfg, out_dir, resume=resume, collate_fn=collate,
                   **kwargs)
    return model, result


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- schedule and sampling


def test_lr_schedules():
    step = TrainConfig(epochs=4, lr_drop=(2, 3), lr_gamma=0.1)
    assert [lr_factor(s, step, 10) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = TrainConfig(epochs=1, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, warm, 14) for s in (0, 1, 3)] == pytest.approx([0.25, 0.5, 1.0])
    assert lr_factor(9, warm, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, warm, 14) == pytest.approx(0.1)


def test_sampler_is_seeded_per_epoch_and_shards_the_global_batch():
    def batches(epoch, rank=0, world=1, start=0):
        return list(EpochBatchSampler(11, 4, seed=3, epoch=epoch, rank=rank, world_size=world, start=start))

    single = batches(0)
    assert len(single) == 2 and all(len(b) == 4 for b in single)
    assert single == batches(0) and single != batches(1)
    shards = [batches(0, r, 2) for r in range(2)]
    assert [shards[0][j] + shards[1][j] for j in range(2)] == single
    assert batches(0, start=1) == single[1:]
    with pytest.raises(InputError, match="multiple"):
        EpochBatchSampler(11, 4, 0, 0, world_size=3)
    with pytest.raises(InputError, match="fewer than one batch"):
        EpochBatchSampler(3, 4, 0, 0)


# ---------------------------------------------------------------- exact resume


def test_resume_is_bit_identical(tmp_path):
    straight, result = run(tmp_path / "a")
    assert result.step == 6 and result.epoch == 2
    _, stopped = run(tmp_path / "b", cfg=TrainConfig(**{**CFG.__dict__, "stop_after": 4}))
    ckpt = load_checkpoint(stopped.checkpoint)
    assert (ckpt["step"], ckpt["epoch"], ckpt["position"]) == (4, 1, 1)  # mid-epoch
    resumed, result = run(tmp_path / "b", resume=True)
    assert result.step == 6
    assert_same_weights(straight, resumed)
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in log_b] == list(range(1, 7))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    opt_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_resume_after_a_crash_trims_the_log(tmp_path):
    def crash(step, losses):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path, on_step=crash)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    resumed, _ = run(tmp_path, resume="auto")
    straight, _ = run(tmp_path / "straight")
    assert_same_weights(straight, resumed)
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 7))


def test_log_records_and_learning_rates(tmp_path):
    _, result = run(tmp_path, cfg=TrainConfig(**{**CFG.__dict__, "schedule": "step", "warmup_steps": 0}))
    records = read_log(tmp_path)
    assert len(records) == 6
    first = records[0]
    assert {"step", "epoch", "loss", "loss_ce", "loss_bbox_0", "grad_norm", "lr_main", "lr_backbone",
            "time"} <= set(first)
    assert first["lr_main"] == pytest.approx(1e-3) and first["lr_backbone"] == pytest.approx(1e-4)
    assert result.loss == pytest.approx(records[-1]["loss"])


def test_training_reduces_the_loss(tmp_path):
    cfg = TrainConfig(epochs=15, batch_size=4, lr=1e-2, lr_backbone=1e-2, ckpt_every=0, progress=False)
    train(make_model(), SetCriterion(), SyntheticBoxes(n=4), cfg, tmp_path, collate_fn=collate)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 15 and losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- checkpoint validation


def test_resume_from_another_config_names_the_difference(tmp_path):
    run(tmp_path, cfg=TrainConfig(**{**CFG.__dict__, "stop_after": 2}))
    with pytest.raises(CheckpointError, match=r"query_embed\.weight"):
        run(tmp_path, resume=True, model_kwargs={"hidden": 8})
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.001, now 0\.002"):
        run(tmp_path, cfg=TrainConfig(**{**CFG.__dict__, "lr": 2e-3}), resume=True)
    model = make_model(dropout=0.2)
    with pytest.raises(CheckpointError, match="criterion"):
        train(model, build_criterion(one_to_many=2), SyntheticBoxes(), CFG, tmp_path, resume=True,
              collate_fn=collate)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    assert load_checkpoint(save_checkpoint(tmp_path / "ours.pt", {"x": 1}))["x"] == 1
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fxq training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- traced graphs (images only)

DETR_SIZE = 64


def detr_boxes(n: int = 2, seed: int = 0, sizes=None) -> list:
    """(image, target) pairs for detr_tiny (25 classes): same-size images unless ``sizes`` says otherwise."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [(DETR_SIZE, DETR_SIZE)] * n
    return [(torch.randn(3, *size, generator=g),
             {"labels": torch.randint(0, 25, (2,), generator=g), "boxes": torch.rand(2, 4, generator=g) * 0.3 + 0.3})
            for size in sizes]


@pytest.fixture(scope="module")
def detr_tiny():
    import fxq
    from fxq.models import build

    eager = build("detr_tiny", seed=0)
    eager.aux_loss = False  # as the traced graph (traced without aux outputs)
    graph = fxq.trace(copy.deepcopy(eager), torch.zeros(1, 3, DETR_SIZE, DETR_SIZE))
    assert not graph.takes_mask
    return eager, graph


def train_logged(model, data, out_dir, epochs: int, lr: float = 1e-3) -> list[float]:
    """Train ``model`` with fxq's own collate (unpadded for same-size images); the loss of every step."""
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=lr, lr_backbone=lr, ckpt_every=0, progress=False)
    losses = []
    train(model, build_criterion("sigmoid", aux=False), data, cfg, out_dir,
          on_step=lambda step, scalars: losses.append(scalars["loss"]))
    return losses


def test_trains_an_images_only_traced_graph(detr_tiny, tmp_path):
    graph = copy.deepcopy(detr_tiny[1]).train()
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    losses = train_logged(graph, detr_boxes(), tmp_path, epochs=4)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    changed = [k for k, p in graph.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert len(changed) == len(list(graph.parameters()))


def test_traced_graph_trains_as_the_eager_model(detr_tiny, tmp_path):
    """Same data, seed and config: the images-only graph's steps have the eager model's (images, mask) losses
    and gradients (the batches are unpadded, so the eager model's all-False mask changes nothing)."""
    eager, graph = (copy.deepcopy(m).train() for m in detr_tiny)
    data = detr_boxes()
    eager_losses = train_logged(eager, data, tmp_path / "eager", epochs=2)
    graph_losses = train_logged(graph, data, tmp_path / "graph", epochs=2)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    eager_params, graph_params = dict(eager.named_parameters()), dict(graph.named_parameters())
    assert eager_params.keys() == graph_params.keys()
    for name, p in eager_params.items():  # the last step's (clipped) gradients, and the weights after it
        scale = float(p.grad.abs().max())  # to 0.01% of the tensor's largest gradient: rounding, not a bug
        assert torch.allclose(graph_params[name].grad, p.grad, rtol=1e-4, atol=1e-4 * scale + 1e-12), name
        # Adam steps a weight by about lr whatever its gradient's size, so float-rounding noise in near-zero
        # gradients (CPU-dependent: 2e-6 on an AMX Xeon) moves weights apart by a small fraction of one step
        assert torch.allclose(graph_params[name], p, rtol=1e-4, atol=1e-2 * 1e-3), name


def test_padded_batch_for_an_images_only_graph_is_refused(detr_tiny, tmp_path):
    graph = copy.deepcopy(detr_tiny[1]).train()
    padded = detr_boxes(sizes=[(DETR_SIZE, DETR_SIZE), (DETR_SIZE, DETR_SIZE - 16)])
    with pytest.raises(InputError, match=r"batch 0: the batch is padded .*fxq\.trace\(model, \(images, mask\)\)"):
        train_logged(graph, padded, tmp_path, epochs=1)


def test_a_criterion_that_takes_the_step_gets_it(tmp_path):
    steps = []

    class StepCriterion:
        takes_step = True

        def __init__(self):
            self.inner = SetCriterion()

        def __call__(self, outputs, targets, step=None):
            steps.append(step)
            return self.inner(outputs, targets)

    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, ckpt_every=0, progress=False)
    train(make_model(), StepCriterion(), SyntheticBoxes(n=8), cfg, tmp_path, collate_fn=collate)
    assert steps == [0, 1, 2, 3]


# ---------------------------------------------------------------- torchrun, 2 processes

DDP_CFG = TrainConfig(epochs=1, batch_size=4, lr=1e-3, lr_backbone=1e-4, ckpt_every=0, progress=False)
DDP_CASES = {
    "sigmoid": lambda: build_criterion("sigmoid", one_to_many=2),
    "softmax": lambda: CriticalObjective(SetCriterion(), [1, 3], alpha=0.5),
}


def ddp_run(out_dir: Path, head: str) -> nn.Module:
    model = make_model(head=head)
    train(model, DDP_CASES[head](), SyntheticBoxes(), DDP_CFG, out_dir / head, collate_fn=collate)
    return model


def test_torchrun_two_processes_match_single_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for head in DDP_CASES:
        rank0, rank1 = (torch.load(tmp_path / "ddp" / head / f"rank{r}.pt", weights_only=True) for r in range(2))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        single = ddp_run(tmp_path / "single", head).state_dict()
        initial = make_model(head=head).state_dict()
        for k in single:
            assert not torch.equal(single[k], initial[k]), k  # every weight was trained
            assert torch.allclose(rank0[k], single[k], rtol=1e-4, atol=1e-6), (head, k)
        ddp_log, single_log = read_log(tmp_path / "ddp" / head), read_log(tmp_path / "single" / head)
        assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single_log], rel=1e-5)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in DDP_CASES:
        trained = ddp_run(Path(sys.argv[1]), case)
        torch.save(trained.state_dict(), Path(sys.argv[1]) / case / f"rank{os.environ['RANK']}.pt")


def test_a_non_finite_loss_names_the_step_and_the_term(tmp_path):
    from fxq.train.trainer import TrainingDivergedError

    base = build_criterion("sigmoid")

    def criterion(outputs, targets):
        losses = base(outputs, targets)
        kd = losses["loss"] * float("nan")
        return {**losses, "loss_kd": kd, "loss": losses["loss"] + kd}

    with pytest.raises(TrainingDivergedError, match=r"at step 0 \(non-finite terms: loss_kd\)"):
        train(make_model(head="sigmoid"), criterion, SyntheticBoxes(), CFG, tmp_path, collate_fn=collate)
