"""`fxq pretrain`: the centre read-out against hand-computed bilinear interpolation, the loss terms against
direct computations, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fxq.cli import main
from fxq.models import build
from fxq.models.transfer import copy_backbone
from fxq.objectives.centre import WEIGHTS, centre_heatmap, centre_loss, centre_values
from fxq.objectives.criterion import sigmoid_focal_loss


def _bilinear(grid: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of a [K, h, w] map at pixel-space point (x, y), pixel centres at integer + 0.5, zeros outside."""
    x, y = x - 0.5, y - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(grid.shape[0], dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < grid.shape[2] and 0 <= yi < grid.shape[1]:
                out += weight * grid[:, yi, xi].double()
    return out


def test_centre_values_read_each_box_centre_in_the_padded_map():
    torch.manual_seed(0)
    logit_map = torch.randn(2, 5, 6, 8, dtype=torch.float64)  # padded batch 48 x 64 px at stride 8
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.8, 0.1, 0.1]]), "labels": torch.tensor([1, 4]),
         "size": torch.tensor([48, 64])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([40, 32])},
    ]
    targets.append({"boxes": torch.tensor([[0.75, 0.25, 0.1, 0.1]]), "labels": torch.tensor([2]),
                    "size": torch.tensor([40, 32])})
    logit_map = torch.cat([logit_map, torch.randn(1, 5, 6, 8, dtype=torch.float64)])
    logits, labels = centre_values(logit_map, targets)
    expected = [
        _bilinear(logit_map[0], 0.5 * 64 / 8, 0.5 * 48 / 8),
        _bilinear(logit_map[0], 0.1 * 64 / 8, 0.8 * 48 / 8),
        _bilinear(logit_map[2], 0.75 * 32 / 8, 0.25 * 40 / 8),
    ]
    assert labels.tolist() == [1, 4, 2]
    torch.testing.assert_close(logits, torch.stack(expected), rtol=0, atol=1e-6)  # boxes are float32


def test_loss_terms_match_direct_computations():
    torch.manual_seed(0)
    class_map = torch.randn(1, 3, 4, 4, requires_grad=True)
    box_map = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = {"boxes": torch.tensor([[0.375, 0.625, 0.25, 0.5]]), "labels": torch.tensor([2]),
              "size": torch.tensor([32, 32])}
    out = centre_loss({"class_map": class_map, "box_map": box_map}, [target])
    row, col = 2, 1  # centre (12, 20) px = the middle of cell (row 2, column 1) at stride 8
    assert out["loss_ce"].item() == pytest.approx(-torch.log_softmax(class_map[0, :, row, col], 0)[2].item(), abs=1e-6)
    size = box_map[0, 1:, row, col].sigmoid()
    assert out["loss_size"].item() == pytest.approx(((size - torch.tensor([0.25, 0.5])).abs().mean()).item(), abs=1e-6)
    heat = torch.zeros(4, 4)
    heat[row, col] = 1
    focal = sigmoid_focal_loss(box_map[0, 0], heat).sum()
    assert out["loss_centre"].item() == pytest.approx(focal.item(), abs=1e-6)
    total = sum(WEIGHTS[k] * out[k] for k in WEIGHTS)
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-6)
    assert out["accuracy"].item() == float(class_map[0, :, row, col].argmax() == 2)


def test_centre_heatmap_marks_the_cell_of_each_centre_and_empty_batches_train_the_centre_map_only():
    targets = [{"boxes": torch.tensor([[0.99, 0.01, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]), "size": torch.tensor([40, 40]),
                "labels": torch.tensor([1, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "size": torch.tensor([80, 80])}]
    heat = centre_heatmap(targets, (10, 10), torch.float32)  # image 0 fills the top-left half of the padded map
    assert heat[0].nonzero().tolist() == [[0, 4], [2, 2]] and heat[1].sum() == 0
    class_map = torch.randn(1, 3, 4, 4, requires_grad=True)
    box_map = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = centre_loss({"class_map": class_map, "box_map": box_map}, targets[1:])
    out["loss"].backward()
    assert out["loss_ce"].item() == out["loss_size"].item() == 0
    assert class_map.grad is not None and box_map.grad[0, 0].abs().sum() > 0


def test_pretrain_writes_a_backbone_that_detr_loads(tmp_path, capsys):
    data, run = tmp_path / "synth", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "96"]) == 0
    assert main(["pretrain", "detr_tiny", "--data", str(data), "--out", str(run), "--size", "96", "--epochs", "2",
                 "--batch-size", "4", "--warmup", "1", "--no-progress"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["objects"] > 0 and 0 <= report["centre_accuracy"] <= 1
    assert "centre accuracy" in capsys.readouterr().out
    state = torch.load(run / "backbone.pt", weights_only=True)
    detector = build("detr_tiny", pretrained=False)
    assert copy_backbone(detector, run / "backbone.pt") == len(state)
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in state.items())
    fresh = build("detr_tiny", pretrained=False).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in state.items() if v.is_floating_point())


def test_pretrain_rejects_an_unknown_model_before_work(tmp_path, capsys):
    assert main(["pretrain", "detr_tiniest", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "detr_tiny" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
