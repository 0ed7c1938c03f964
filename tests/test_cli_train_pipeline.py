"""`fxq train` and `fxq pipeline` end to end on a small synthetic set."""

from __future__ import annotations

import json

import pytest
import torch

from fxq.cli import main
from fxq.models import build


def test_train_writes_weights_and_metrics_that_load(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "96"]) == 0
    assert main(["train", "detr_tiny", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "4",
                 "--size", "96", "--warmup", "1", "--no-progress", "--backbone-from", "deformable_detr_tiny"]) == 0
    assert json.loads((run / "config.json").read_text())["argv"]["backbone_from"] == "deformable_detr_tiny"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["AP"] <= 1.0
    trained = build("detr_tiny", checkpoint=run / "model.pt")
    saved = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in trained.state_dict().items())


def test_pipeline_reports_float_and_quantized_rows(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", "--out", str(out), "--val-images", "6", "--calib-images", "4", "--policy", "W8A8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["graph"] for r in summary["rows"]][:2] == ["fp32 (FX graph)", "W8A8 minmax"]
    assert "W8A8 minmax" in capsys.readouterr().out


def test_pipeline_rejects_bad_policy_before_work(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "p"), "--policy", "W9A8"]) == 2
    assert "W9A8" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_train_rejects_a_missing_backbone_source_before_reading_data(tmp_path, capsys):
    args = ["train", "detr_tiny", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
            "--backbone-from", str(tmp_path / "missing.pt")]
    assert main(args) == 2
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_same_train_command_gives_the_same_weights_and_the_seed_changes_them(tmp_path):
    from fxq.models import read_state_dict

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "64"]) == 0
    states = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        args = ["train", "detr_tiny", "--data", str(data), "--out", str(tmp_path / name), "--batch-size", "4",
                "--size", "64", "--stop-after", "1", "--seed", seed, "--no-progress"]
        assert main(args) == 0
        states.append(read_state_dict(tmp_path / name / "checkpoint.pt"))
    assert states[0].keys() == states[1].keys() and all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert any(not torch.equal(v, states[2][k]) for k, v in states[0].items() if k.startswith("transformer."))


def test_freeze_backbone_keeps_the_early_stages_and_resume_checks_it(tmp_path, capsys):
    from fxq.models import read_state_dict
    from fxq.models.transfer import source_state

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "64"]) == 0
    args = ["train", "detr_tiny", "--data", str(data), "--out", str(run), "--batch-size", "4", "--size", "64",
            "--backbone-from", "deformable_detr_tiny", "--no-progress", "--warmup", "0"]
    assert main([*args, "--stop-after", "2", "--freeze-backbone", "layer2"]) == 0
    trained, source = read_state_dict(run / "checkpoint.pt"), source_state("deformable_detr_tiny")
    params = {name for name, _ in build("detr_tiny").named_parameters()}
    body = "backbone.0.body."
    frozen = [k for k in params if k.startswith((body + "conv1", body + "bn1", body + "layer1", body + "layer2"))]
    trainable = [k for k in params if k.startswith(body + "layer3")]
    assert frozen and trainable
    assert all(torch.equal(trained[k], source[k]) for k in frozen)
    assert all(not torch.equal(trained[k], source[k]) for k in trainable if k.endswith("conv1.weight"))
    capsys.readouterr()
    assert main([*args, "--stop-after", "3", "--freeze-backbone", "layer1", "--resume"]) == 2
    assert "--freeze-backbone 'layer1' (the run has 'layer2')" in capsys.readouterr().err


def test_freeze_backbone_needs_a_resnet_backbone():
    from fxq import InputError
    from fxq.models.transfer import freeze_backbone

    with pytest.raises(InputError, match="backbone.0.body"):
        freeze_backbone(torch.nn.Linear(2, 2), "layer1")
    with pytest.raises(InputError, match="layer5.*stem, layer1"):
        freeze_backbone(build("detr_tiny"), "layer5")


def test_query_groups_train_and_publish_the_first_group_only(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "64"]) == 0
    args = ["--data", str(data), "--out", str(run), "--batch-size", "4", "--size", "64", "--no-progress",
            "--query-groups", "2"]
    assert main(["train", "deformable_detr_tiny", *args]) == 2
    assert "--query-groups 2: needs a DETR model" in capsys.readouterr().err and not run.exists()
    assert main(["train", "detr_tiny", *args[:-1], "0"]) == 2
    assert "--query-groups 0: give 1" in capsys.readouterr().err and not run.exists()
    assert main(["train", "detr_tiny", *args]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"g1.loss_ce", "g1.loss_giou_0"} <= set(log[0])
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved.keys() == build("detr_tiny").state_dict().keys()
    build("detr_tiny", checkpoint=run / "model.pt")  # strict load
    again = ["--init", str(run / "model.pt"), "--stop-after", "1", "--out", str(tmp_path / "again")]
    assert main(["train", "detr_tiny", *args, *again]) == 0  # the published weights train on with new groups
